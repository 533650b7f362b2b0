"""From a job file to its cells and chunks: parse, resolve the model, expand as a stream.

A plan never holds a job's cells: `cells()` and `chunks()` expand them anew each
time, so a million-cell job costs memory for one chunk at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import grid, models, samplers
from .errors import JobError, ModelError, Problem
from .grid import Cell
from .job import Job, SheetLayout, load_job
from .models import ModelSpec
from .params import AXES
from .settings import Settings, concrete_dtype
from .storage import Store, open_store

# Bump when expansion or chunking changes: chunk ids (and so progress records) follow it.
EXPANSION_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    """A run of cells that share call parameters: one task message, one progress record."""

    id: str
    cells: list[Cell]


@dataclass
class Plan:
    job: Job  # with random seeds drawn
    model: ModelSpec
    dtype: str  # concrete: float16 | bfloat16 | float32
    warnings: list[Problem] = field(default_factory=list)
    chunk_cells: int = 32

    @property
    def total(self) -> int:
        return self.job.cell_count()

    def cells(self) -> Iterator[Cell]:
        values: dict[str, Sequence] = {**self.job.grid_values(), "model": [self.model], "dtype": [self.dtype]}
        return grid.expand(values)

    def chunks(self) -> Iterator[Chunk]:
        for cells in grid.chunked(self.cells(), self.chunk_cells):
            yield Chunk(grid.chunk_id(cells), cells)

    @cached_property
    def partition(self) -> str:
        """Names this exact split into chunks: the same job, model and chunk size give the same name."""
        canonical = {
            "version": EXPANSION_VERSION,
            "samplers": samplers.A1111_SEMANTICS,
            "values": {k: list(v) for k, v in self.job.grid_values().items() if k not in ("model", "dtype")},
            "model": self.model.identity(),
            "dtype": self.dtype,
            "chunk_cells": self.chunk_cells,
        }
        text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def store(self) -> Store:
        return open_store(self.job.output)

    def resolved(self) -> dict:
        """What a stored plan needs to expand again without the model files (finalize, export)."""
        return {"model": self.model.to_dict(), "dtype": self.dtype, "chunk_cells": self.chunk_cells,
                "partition": self.partition, "cells": self.total}

    @classmethod
    def from_resolved(cls, job: Job, resolved: dict) -> Plan:
        return cls(job, ModelSpec.from_dict(resolved["model"]), resolved["dtype"], [], int(resolved["chunk_cells"]))


def chunk_size(total: int, settings: Settings) -> int:
    """Cells per chunk: the configured size, grown so that a job has at most `max_chunks` chunks."""
    return max(settings.chunk_cells, math.ceil(total / settings.max_chunks))


def prepare(job: Job | str | Path, cuda: bool | None = None, settings: Settings | None = None,
            output: str | None = None) -> Plan:
    """Validate everything that can be checked before rendering; raise JobError if not.

    `cuda` says what `dtype: auto` means: True/False for a local run, None for a
    submit to workers whose devices we cannot see (then GRIDRENDER_AUTO_DTYPE).
    `output` replaces the job's output root (the CLI's --output).
    """
    settings = settings or Settings()
    if not isinstance(job, Job):
        job = load_job(job, settings)
    job = job.with_output(output)
    try:
        model = models.resolve(job.model, job.revision, settings)
    except ModelError as exc:
        raise job.error([job.problem("model", str(exc))]) from None
    errors, warnings = check_against_model(job, model)
    if errors:
        raise job.error(errors)
    warnings += check_axes(job)
    job = job.with_random_seeds_drawn()
    dtype = concrete_dtype(job.dtype, cuda, settings)
    return Plan(job, model, dtype, warnings, chunk_size(job.cell_count(), settings))


def check_output(plan: Plan) -> Store:
    """Open the job's output store, turning a bad root into an input error."""
    try:
        return plan.store()
    except JobError:
        raise
    except Exception as exc:  # e.g. a malformed s3:// URL
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
            warnings.append(job.problem(
                AXES[axis].key, f"{axis} varies ({len(values)} values) but is not a sheet axis "
                f"(rows: {layout['rows']}, cols: {layout['cols']}, pages: {layout['pages']}); "
                "each of its values gets separate sheets. Declare it with `sheet:` if that is intended."))
    return warnings


def check_against_model(job: Job, model: ModelSpec) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) that need the model: CLIP skip must lie within 1..L."""
    errors, warnings = [], []
    for skip in job.clip_skip:
        if skip > model.clip_layers:
            errors.append(job.problem("clip_skip", f"{skip} is outside 1..{model.clip_layers} "
                                      f"({model.source} has {model.clip_layers} CLIP layers)"))
        elif skip > 2:
            warnings.append(job.problem("clip_skip", f"{skip} skips {skip - 1} of {model.clip_layers} layers; "
                                        "images tend to look under-guided beyond 2"))
    return errors, warnings
