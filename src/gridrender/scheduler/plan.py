"""From a job file to its cells and chunks: parse, resolve the model, expand as a stream.

A plan never holds a job's cells: `cells()` and `chunks()` expand them anew each
time, so a million-cell job costs memory for one chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from . import families, grid, hires, models, samplers
from .components import Component, LoraUse, resolve_embeddings, resolve_init_image, resolve_lora, resolve_upscaler, resolve_vae
from .errors import JobError, ModelError, Problem
from .grid import Cell
from .hires import InitImage
from .job import Job, SheetLayout
from .jobfile import load_job
from .models import ModelSpec
from .params import AXES, INDEX
from .prompts import LoraTag, encoder_text, lora_tags, search_replace
from .rates import RateOf, cell_work, chunk_size
from .settings import Settings, concrete_dtype
from .storage import Store
from .stores import open_store
from .tokens import tokenizer_for

_PROMPT, _NEGATIVE, _SR = INDEX["prompt"], INDEX["negative_prompt"], INDEX["prompt_sr"]
_MODEL, _LORAS, _EMBEDDINGS = INDEX["model"], INDEX["loras"], INDEX["embeddings"]

# Bump when expansion or chunking changes: chunk ids (and so progress records) follow it.
EXPANSION_VERSION = 1
DERIVED_TEXTS_KEPT = 10_000  # a cell's texts' derivations remembered: bounds memory on data sets of many prompts
SHOWN_VALUES = 8  # values of an axis `validate` prints; more are counted
USUAL_MAX_CLIP_SKIP = 2  # beyond it images tend to look under-guided: a warning, not an error

P = ParamSpec("P")
T = TypeVar("T")
Key = TypeVar("Key")


@dataclass(frozen=True)
class Chunk:
    """A run of cells that share call parameters: one task message, one progress record."""

    id: str
    cells: list[Cell]


@dataclass
class Components:
    """Every model and component the job names, resolved: what cells hold as values."""

    models: dict[str, ModelSpec]  # job-file source -> model
    vaes: dict[str | None, Component | None] = field(default_factory=lambda: {None: None})
    loras: dict[str, Component] = field(default_factory=dict)  # `loras:` paths and <lora:NAME:W> names
    embeddings: dict[str, Component] = field(default_factory=dict)  # trigger word -> embedding
    upscalers: dict[str, Component] = field(default_factory=dict)  # hires upscaler model files
    init_images: dict[str, InitImage] = field(default_factory=dict)  # img2img: source -> image

    def to_dict(self) -> dict[str, Any]:
        def components(pairs: Iterable[tuple[str | None, Component | InitImage | None]]) -> list[list[Any]]:
            return [[k, v.to_dict() if v else None] for k, v in pairs]

        return {
            "models": [[k, m.to_dict()] for k, m in self.models.items()],
            "vaes": components(self.vaes.items()),
            "loras": components(self.loras.items()),
            "embeddings": components(self.embeddings.items()),
            "upscalers": components(self.upscalers.items()),
            "init_images": components(self.init_images.items()),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Components:
        def components(pairs: list[list[Any]]) -> dict[str, Component]:  # none is None: only found ones are kept
            return {k: Component.from_dict(v) for k, v in pairs}

        return cls(
            {k: ModelSpec.from_dict(m) for k, m in data["models"]},
            {k: Component.from_dict(v) if v else None for k, v in data["vaes"]},
            components(data["loras"]),
            components(data["embeddings"]),
            components(data.get("upscalers", [])),
            {k: InitImage.from_dict(v) for k, v in data.get("init_images", [])},
        )

    def identity(self) -> dict[str, dict[str, Any]]:
        return {
            "models": {k: m.identity() for k, m in self.models.items()},
            "vaes": {str(k): v.identity() if v else None for k, v in self.vaes.items()},
            "loras": {k: v.identity() for k, v in self.loras.items()},
            "embeddings": {k: v.identity() for k, v in self.embeddings.items()},
            "upscalers": {k: v.identity() for k, v in self.upscalers.items()},
            "init_images": {k: v.identity() for k, v in self.init_images.items()},
        }


@dataclass
class Plan:
    job: Job  # with random seeds drawn
    components: Components
    dtype: str  # concrete: float16 | bfloat16 | float32
    warnings: list[Problem] = field(default_factory=list)
    chunk_cells: int = 32

    @property
    def total(self) -> int:
        return self.job.cell_count()

    @property
    def models(self) -> list[ModelSpec]:
        return list(self.components.models.values())

    @property
    def model(self) -> ModelSpec:
        """The first model (the only one of a job without a model axis)."""
        return self.models[0]

    def cells(self) -> Iterator[Cell]:
        c = self.components
        values: dict[str, Sequence[object]] = {
            **self.job.grid_values(),
            "model": self.models,
            "dtype": [self.dtype],
            "vae": [c.vaes[v] for v in self.job.vae],
            "loras": [
                tuple(LoraUse(c.loras[path], w, w, c.loras[path].name) for path, w in combo)
                for combo in self.job.values_of("loras")
            ],
            "init_image": [c.init_images[s] if s else None for s in self.job.values_of("init_images")],
            "hires": self.job.hires.values(c.upscalers) if self.job.hires else [None],
        }
        return grid.expand(values, self.derivation().derive)

    def derivation(self) -> Derivation:
        """What completes each cell from its texts (a recorded plan replays what its submit derived)."""
        return Derivation(self.components)

    def chunks(self) -> Iterator[Chunk]:
        for cells in grid.chunked(self.cells(), self.chunk_cells):
            yield Chunk(grid.chunk_id(cells), cells)

    @cached_property
    def partition(self) -> str:
        """Names this exact split into chunks: the same job, components and chunk size give the same name."""
        canonical = {
            "version": EXPANSION_VERSION,
            "samplers": samplers.A1111_SEMANTICS,
            "values": {k: list(v) for k, v in self.job.grid_values().items() if k not in ("model", "dtype")},
            "components": self.components.identity(),
            "dtype": self.dtype,
            "chunk_cells": self.chunk_cells,
        }
        text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def store(self) -> Store:
        return open_store(self.job.output)

    def resolved(self) -> dict[str, Any]:
        """What a stored plan needs to expand again without the model files (finalize, export)."""
        return {
            "components": self.components.to_dict(),
            "dtype": self.dtype,
            "chunk_cells": self.chunk_cells,
            "partition": self.partition,
            "cells": self.total,
        }

    def keeping_chunks_of(self, earlier: dict[str, Any]) -> Plan:
        """This plan split as an earlier submission (its `resolved()`) split it, when nothing else changed.

        Chunk sizes follow the workers' measured rate, which moves between submits; a resubmit of the
        same job keeps its partition, so it finds that submission's progress records (no check of
        every cell) and chunks still running from it report where status looks.
        """
        size = int(earlier.get("chunk_cells", self.chunk_cells))
        if size == self.chunk_cells:
            return self
        same = replace(self, chunk_cells=size)
        return same if same.partition == earlier.get("partition") else self

    @classmethod
    def from_resolved(cls, job: Job, resolved: dict[str, Any]) -> Plan:
        return cls(job, Components.from_dict(resolved["components"]), resolved["dtype"], [], int(resolved["chunk_cells"]))


class Derivation:
    """What a cell's texts imply: LoRAs its prompt tags name, embeddings its texts trigger."""

    def __init__(self, components: Components):
        self.components = components
        # (prompt, negative prompt, search/replace, model) -> (LoRAs its tags name, embeddings its texts trigger)
        self.cache: dict[
            tuple[str, str, tuple[str, str] | None, ModelSpec], tuple[tuple[LoraUse, ...], tuple[Component, ...]]
        ] = {}

    def derive(self, slots: list[Any]) -> None:
        """Completes a cell's parameter slots (`grid.expand`'s order) with what its texts imply."""
        prompt, negative, sr = slots[_PROMPT], slots[_NEGATIVE], slots[_SR]
        key = (prompt, negative, sr, slots[_MODEL])
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) > DERIVED_TEXTS_KEPT:
                self.cache.clear()
            shown = search_replace(prompt, sr)
            tagged = tuple(LoraUse(self.components.loras[tag.name], tag.te, tag.unet, tag.name) for tag in lora_tags(shown))
            used = self.embeddings(prompt, negative, sr, slots[_MODEL])
            found = self.cache[key] = (tagged, used)
        tagged, used = found
        if tagged:  # applied first: the infotext writes the prompt's tags before the job's own LoRAs
            slots[_LORAS] = tagged + slots[_LORAS]
        slots[_EMBEDDINGS] = used

    def embeddings(self, prompt: str, negative: str, sr: tuple[str, str] | None, model: ModelSpec) -> tuple[Component, ...]:
        """The embeddings a cell's texts trigger."""
        texts = [encoder_text(prompt, sr), encoder_text(negative, sr)]
        return embeddings_used(texts, self.components.embeddings, model)


