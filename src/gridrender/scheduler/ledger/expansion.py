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
from ..derivation import Derivation
from ..job import Job
from ..models import ModelSpec
from ..plan import Plan
from ..resolution import Components

# (prompt index, negative index, S/R index, model source, trigger words): the embeddings one text combination triggers
EmbeddingUse = tuple[int, int, int, str, list[str]]


@dataclass
class Expansion:
    prompts: list[str]  # the prompts as expanded: wildcards and templates resolved on the submitting host
    embeddings: list[EmbeddingUse]  # non-empty uses only
    partition: str

    @classmethod
    def of(cls, plan: Plan) -> Expansion:
        job, derivation = plan.job, plan.derivation()
        prompts = list(job.values_of("prompts"))
        triggers = {id(e): word for word, e in plan.components.embeddings.items()}
        table: list[EmbeddingUse] = []
        if triggers:  # without embeddings there is nothing a host could match differently
            negatives, srs = list(job.values_of("negative_prompt")), list(job.values_of("prompt_sr"))
            for p, prompt in enumerate(prompts):
                for n, negative in enumerate(negatives):
                    for s, sr in enumerate(srs):
                        for model in plan.models:
                            used = derivation.embeddings(prompt, negative, sr, model)
                            if used:
                                table.append((p, n, s, model.source, [triggers[id(e)] for e in used]))
        return cls(prompts, table, plan.partition)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "embeddings": self.embeddings, "partition": self.partition}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Expansion:
        uses = [(int(p), int(n), int(s), str(source), list(words)) for p, n, s, source, words in data["embeddings"]]
        return cls(list(data["prompts"]), uses, str(data["partition"]))


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
        self.table = self._index(job, expansion)

    @staticmethod
    def _index(job: Job, expansion: Expansion) -> dict[tuple[str, str, Any, str], list[str]]:
        prompts, negatives, srs = expansion.prompts, job.values_of("negative_prompt"), job.values_of("prompt_sr")
        return {(prompts[p], negatives[n], srs[s], source): words for p, n, s, source, words in expansion.embeddings}

    def embeddings(self, prompt: str, negative: str, sr: tuple[Any, ...] | None, model: ModelSpec) -> tuple[Component, ...]:
        words = self.table.get((prompt, negative, sr, model.source), [])
        return tuple(self.components.embeddings[word] for word in words)
