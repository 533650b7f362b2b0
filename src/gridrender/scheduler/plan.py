"""From a job file to its cells and chunks: parse, resolve the model, expand as a stream.

A plan never holds a job's cells: `cells()` and `chunks()` expand them anew each
time, so a million-cell job costs memory for one chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from . import families, grid, samplers
from .components import LoraUse
from .derivation import Derivation
from .errors import JobError, Problem
from .grid import Cell
from .job import Job, SheetLayout
from .jobfile import load_job
from .models import ModelSpec
from .params import AXES
from .prompts import encoder_text, search_replace
from .rates import RateOf, cell_work, chunk_size
from .resolution import Components, resolve_components
from .settings import Settings, concrete_dtype
from .storage import Store
from .stores import open_store
from .tokens import tokenizer_for

# Bump when expansion or chunking changes: chunk ids (and so progress records) follow it.
EXPANSION_VERSION = 1
SHOWN_VALUES = 8  # values of an axis `validate` prints; more are counted
USUAL_MAX_CLIP_SKIP = 2  # beyond it images tend to look under-guided: a warning, not an error


@dataclass(frozen=True)
class Chunk:
    """A run of cells that share call parameters: one task message, one progress record."""

    id: str
    cells: list[Cell]


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
