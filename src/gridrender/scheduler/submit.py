"""Fan-out: the job's incomplete chunks become task messages on a queue a worker consumes.

Streams: chunks are expanded, checked and sent a window at a time, so a
million-cell job never sits in memory. A chunk whose progress record says it is
complete is skipped without a storage request; the cells of the others are checked
one by one on a resubmit (cost bounded by the incomplete chunks), and on a first
submit of a big job the workers check them instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from celery import Celery

from . import liveness
from .broker import RENDER_TASK, SHARED_QUEUE, model_queue, reaching_broker
from .ledger import KillCounts, Ledger, new_id
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
    name = plan.job.name
    # One producer (one connection, one channel) for every message: per-call connection
    # checkout is what makes naive fan-out slow. An unreachable broker fails here, before
    # anything is written.
    with reaching_broker("enqueue"), app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=2)
        route = Router(queue, settings)
        used: dict[str, int] = {}
        with Ledger(store, name, settings) as ledger:
            earlier = ledger.latest()
            if earlier is not None:
                plan = plan.keeping_chunks_of(earlier.resolved)
            partition = plan.partition
            check_each = ledger.worth_checking(plan)
            record = ledger.begin(plan, "broker")
            for chunk, missing in ledger.pending(plan, check_each, record.id):
                record.chunks += 1
                if not missing:
                    continue
                record.enqueued_cells += len(missing)
                record.enqueued_chunks += 1
                message = ChunkMessage(
                    name,
                    record.id,
                    plan.job.output,
                    plan.job.batch_size,
                    partition,
                    chunk.id,
                    missing,
                    len(chunk.cells) - len(missing),
                ).to_message()
                target = route(chunk.cells[0].model)
                used[target] = route.count(target)
                # argsrepr given: Celery would otherwise build a repr of every message for its logs.
                app.send_task(
                    RENDER_TASK,
                    args=[message],
                    queue=target,
                    producer=producer,
                    argsrepr=f"[chunk {chunk.id} of {name}: {len(missing)} cells]",
                    kwargsrepr="{}",
                )
            record.already_stored = plan.total - record.enqueued_cells
            record.queue = ", ".join(used) or None
            ledger.update(record)
    return Submitted(
        record.id,
        used or {route(plan.model): route.count(route(plan.model))},
        record.enqueued_cells,
        record.enqueued_chunks,
        record.already_stored,
        plan.total,
    )


@dataclass
class Retried:
    chunks: int  # poisoned chunks sent again
    cells: int  # their cells not stored yet


def retry_poisoned(store: Store, name: str, app: Celery, settings: Settings | None = None) -> Retried:
    """`gridrender retry`: send the newest submission's poisoned chunks again, their kill counts cleared.

    Under the same submission (a cancel still stops them), expanded as that submission
    recorded. Each chunk is first marked with this retry's id, so the copies the killed
    workers left unacknowledged are dropped when they come back; then its count is cleared,
    the chunk sent, and a record without failures written (`status` counts it pending again).
    A send that fails leaves the chunk poisoned: `retry` again.
    """
    settings = settings or Settings()
    client = liveness.connect(settings)
    kills = KillCounts(client) if client is not None else None
    retry = new_id()
    with (
        reaching_broker("enqueue"),
        kills.retrying(name, retry) if kills is not None else contextlib.nullcontext(),
        app.producer_or_acquire() as producer,
        Ledger(store, name, settings, kills) as ledger,
    ):
        producer.connection.ensure_connection(max_retries=2)
        record = ledger.current()
        poisoned = {p.chunk for p in ledger.poisoned(record)}
        if not poisoned:
            return Retried(0, 0)
        plan, route, sent = ledger.plan(record), Router(None, settings), Retried(0, 0)
        for chunk in plan.chunks():
            if chunk.id not in poisoned:
                continue
            stored = ledger.present(chunk.cells)
            missing = [cell for cell, ok in zip(chunk.cells, stored, strict=True) if not ok]
            if missing:
                if kills is not None:
                    kills.supersede(name, record.id, chunk.id, retry)
                message = ChunkMessage(
                    name,
                    record.id,
                    plan.job.output,
                    plan.job.batch_size,
                    plan.partition,
                    chunk.id,
                    missing,
                    len(chunk.cells) - len(missing),
                    retry,
                ).to_message()
                app.send_task(
                    RENDER_TASK,
                    args=[message],
                    queue=route(chunk.cells[0].model),
                    producer=producer,
                    argsrepr=f"[chunk {chunk.id} of {name}: {len(missing)} cells, retried]",
                    kwargsrepr="{}",
                )
            stored_ids = [c.id for c, ok in zip(chunk.cells, stored, strict=True) if ok]
            ledger.record(plan.partition, chunk.id, stored_ids, 0, {}, record.id, "retry")  # clears the kill count too
            sent.chunks, sent.cells = sent.chunks + 1, sent.cells + len(missing)
    return sent
