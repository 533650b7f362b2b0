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
from .plan import Plan
from .settings import Settings
from .storage import Store


@dataclass
class Submitted:
    submission: str
    queue: str
    cells: int  # cells enqueued
    chunks: int  # chunks enqueued
    already_done: int  # cells found stored
    total: int
    consumers: int  # live workers consuming the queue (-1: unknown, the broker is not Redis)


def route(plan: Plan, queue: str | None, settings: Settings) -> tuple[str, int]:
    """The model's queue if a worker listens on it, else the shared queue every worker consumes."""
    client = liveness.connect(settings)
    if client is None:
        return queue or model_queue(plan.model), -1
    with reaching_broker("list the workers"):
        consumers = liveness.consumed_queues(client)
    if queue:
        return queue, consumers.get(queue, 0)
    own = model_queue(plan.model)
    if consumers.get(own):
        return own, consumers[own]
    return SHARED_QUEUE, consumers.get(SHARED_QUEUE, 0)


def submit(plan: Plan, store: Store, app: Celery, queue: str | None = None, settings: Settings | None = None) -> Submitted:
    settings = settings or Settings()
    name, partition = plan.job.name, plan.partition
    # One producer (one connection, one channel) for every message: per-call connection
    # checkout is what makes naive fan-out slow. An unreachable broker fails here, before
    # anything is written.
    with reaching_broker("enqueue"), app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=2)
        target, consumers = route(plan, queue, settings)
        check_each = progress.worth_checking(store, plan, settings)
        record = submissions.Submission(submissions.new_id(), "broker", target, plan.total, 0, 0, 0, 0,
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
            # argsrepr given: Celery would otherwise build a repr of every message for its logs.
            app.send_task(RENDER_TASK, args=[message], queue=target, producer=producer,
                          argsrepr=f"[chunk {chunk.id} of {name}: {len(missing)} cells]", kwargsrepr="{}")
        record.already_stored = plan.total - record.enqueued_cells
        submissions.write(store, name, record)
    return Submitted(record.id, target, record.enqueued_cells, record.enqueued_chunks, record.already_stored,
                     plan.total, consumers)
