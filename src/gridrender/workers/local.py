"""`gridrender run`: render a job's missing cells in this process, no broker.

The same files as a distributed run: job.yaml, a submission record, a progress
record per chunk, then the manifest, sheets and gallery; so `status`, `finalize`
and a later `submit` of the same job all see what `run` did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gridrender.scheduler import finalize
from gridrender.scheduler.job import Job
from gridrender.scheduler.ledger import Ledger
from gridrender.scheduler.plan import Plan, check_output, prepare
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.storage import Store

from .chunk import ChunkJob, ChunkResult, Writer, render_and_store
from .render import Renderer


@dataclass
class Started:
    plan: Plan
    store: Store
    todo: int  # cells to render (as far as storage told before rendering)
    submission: str  # this run's record in the job's ledger


@dataclass
class RunResult:
    started: Started
    chunk: ChunkResult
    finalized: finalize.Finalized
    interrupted: bool = False  # Ctrl-C: what was stored is kept, finalized, and skipped next time


def start(
    job: Job | str | Path, output: str | None = None, renderer: Renderer | None = None, settings: Settings | None = None
) -> tuple[Started, Renderer]:
    """Validate, open the output and count what is missing; nothing is rendered yet."""
    settings = settings or Settings()
    renderer = renderer or Renderer()
    plan = prepare(job, cuda=renderer.device.type == "cuda", settings=settings, output=output)
    store = check_output(plan)
    with Ledger(store, plan.job.name, settings) as ledger:
        check_each = ledger.worth_checking(plan)
        record = ledger.begin(plan, "local")
        todo = sum(len(missing) for _, missing in ledger.pending(plan, check_each, record.id))
        record.enqueued_cells, record.already_stored = todo, plan.total - todo
        ledger.update(record)
    return Started(plan, store, todo, record.id), renderer


def render_missing(started: Started, renderer: Renderer, on_batch: Callable[[int], None] = lambda _: None) -> ChunkResult:
    """Render every chunk not yet complete, writing a progress record after each."""
    plan, store = started.plan, started.store
    total = ChunkResult()
    writer = Writer()
    try:
        with Ledger(store, plan.job.name) as ledger:
            for chunk, missing in ledger.pending(plan, False, started.submission):
                if not missing:
                    continue
                work = ChunkJob(plan.job.name, chunk.cells[0].model, chunk.cells, plan.job.batch_size)
                result = render_and_store(renderer, writer, store, work, on_batch=on_batch)
                ledger.record(plan.partition, chunk.id, result.stored, result.present, result.failed, started.submission, "run")
                total.add(result)
    finally:
        writer.close()
    return total


def finish(
    started: Started, renderer: Renderer, on_batch: Callable[[int], None] = lambda _: None, settings: Settings | None = None
) -> RunResult:
    """Render what is missing, then write manifest, sheets and gallery (also after Ctrl-C)."""
    interrupted = False
    result = ChunkResult()
    try:
        if started.todo:
            result = render_missing(started, renderer, on_batch)
    except KeyboardInterrupt:
        interrupted = True
    done = finalize.finalize(started.store, started.plan.job.name, settings)
    return RunResult(started, result, done, interrupted)


def run_job(
    job: Job | str | Path,
    output: str | None = None,
    renderer: Renderer | None = None,
    on_batch: Callable[[int], None] = lambda _: None,
    settings: Settings | None = None,
) -> RunResult:
    """Render the job's missing cells here, then write manifest, sheets and gallery."""
    started, renderer = start(job, output, renderer, settings)
    return finish(started, renderer, on_batch, settings)
