"""`gridrender run`: render a job's missing cells in this process, no broker."""
from __future__ import annotations

from typing import Callable

from gridrender.scheduler import grid
from gridrender.scheduler.plan import Plan
from gridrender.scheduler.storage import Store

from .chunk import ChunkResult, Writer, render_and_store
from .render import Renderer

LOCAL_CHUNK = 256  # cells whose prompts are encoded together


def run_plan(
    plan: Plan,
    store: Store,
    renderer: Renderer | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> ChunkResult:
    renderer = renderer or Renderer()
    total = ChunkResult()
    writer = Writer()
    try:
        for cells in grid.split(plan.missing(store), LOCAL_CHUNK):
            result = render_and_store(renderer, writer, store, plan.model, cells, plan.job.batch_size, plan.job.name, on_batch)
            total.rendered += result.rendered
            total.stored += result.stored
            total.present += result.present
            total.failed.update(result.failed)
            total.oom_splits += result.oom_splits
            total.encoder_passes += result.encoder_passes
    finally:
        writer.close()
    return total
