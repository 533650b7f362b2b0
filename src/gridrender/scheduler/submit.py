"""Fan-out: the job's incomplete chunks become task messages on a queue a worker consumes.

Streams: chunks are expanded, checked and sent a window at a time, so a
million-cell job never sits in memory. A chunk whose progress record says it is
complete is skipped without a storage request; the cells of the others are checked
one by one on a resubmit (cost bounded by the incomplete chunks), and on a first
submit of a big job the workers check them instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from celery import Celery

from . import finalize, liveness, progress, submissions
from .broker import RENDER_TASK, SHARED_QUEUE, model_queue, reaching_broker
from .messages import ChunkMessage
from .models import ModelSpec
from .plan import Plan
from .settings import Settings
from .storage import Store


@dataclass
class Submitted:
    submission: str
    queues: dict[str, int]  # queue -> live workers consuming it (-1: unknown, the broker is not Redis)
    cells: int  # cells enqueued
    chunks: int  # chunks enqueued
    already_done: int  # cells found stored
    total: int

    @property
    def queue(self) -> str:
        return ", ".join(self.queues)

    @property
    def idle_queues(self) -> list[str]:
        return [q for q, n in self.queues.items() if n == 0]


class Router:
    """A model's queue if a worker listens on it, else the shared queue every worker consumes."""

    def __init__(self, queue: str | None, settings: Settings):
        self.queue = queue
        client = liveness.connect(settings)
        self.consumers: dict[str, int] | None = None
        if client is not None:
            with reaching_broker("list the workers"):
                self.consumers = liveness.consumed_queues(client)

    def __call__(self, model: ModelSpec) -> str:
        if self.queue:
            return self.queue
        own = model_queue(model)
        if self.consumers is None or self.consumers.get(own):
            return own
        return SHARED_QUEUE

    def count(self, queue: str) -> int:
        return -1 if self.consumers is None else self.consumers.get(queue, 0)


def submit(plan: Plan, store: Store, app: Celery, queue: str | None = None, settings: Settings | None = None) -> Submitted:
    settings = settings or Settings()
    name, partition = plan.job.name, plan.partition
    # One producer (one connection, one channel) for every message: per-call connection
    # checkout is what makes naive fan-out slow. An unreachable broker fails here, before
    # anything is written.
    with reaching_broker("enqueue"), app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=2)
        route = Router(queue, settings)
        used: dict[str, int] = {}
        check_each = progress.worth_checking(store, plan, settings)
        record = submissions.Submission(submissions.new_id(), "broker", None, plan.total, 0, 0, 0, 0,
                                        plan.resolved(), time.time())
        finalize.write_job(store, plan)
        submissions.write(store, name, record)
        for chunk, missing in progress.pending(plan, store, check_each, record.id):
            record.chunks += 1
            if not missing:
                continue
            record.enqueued_cells += len(missing)
            record.enqueued_chunks += 1
            message = ChunkMessage(name, record.id, plan.job.output, plan.job.batch_size, partition, chunk.id,
                                   missing, len(chunk.cells) - len(missing)).to_message()
            target = route(chunk.cells[0].model)
            used[target] = route.count(target)
            # argsrepr given: Celery would otherwise build a repr of every message for its logs.
            app.send_task(RENDER_TASK, args=[message], queue=target, producer=producer,
                          argsrepr=f"[chunk {chunk.id} of {name}: {len(missing)} cells]", kwargsrepr="{}")
        record.already_stored = plan.total - record.enqueued_cells
        record.queue = ", ".join(used) or None
        submissions.write(store, name, record)
    return Submitted(record.id, used or {route(plan.model): route.count(route(plan.model))}, record.enqueued_cells,
                     record.enqueued_chunks, record.already_stored, plan.total)
