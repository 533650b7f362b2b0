"""The Celery task: render a chunk of cells with the worker's resident pipeline.

1. decode and verify the message (every cell id recomputed from its parameters),
2. pass the gates (policy.py): drop it if its submission was cancelled, record it
   failed if it killed workers,
3. find the model on this machine and check it is the submitted one (sha256),
4. render and store the missing cells (the heartbeat names the chunk meanwhile),
5. write the chunk's progress record (after its cells) through the job's ledger.
Anything that fails in 3-5 is a retry: failed cells and a failed progress write
spend the chunk's render retries, a storage outage spends none.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject, Retry

from gridrender.scheduler import liveness, models, rates
from gridrender.scheduler.broker import RENDER_TASK, shared_app
from gridrender.scheduler.errors import InputError, ModelError, StorageError
from gridrender.scheduler.ledger import KillCounts, Ledger
from gridrender.scheduler.messages import ChunkMessage
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.storage import RetryingStore, Store
from gridrender.scheduler.stores import open_store

from . import policy
from .chunk import ChunkJob, ChunkResult, Writer, render_and_store
from .render import Renderer

log = logging.getLogger(__name__)
app = shared_app()
_settings = Settings()
_local_models: dict[tuple[tuple[str, Any], ...], ModelSpec] = {}  # key: a model's sorted identity
compile_mode: str | None = None  # set by `worker --no-compile` ("eager"); None: GRIDRENDER_COMPILE decides


@cache
def renderer() -> Renderer:
    """One renderer per worker process: its pipeline stays loaded between chunks.

    Made on first use, so with the `compile_mode` the worker set before taking tasks.
    """
    return Renderer(compile_mode=compile_mode)


@cache
def writer() -> Writer:
    """One I/O pool per worker process, shared by its chunks."""
    return Writer()


@cache
def kill_counts() -> KillCounts | None:
    """The broker's kill counts (None when the broker is not Redis: no reaper, no counts)."""
    client = liveness_client()
    return KillCounts(client) if client is not None else None


def local_model(spec: ModelSpec) -> ModelSpec:
    """The submitted model as found on this machine; a file or folder must hash the same.

    Resolved once per process (hashes are cached per size and mtime on disk); a
    mismatch is a ModelError, never an image stored under the wrong id.
    """
    key = tuple(sorted(spec.identity().items()))
    if key in _local_models:
        return _local_models[key]
    if spec.kind in ("file", "folder"):
        source = spec.location if Path(spec.location).exists() else spec.source
        found = models.resolve(source, spec.revision, _settings)
        if found.identity() != spec.identity():
            raise ModelError(
                f"{spec.source!r} on this worker ({found.location}) is not the submitted model: "
                f"sha256 {found.sha256} != {spec.sha256}"
            )
        spec = found
    _local_models[key] = spec
    return spec


@app.task(name=RENDER_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]  # Celery ships no types
def render_chunk(self: Task, message: dict[str, Any], failures: int = 0) -> dict[str, Any]:
    """`failures`: render attempts of this chunk that failed so far (storage outages not counted)."""
    try:
        chunk = ChunkMessage.from_message(message)
    except InputError as exc:
        # A message we cannot trust is dropped (acknowledged), never half-run or retried.
        log.error("dropping task %s: %s", self.request.id, exc)
        return {"rejected": str(exc)}
    # Storage calls retry through outages of up to storage_deadline seconds.
    store = RetryingStore(open_store(chunk.output), deadline=_settings.storage_deadline)
    with Ledger(store, chunk.job, _settings, kill_counts()) as ledger:
        return _run(self, ledger, chunk, message, failures)


def _run(task: Task, ledger: Ledger, chunk: ChunkMessage, message: dict[str, Any], failures: int) -> dict[str, Any]:
    try:
        ended = policy.gate(ledger, chunk)
        if ended is not None:
            return ended
        result = render_cells(chunk, ledger.store)
        attempt = failures + 1
        if result.failed and failures < _settings.task_retries:
            log.warning("chunk of %s: %d cells failed (attempt %d), retrying", chunk.job, len(result.failed), attempt)
            # The retry re-checks storage, so only the cells that failed render again.
            raise policy.retry(task, message, attempt)
        if result.failed:
            log.error("chunk of %s: %d cells failed after %d attempts", chunk.job, len(result.failed), attempt)
        ledger.record(
            chunk.partition,
            chunk.chunk,
            result.stored,
            chunk.present + result.present,
            result.failed,
            chunk.submission,
            liveness.worker_name(),
        )
    except StorageError as exc:
        if exc.transient:
            # Storage still unreachable after the deadline: keep the chunk (it comes back later, its
            # stored cells found) rather than acknowledge it unrecorded. Spends no render retry.
            log.error("chunk of %s: storage unreachable (%s); retrying the chunk later", chunk.job, exc)
            raise policy.retry(task, message, failures) from None
        if failures < _settings.task_retries:
            log.error("chunk of %s: cannot record its progress (%s), retrying", chunk.job, exc)
            raise policy.retry(task, message, failures + 1) from None
        log.error("chunk of %s: cannot record its progress after %d attempts: %s", chunk.job, failures + 1, exc)
        raise
    except (Retry, Reject):
        raise
    except Exception:  # anything else escaping would acknowledge the chunk unrecorded
        log.exception("chunk of %s: unexpected failure", chunk.job)
        if failures < _settings.task_retries:
            raise policy.retry(task, message, failures + 1) from None
        raise
    publish_rate(chunk, result)  # after the record: a rate is advice, never a reason to lose a chunk
    return {
        "rendered": result.rendered,
        "stored": len(result.stored),
        "present": result.present,
        "failed": len(result.failed),
        "oom_splits": result.oom_splits,
    }


def publish_rate(chunk: ChunkMessage, result: ChunkResult) -> None:
    """Fold this chunk's work per second into the model's published rate, which sizes later submits' chunks."""
    client = liveness_client()
    if client is None or not result.rendered or result.render_seconds <= 0:
        return
    cells = chunk.cells
    work = result.rendered * sum(rates.cell_work((c.width, c.height), c.steps, c.denoise, c.hires) for c in cells) / len(cells)
    try:
        rates.publish(client, cells[0].model, cells[0].dtype, work, result.render_seconds)
    except Exception as exc:  # noqa: BLE001 - a rate is advice (a Redis error, a garbled value): the chunk is done
        log.warning("could not publish the render rate: %s", exc)


@cache
def liveness_client() -> redis.Redis | None:
    return liveness.connect(_settings)


def render_cells(chunk: ChunkMessage, store: Store) -> ChunkResult:
    """The chunk rendered and stored; any failure but a storage outage becomes failed cells."""
    try:
        try:
            model = local_model(chunk.cells[0].model)
        except ModelError as exc:
            return ChunkResult(failed={c.id: f"ModelError: {exc}" for c in chunk.cells})
        cells = [c.replace(model=model) if c.model is not model else c for c in chunk.cells]
        return render_and_store(renderer(), writer(), store, ChunkJob(chunk.job, model, cells, chunk.batch_size))
    except StorageError as exc:
        if exc.transient:
            raise
        log.exception("chunk of %s failed", chunk.job)
        return ChunkResult(failed={c.id: f"{type(exc).__name__}: {exc}" for c in chunk.cells})
    except Exception as exc:
        log.exception("chunk of %s failed", chunk.job)  # retried, then recorded, never silently acknowledged
        return ChunkResult(failed={c.id: f"{type(exc).__name__}: {exc}" for c in chunk.cells})
