"""Expanding a job into cells, naming cells by content, grouping them into calls."""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import samplers
from .errors import Problem
from .job import Job, SheetLayout
from .models import ModelSpec

CELL_ID_HEX = 16  # 64 bits: a collision among 10^6 cells has odds of about 1 in 3.7e7
PARAM_KEYS = ("model", "prompt", "negative_prompt", "clip_skip", "seed", "sampler", "steps", "guidance", "width", "height", "dtype")


@dataclass(frozen=True)
class Cell:
    """One image: everything that changes its pixels, apart from the model."""

    id: str
    prompt: str
    negative_prompt: str
    clip_skip: int
    seed: int
    sampler: str
    steps: int
    guidance: float
    width: int
    height: int
    dtype: str

    def params(self, model: ModelSpec) -> dict:
        """The cell's parameters under the job file's own key names."""
        # Written out rather than dataclasses.asdict: this runs once per cell on submit.
        return {
            "model": model.source, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
            "clip_skip": self.clip_skip, "seed": self.seed, "sampler": self.sampler, "steps": self.steps,
            "guidance": self.guidance, "width": self.width, "height": self.height, "dtype": self.dtype,
        }

    def call_key(self) -> tuple:
        """Cells with equal keys can share one pipeline call."""
        return (self.sampler, self.steps, self.guidance, self.width, self.height, self.dtype)


def cell_id(model: ModelSpec, **params) -> str:
    canonical = json.dumps({"model": model.identity(), **params}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:CELL_ID_HEX]


def make_cell(model: ModelSpec, **params) -> Cell:
    return Cell(id=cell_id(model, **params), **params)


def resolve_dtype(requested: str, cuda: bool) -> str:
    """`auto` is fp16 on CUDA and fp32 elsewhere; the cell id holds the concrete dtype."""
    if requested != "auto":
        return requested
    return "float16" if cuda else "float32"


def check_axes(job: Job) -> list[Problem]:
    """Warnings for a comparison that varies what its sheets do not lay out.

    Two negative prompts sneaking in through a list, say, would otherwise put
    different conditions side by side under one label.
    """
    layout = (job.sheet or SheetLayout()).model_dump()
    warnings = []
    for axis, values in job.axes().items():
        if len(values) > 1 and axis not in layout.values():
            key = {"prompt": "prompts", "seed": "seeds"}.get(axis, axis)
            warnings.append(job.problem(
                key, f"{axis} varies ({len(values)} values) but is not a sheet axis "
                f"(rows: {layout['rows']}, cols: {layout['cols']}, pages: {layout['pages']}); "
                "each of its values gets separate sheets. Declare it with `sheet:` if that is intended."))
    return warnings


def check_against_model(job: Job, model: ModelSpec) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) that need the model: CLIP skip must lie within 1..L."""
    errors, warnings = [], []
    for skip in job.clip_skip:
        if skip > model.clip_layers:
            errors.append(job.problem("clip_skip", f"{skip} is outside 1..{model.clip_layers} ({model.source} has {model.clip_layers} CLIP layers)"))
        elif skip > 2:
            warnings.append(job.problem("clip_skip", f"{skip} skips {skip - 1} of {model.clip_layers} layers; images tend to look under-guided beyond 2"))
    return errors, warnings


def expand(job: Job, model: ModelSpec, dtype: str) -> Iterator[Cell]:
    """Every cell of the job, in a stable order: prompt outermost, seed innermost."""
    for prompt, negative, sampler, steps, guidance, (width, height), skip, seed in itertools.product(
        job.prompts, job.negative_prompt, job.sampler, job.steps, job.guidance, job.sizes, job.clip_skip, job.seed_list
    ):
        yield make_cell(
            model,
            prompt=prompt,
            negative_prompt=negative,
            clip_skip=skip,
            seed=seed,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            dtype=dtype,
        )


def by_call(cells: Iterable[Cell]) -> list[list[Cell]]:
    """Cells grouped by call parameters, groups and cells in first-seen order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.call_key(), []).append(cell)
    return list(groups.values())


def split(cells: list[Cell], size: int) -> list[list[Cell]]:
    """Runs of at most `size` cells that share call parameters."""
    return [group[i : i + size] for group in by_call(cells) for i in range(0, len(group), size)]


def batches(cells: Iterable[Cell], batch_size: int) -> list[list[Cell]]:
    """Groups of at most `batch_size` cells that one pipeline call can render together.

    Cells keep their order inside a group, so a prompt's CLIP skips and seeds stay
    side by side and share one text-encoder pass.
    """
    out = []
    for group in by_call(cells):
        size = batch_size if samplers.lookup(group[0].sampler).batch_invariant else 1
        out.extend(group[i : i + size] for i in range(0, len(group), size))
    return out