def embeddings_used(texts: list[str], embeddings: dict[str, Component], model: ModelSpec) -> tuple[Component, ...]:
    """The embeddings whose trigger word's tokens occur in the texts, as A1111 finds them."""
    if not embeddings:
        return ()
    tokenizer = tokenizer_for(model)
    if tokenizer is None:  # no tokenizer on this machine: whole words
        return tuple(
            e
            for word, e in sorted(embeddings.items())
            if any(re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", t) for t in texts)
        )
    ids = [ids for text in texts for ids in tokenizer.tokenize([text])]
    found = []
    for word, embedding in sorted(embeddings.items()):
        needle = tokenizer.tokenize([word])[0]
        if needle and any(_contains(hay, needle) for hay in ids):
            found.append(embedding)
    return tuple(found)


def _contains(hay: list[int], needle: list[int]) -> bool:
    first = needle[0]
    return any(hay[i : i + len(needle)] == needle for i, token in enumerate(hay) if token == first)


def describe(plan: Plan) -> list[str]:
    """What `validate` prints: the grid's size, each axis, each prompt's token and chunk counts."""
    models = ", ".join(_describe_model(m) for m in plan.models)
    lines = [f"job {plan.job.name}: {plan.total:,} cells, model {models}, output {plan.job.output}"]
    for axis, values in plan.job.axes().items():
        shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in list(values[:SHOWN_VALUES]))
        more = f", … ({len(values):,} in all)" if len(values) > SHOWN_VALUES else ""
        lines.append(f"  {axis:<16} {'varies' if len(values) > 1 else 'locked':<7} {shown}{more}")
    tokenizer = tokenizer_for(plan.model)
    if tokenizer is None:
        return [*lines, f"  token counts unavailable: no tokenizer for {plan.model.source} on this machine"]
    for key in ("prompts", "negative_prompt"):
        for sr in plan.job.values_of("prompt_sr"):
            for text in plan.job.values_of(key):
                encoding = tokenizer.encode(encoder_text(text, sr))
                chunks = len(encoding.chunks)
                lines.append(
                    f"  {key}: {encoding.token_count} tokens, {chunks} chunk{'s' if chunks > 1 else ''} "
                    f"of 75: {search_replace(text, sr)[:60]!r}"
                )
    return lines


