"""From a job file to the list of cells to render: parse, resolve the model, expand."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import grid, models
from .errors import JobError, ModelError, Problem
from .grid import Cell
from .job import Job, load_job
from .models import ModelSpec
from .settings import Settings
from .storage import Store, open_store


@dataclass
class Plan:
    job: Job  # with random seeds drawn
    model: ModelSpec
    dtype: str  # concrete: float16 | bfloat16 | float32
    cells: list[Cell]
    warnings: list[Problem] = field(default_factory=list)

    def store(self) -> Store:
        return open_store(self.job.output)

    def missing(self, store: Store) -> list[Cell]:
        done = store.done_cells()
        return [c for c in self.cells if c.id not in done]


def prepare(job: Job | str | Path, cuda: bool | None = None, settings: Settings | None = None) -> Plan:
    """Validate everything that can be checked before rendering; raise JobError if not.

    `cuda` says what `dtype: auto` means: True/False for a local run, None for a
    submit to workers whose devices we cannot see (then GRIDRENDER_AUTO_DTYPE).
    """
    settings = settings or Settings()
    if not isinstance(job, Job):
        job = load_job(job, settings)
    try:
        model = models.resolve(job.model, job.revision, settings)
    except ModelError as exc:
        raise job.error([job.problem("model", str(exc))]) from None
    errors, warnings = grid.check_against_model(job, model)
    if errors:
        raise job.error(errors)
    warnings += grid.check_axes(job)
    job = job.with_random_seeds_drawn()
    dtype = grid.resolve_dtype(job.dtype, cuda) if cuda is not None else (
        job.dtype if job.dtype != "auto" else settings.auto_dtype
    )
    cells = list(grid.expand(job, model, dtype))
    return Plan(job, model, dtype, cells, warnings)


def check_output(plan: Plan) -> Store:
    """Open the job's output store, turning a bad root into an input error."""
    try:
        return plan.store()
    except JobError:
        raise
    except Exception as exc:  # e.g. a malformed s3:// URL
        raise plan.job.error([plan.job.problem("output", str(exc))]) from None
