"""`gridrender run`: render a job's missing cells in this process, no broker."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from scheduler import grid
from scheduler.errors import GridrenderError
from scheduler.plan import Plan
from scheduler.storage import Store

from .records import save
from .render import Renderer

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    rendered: int = 0
    skipped: int = 0  # already in storage when their turn came
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error


def run_plan(
    plan: Plan,
    store: Store,
    renderer: Renderer | None = None,
    on_batch: Callable[[int], None] = lambda n: None,
) -> RunResult:
    renderer = renderer or Renderer()
    result = RunResult()
    for batch in grid.batches(plan.missing(store), plan.job.batch_size):
        try:
            for rendered in renderer.render(plan.model, batch):
                if save(store, rendered, plan.model, renderer.device, plan.job.name, len(batch)):
                    result.rendered += 1
                else:
                    result.skipped += 1
        except (GridrenderError, RuntimeError, ValueError) as exc:
            # One bad batch (say, out of memory) must not cost the rest of an overnight run.
            log.error("batch of %d cells failed: %s", len(batch), exc)
            result.failed.update({cell.id: f"{type(exc).__name__}: {exc}" for cell in batch})
        on_batch(len(batch))
    return result