def _describe_model(model: ModelSpec) -> str:
    if model.family != families.SDXL:
        what = f"{model.clip_layers} CLIP layers"
    else:
        what = f"SDXL, {'+'.join(str(n) for n in model.encoder_layers())} CLIP layers"
    if model.prediction == families.V_PREDICTION:
        what += ", v-prediction"
    if model.zero_terminal_snr:
        what += ", zero terminal SNR"
    return f"{model.source} ({what})"


def prepare(
    job: Job | str | Path,
    cuda: bool | None = None,
    settings: Settings | None = None,
    output: str | None = None,
    rate_of: RateOf | None = None,
) -> Plan:
    """Validate everything that can be checked before rendering; raise JobError if not.

    `cuda` says what `dtype: auto` means: True/False for a local run, None for a
    submit to workers whose devices we cannot see (then GRIDRENDER_AUTO_DTYPE).
    `output` replaces the job's output root (the CLI's --output). `rate_of(model, dtype)`:
    the workers' measured cells/s, which sizes chunks (`rates.chunk_size`; the slowest model's).
    """
    settings = settings or Settings()
    if not isinstance(job, Job):
        job = load_job(job, settings)
    job = job.with_output(output)
    notes: list[Problem] = []
    components = resolve_components(job, settings, notes)
    errors, warnings = check_passes(job), notes
    for model in components.models.values():
        more_errors, more_warnings = check_against_model(job, model)
        errors += more_errors
        warnings += more_warnings
    if errors:
        raise job.error(list(dict.fromkeys(errors)))
    warnings += check_axes(job)
    job = job.with_random_seeds_drawn()
    dtype = concrete_dtype(job.dtype, cuda, settings)
    size = chunk_size(job.cell_count(), settings, *measured_rate(job, components, dtype, rate_of))
    return Plan(job, components, dtype, list(dict.fromkeys(warnings)), size)


def measured_rate(job: Job, components: Components, dtype: str, rate_of: RateOf | None) -> tuple[float | None, float]:
    """(the slowest model's measured work/s, or None if any model has none yet; the job's costliest cell)."""
    values = job.grid_values()
    hires = job.hires.values(components.upscalers) if job.hires else [None]
    work = max(
        cell_work(size, steps, denoise, h)
        for size in values["size"]
        for steps in values["steps"]
        for denoise in values["denoise"]
        for h in hires
    )
    rates = [rate_of(m, dtype) for m in components.models.values()] if rate_of else [None]
    return (None if None in rates else min(r for r in rates if r is not None)), work


