"""Worker policy, in small pieces: what a worker does around each chunk, beside the rendering.

- holding: while a chunk runs, the worker's heartbeat names it (Celery's task_prerun
  and task_postrun signals), so the reaper can re-enqueue it if the worker dies;
- gates: a chunk of a cancelled submission is dropped, so is a copy that a retry
  superseded; a chunk that killed POISON_KILLS workers is recorded as failed; all before
  any GPU work;
- retries: one backoff for every retry of a chunk; a storage outage retries without
  spending the chunk's render retries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.signals import task_postrun, task_prerun

from gridrender.scheduler.ledger import Ledger
from gridrender.scheduler.liveness import Heartbeat
from gridrender.scheduler.messages import ChunkMessage

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


def backoff(attempt: int) -> float:
    """Seconds before retry number `attempt` (1, 2, ...) of a chunk: 2, 4, 8, ... up to a minute."""
    return min(2.0 ** max(attempt, 1), MAX_BACKOFF)


def retry(task: Task, message: dict[str, Any], failures: int) -> Exception:
    """The retry to raise: the same message, `failures` render attempts spent so far.

    Celery publishes the retry, then acknowledges the message. When publishing fails it raises
    Reject(requeue=False), which would drop the chunk unrecorded; the message goes back to the
    queue instead (requeued, still unacknowledged), and comes again when the broker is back.
    """
    try:
        # Celery is untyped. Task.retry raises its Retry itself (throw=True); with throw=False it would return it.
        exc: Exception = task.retry(
            args=[message], kwargs={"failures": failures}, countdown=backoff(task.request.retries + 1), max_retries=None
        )
    except Reject as rejected:
        log.error("could not publish the retry of a chunk (%s): putting the message back on its queue", rejected.reason)
        requeued: Exception = Reject(rejected.reason, requeue=True)
        return requeued
    return exc


def hold_chunks(task: Task, heartbeat: Heartbeat) -> Callable[[], None]:
    """Name the running chunk in the heartbeat while `task` runs; returns the disconnect."""

    def hold(task_id: str, task: Task, args: tuple[Any, ...], **_: Any) -> None:
        routing = (task.request.delivery_info or {}).get("routing_key") or ""
        if args and isinstance(args[0], dict):
            heartbeat.hold(args[0], routing, task_id)

    def release(**_: Any) -> None:
        heartbeat.release()

    task_prerun.connect(hold, sender=task, weak=False)
    task_postrun.connect(release, sender=task, weak=False)

    def disconnect() -> None:
        task_prerun.disconnect(hold, sender=task)
        task_postrun.disconnect(release, sender=task)

    return disconnect


Ended = dict[str, int]  # the task's result for a chunk ended before rendering: {"cancelled", ... : cells}
Gate = Callable[[Ledger, ChunkMessage], "Ended | None"]


def cancelled(ledger: Ledger, chunk: ChunkMessage) -> Ended | None:
    if ledger.is_cancelled(chunk.submission):
        log.info("job %s was cancelled: dropping %d cells", chunk.job, len(chunk.cells))
        return {"cancelled": len(chunk.cells)}
    return None


def poisoned(ledger: Ledger, chunk: ChunkMessage) -> Ended | None:
    kills = ledger.kill_count(chunk.submission, chunk.chunk)
    if ledger.poisoned_by_kills(chunk.submission, chunk.chunk):
        log.error("chunk %s of %s killed %d workers: recording it as failed", chunk.chunk, chunk.job, kills)
        ledger.record_poisoned(chunk, kills, "a worker before this redelivery")
        return {"poisoned": len(chunk.cells)}
    return None


def superseded(ledger: Ledger, chunk: ChunkMessage) -> Ended | None:
    if ledger.superseded(chunk):
        log.info("chunk %s of %s was sent again by `gridrender retry`: dropping this earlier copy", chunk.chunk, chunk.job)
        return {"superseded": len(chunk.cells)}
    return None


GATES: tuple[Gate, ...] = (cancelled, superseded, poisoned)


def gate(ledger: Ledger, chunk: ChunkMessage, gates: tuple[Gate, ...] = GATES) -> Ended | None:
    """The first gate's answer that ends the chunk before rendering, or None: render it."""
    for check in gates:
        ended = check(ledger, chunk)
        if ended is not None:
            return ended
    return None
