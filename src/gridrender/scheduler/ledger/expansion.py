"""What a submission expanded its job into, recorded so that any host expands it the same.

Cell ids depend on things a host can see differently: dynamic prompts re-expanded
with that host's wildcard files, embeddings matched with or without a cached
tokenizer, the chunk size of that host's settings. A submit records the prompts
as expanded, the embeddings each (prompt, negative prompt, S/R, model) triggers
and the partition; `finalize`, `export` and `retry` replay the record, so a
torch-free CLI host writes the manifest the submitting host would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import yamlfile
from ..components import Component
from ..derivation import Derivation, embeddings_used
from ..job import Job
from ..models import ModelSpec
from ..plan import Plan
from ..prompts import encoder_text
from ..resolution import Components

# (text as the encoder reads it, model source, trigger words): the embeddings one text triggers
TextEmbeddings = tuple[str, str, list[str]]


@dataclass
class Expansion:
    """Recorded per text, not per (prompt, negative, S/R) combination: a cell's embeddings are the union of
    its texts' (`derivation.embeddings_used`), so the record grows with the texts, not with their product."""

    prompts: list[str]  # the prompts as expanded: wildcards and templates resolved on the submitting host
    embeddings: list[TextEmbeddings]  # texts that trigger any
    partition: str
    # Recorded before per-text rows: (prompt index, negative index, S/R index, model source, trigger words)
    combinations: list[tuple[int, int, int, str, list[str]]] | None = None

    @classmethod
    def of(cls, plan: Plan) -> Expansion:
        job = plan.job
        prompts = list(job.values_of("prompts"))
        found = plan.components.embeddings
        triggers = {id(e): word for word, e in found.items()}
        table: list[TextEmbeddings] = []
        if triggers:  # without embeddings there is nothing a host could match differently
            srs = list(job.values_of("prompt_sr"))
            written = [*prompts, *job.values_of("negative_prompt")]
            texts = dict.fromkeys(encoder_text(text, sr) for text in written for sr in srs)
            for text in texts:
                for model in plan.models:
                    if used := embeddings_used([text], found, model):
                        table.append((text, model.source, [triggers[id(e)] for e in used]))
        return cls(prompts, table, plan.partition)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "text_embeddings": self.embeddings, "partition": self.partition}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Expansion:
        prompts, partition = list(data["prompts"]), str(data["partition"])
        if "text_embeddings" not in data:  # recorded per combination
            old = [(int(p), int(n), int(s), str(source), list(words)) for p, n, s, source, words in data["embeddings"]]
            return cls(prompts, [], partition, old)
        uses = [(str(text), str(source), list(words)) for text, source, words in data["text_embeddings"]]
        return cls(prompts, uses, partition)


def recorded_job(raw: bytes, source: str, expansion: Expansion) -> Job:
    """job.yaml as stored, with the recorded prompts: no wildcard file of this host is read."""
    data, lines = yamlfile.load(yamlfile.decode(raw, source), source)
    job = Job.model_validate(data)
    job._source, job._lines, job._prompts = source, lines, list(expansion.prompts)
    return job


@dataclass
class RecordedPlan(Plan):
    """A plan that expands as its submission did: recorded embeddings per text, recorded partition."""

    expansion: Expansion | None = None

    @property
    def partition(self) -> str:
        assert self.expansion is not None
        return self.expansion.partition

    def derivation(self) -> Derivation:
        assert self.expansion is not None
        return RecordedDerivation(self.components, self.job, self.expansion)


class RecordedDerivation(Derivation):
    def __init__(self, components: Components, job: Job, expansion: Expansion):
        super().__init__(components)
        self.table = {(text, source): words for text, source, words in expansion.embeddings}
        self.combinations: dict[tuple[str, str, Any, str], list[str]] | None = None
        if expansion.combinations is not None:
            prompts, negatives, srs = expansion.prompts, job.values_of("negative_prompt"), job.values_of("prompt_sr")
            self.combinations = {(prompts[p], negatives[n], srs[s], m): w for p, n, s, m, w in expansion.combinations}

    def embeddings(self, prompt: str, negative: str, sr: tuple[Any, ...] | None, model: ModelSpec) -> tuple[Component, ...]:
        if self.combinations is not None:
            words = set(self.combinations.get((prompt, negative, sr, model.source), []))
        else:
            words = {w for text in (prompt, negative) for w in self.table.get((encoder_text(text, sr), model.source), [])}
        return tuple(self.components.embeddings[word] for word in sorted(words))  # embeddings_used's order