def resolve_components(job: Job, settings: Settings, notes: list[Problem] | None = None) -> Components:
    """Every model, VAE, LoRA (listed or tagged) and embedding of the job; all problems at once.

    `notes` receives warnings: the LoRA keys A1111 would not match, the layers it leaves alone.
    """
    resolver = _Resolver(job, settings, notes)
    resolved_models = resolver.models()
    first = next(iter(resolved_models.values()))
    vaes = resolver.vaes(first)
    loras = resolver.loras(list(resolved_models.values()))
    if any(_has_lora_tag(n) for n in job.negative_prompt):
        resolver.problems.append(job.problem("negative_prompt", "<lora:…> tags go in the prompt, not the negative prompt"))
    embeddings = resolver.attempt("embeddings", resolve_embeddings, job.embeddings, first, settings) if job.embeddings else {}
    upscalers = resolver.upscalers()
    init_images = {
        source: resolver.attempt(f"init_images.{i}", resolve_init_image, source) for i, source in enumerate(job.init_images or [])
    }
    if resolver.problems:
        raise job.error(list(dict.fromkeys(resolver.problems)))
    return Components(resolved_models, vaes, _found(loras), embeddings or {}, _found(upscalers), _found(init_images))


class _Resolver:
    """Resolves a job's components one key at a time, collecting each problem on its key rather than stopping."""

    def __init__(self, job: Job, settings: Settings, notes: list[Problem] | None):
        self.job, self.settings, self.notes = job, settings, notes
        self.problems: list[Problem] = []
        self.said: list[str] = []  # what resolve_lora noted, in order; `notes` gets each on its key

    def attempt(self, key: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """fn's result, or None with its ModelError a problem on `key`."""
        try:
            return fn(*args, **kwargs)
        except ModelError as exc:
            self.problems.append(self.job.problem(key, str(exc)))
            return None

    def models(self) -> dict[str, ModelSpec]:
        """Job-file source -> model, with the job's prediction settings; any model not found ends here."""
        job = self.job
        found = {
            source: self.attempt(
                f"model.{i}" if len(job.model) > 1 else "model", models.resolve, source, job.revision, self.settings
            )
            for i, source in enumerate(job.model)
        }
        if self.problems:
            raise job.error(self.problems)
        return {k: with_job_prediction(v, job) for k, v in found.items() if v is not None}

    def vaes(self, first: ModelSpec) -> dict[str | None, Component | None]:
        vaes: dict[str | None, Component | None] = {None: None}
        for i, source in enumerate(self.job.vae):
            if source is not None:
                key = f"vae.{i}" if len(self.job.vae) > 1 else "vae"
                vaes[source] = self.attempt(key, resolve_vae, source, first, self.settings)
        return vaes

    def lora(self, key: str, source: str, model: ModelSpec) -> Component | None:
        before = len(self.said)
        found = self.attempt(key, resolve_lora, source, model, self.settings, self.said)
        if self.notes is not None:
            self.notes.extend(self.job.problem(key, note) for note in self.said[before:])
        return found

    def loras(self, resolved_models: list[ModelSpec]) -> dict[str, Component | None]:
        """The `loras:` list's, then those the prompts' <lora:NAME:W> tags name; each checked against every model."""
        loras: dict[str, Component | None] = {}
        for i, entry in enumerate(self.job.loras):
            for model in resolved_models:
                loras[entry.path] = self.lora(f"loras.{i}.path", entry.path, model)
        listed = {found.name for found in loras.values() if found is not None}  # named as the infotext's tags name them
        for tags in self.prompt_tags(listed):
            for tag in tags:
                if tag.name not in loras:
                    for model in resolved_models:
                        loras[tag.name] = self.lora("prompts", tag.name, model)
        return loras

    def prompt_tags(self, listed: set[str]) -> Iterator[list[LoraTag]]:
        """Each prompt's LoRA tags; one that cannot be read, or names a LoRA twice, is a problem."""
        for sr in self.job.values_of("prompt_sr"):
            for text in self.job.values_of("prompts"):
                try:
                    tags = lora_tags(search_replace(text, sr))
                except ValueError as exc:
                    self.problems.append(self.job.problem("prompts", str(exc)))
                    continue
                if twice := _named_twice(tags, listed):
                    self.problems.append(self.job.problem("prompts", twice))
                yield tags

    def upscalers(self) -> dict[str, Component | None]:
        """Hires upscalers that are model files (the others are built in)."""
        names = self.job.hires.upscaler if self.job.hires else []
        return {
            name: self.attempt(f"hires.upscaler.{i}", resolve_upscaler, name, self.settings)
            for i, name in enumerate(names)
            if hires.is_model_file(name)
        }


def _found(resolved: dict[Key, T | None]) -> dict[Key, T]:
    """The entries that resolved (those that did not are problems, raised before this is used)."""
    return {k: v for k, v in resolved.items() if v is not None}


def _named_twice(tags: list[LoraTag], listed: set[str]) -> str | None:
    """Why a prompt names a LoRA A1111 would apply differently than written, or None.

    A1111 loads one network per name (networks.load_networks): a name's every mention applies
    with its last mention's weights, so `<lora:x:0.5> <lora:x:1>` is x twice at 1.
    """
    names = [tag.name for tag in tags]
    for tag in tags:
        if names.count(tag.name) > 1:
            return (
                f"{tag.written}: LoRA {tag.name!r} is named twice in the prompt; A1111 would apply it twice "
                "with the last tag's weights: name each LoRA once"
            )
        if tag.name in listed:
            return (
                f"{tag.written}: LoRA {tag.name!r} is also in `loras:`; A1111 would apply it twice with one "
                "mention's weights: name each LoRA in one place"
            )
    return None


def _has_lora_tag(text: str) -> bool:
    try:
        return bool(lora_tags(text))
    except ValueError:
        return True


def with_job_prediction(model: ModelSpec, job: Job) -> ModelSpec:
    """The model with the job's `prediction:` and `noise_schedule:` over what its files say."""
    found = families.Prediction(model.prediction, model.zero_terminal_snr)
    return model.with_prediction(families.overridden(found, job.prediction, job.noise_schedule))


def check_output(plan: Plan) -> Store:
    """Open the job's output store, turning a bad root into an input error."""
    try:
        return plan.store()
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001  (boto3 and the filesystem raise many types for a bad root: each is bad `output`)
        raise plan.job.error([plan.job.problem("output", str(exc))]) from None


def check_axes(job: Job) -> list[Problem]:
    """Warnings for a comparison that varies what its sheets do not lay out.

    Two negative prompts sneaking in through a list, say, would otherwise put
    different conditions side by side under one label.
    """
    layout = (job.sheet or SheetLayout()).model_dump()
    warnings = []
    for axis, values in job.axes().items():
        if len(values) > 1 and axis not in layout.values():
            warnings.append(
                job.problem(
                    AXES[axis].key,
                    f"{axis} varies ({len(values)} values) but is not a sheet axis "
                    f"(rows: {layout['rows']}, cols: {layout['cols']}, pages: {layout['pages']}); "
                    "each of its values gets separate sheets. Declare it with `sheet:` if that is intended.",
                )
            )
    return warnings


def check_against_model(job: Job, model: ModelSpec) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) that need the model: CLIP skip must lie within 1..L (SDXL: of both encoders)."""
    errors, warnings = [], []
    top = model.max_clip_skip
    layers = "+".join(str(n) for n in model.encoder_layers())
    for skip in job.clip_skip:
        if skip > top:
            errors.append(job.problem("clip_skip", f"{skip} is outside 1..{top} ({model.source} has {layers} CLIP layers)"))
        elif skip > USUAL_MAX_CLIP_SKIP:
            warnings.append(
                job.problem("clip_skip", f"{skip} skips {skip - 1} of {layers} layers; images tend to look under-guided beyond 2")
            )
    if model.family == families.SDXL and {1, 2} <= set(job.clip_skip):
        warnings.append(
            job.problem(
                "clip_skip",
                f"1 and 2 are one cell on {model.source} (SDXL): both read the "
                "penultimate layer of both text encoders, as SDXL was trained; its images "
                "are rendered once and shown under both",
            )
        )
    return errors, warnings


def check_passes(job: Job) -> list[Problem]:
    """Hires fix and img2img run A1111's samplers, on sizes the VAE can encode and decode."""
    if job.hires is None and job.init_images is None:
        return []
    key = "hires" if job.hires is not None else "init_images"
    problems = [
        job.problem("sampler", f"{name!r} is a diffusers class; {key} runs A1111's samplers (A1111 names)")
        for name in job.sampler
        if samplers.split_name(name)[0].family != "a1111"
    ]
    for setting in job.hires.values() if job.hires else []:
        for width, height in job.sizes:
            target = setting.target(width, height)
            if target.width % 8 or target.height % 8 or min(target.final) <= 0:
                problems.append(
                    job.problem(
                        "hires",
                        f"{width}x{height} upscaled by {setting.label()} is "
                        f"{target.width}x{target.height}: both sides must be multiples of 8",
                    )
                )
    return problems
