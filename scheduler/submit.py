"""Fan-out: the missing cells of a plan become chunk messages on the model's queue."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from celery import Celery

from . import finalize
from .broker import RENDER_TASK
from .chunks import Chunk, queue_for
from .grid import split
from .plan import Plan
from .settings import Settings
from .status import cancelled_submissions, current_submission
from .storage import Store, job_key


@dataclass
class Submitted:
    submission: str
    queue: str
    cells: int  # cells enqueued
    chunks: int
    already_done: int


def submit(plan: Plan, store: Store, app: Celery, queue: str | None = None, settings: Settings | None = None) -> Submitted:
    settings = settings or Settings()
    done = store.done_cells()
    missing = [c for c in plan.cells if c.id not in done]
    submission = uuid.uuid4().hex[:16]
    queue = queue or queue_for(plan.model)
    chunks = split(missing, settings.chunk_cells)
    # One producer (one connection, one channel) for every message: per-call
    # connection checkout is what makes naive fan-out slow.
    with app.producer_or_acquire() as producer:
        if chunks:  # an unreachable broker fails here, before anything is written
            producer.connection.ensure_connection(max_retries=2)
        finalize.write_job(store, plan, done=done)
        store.put(
            job_key(plan.job.name, "submission.json"),
            json.dumps({"submission": submission, "queue": queue, "cells": len(missing), "at": time.time()}).encode(),
            "application/json",
        )
        for cells in chunks:
            message = Chunk(plan.job.name, submission, plan.job.output, plan.job.batch_size, plan.model, cells).to_message()
            # argsrepr given: Celery would otherwise build a repr of every message for its logs.
            app.send_task(RENDER_TASK, args=[message], queue=queue, producer=producer,
                          argsrepr=f"[chunk of {plan.job.name}: {len(cells)} cells]", kwargsrepr="{}")
    return Submitted(submission, queue, len(missing), len(chunks), len(plan.cells) - len(missing))


def cancel(store: Store, name: str) -> str | None:
    """Mark the job's current submission cancelled: workers drop its pending chunks."""
    current = current_submission(store, name)
    if current is None:
        return None
    cancelled = cancelled_submissions(store, name) | {current}
    store.put(job_key(name, "cancelled.json"), json.dumps(sorted(cancelled)).encode(), "application/json")
    return current
