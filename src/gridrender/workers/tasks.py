"""The Celery task: render a chunk of cells with the worker's resident pipeline.

1. decode and verify the message (every cell id recomputed from its parameters),
2. drop it if its submission was cancelled, or record it failed if it killed workers,
3. find the model on this machine and check it is the submitted one (sha256),
4. render and store the missing cells, holding the chunk in the heartbeat meanwhile,
5. write the chunk's progress record (after its cells), or retry what failed.
"""
from __future__ import annotations

import logging
from pathlib import Path

from gridrender.scheduler import liveness, models, progress, submissions
from gridrender.scheduler.broker import RENDER_TASK, shared_app
from gridrender.scheduler.errors import InputError, ModelError, StorageError
from gridrender.scheduler.messages import ChunkMessage
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.storage import RetryingStore, Store
from gridrender.scheduler.stores import open_store

from .chunk import ChunkResult, Writer, render_and_store
from .render import Renderer

log = logging.getLogger(__name__)
app = shared_app()
_settings = Settings()
STORAGE_DEADLINE = 600.0  # seconds a worker keeps retrying storage before giving the chunk back
_renderer: Renderer | None = None
_writer: Writer | None = None
_local_models: dict[tuple, ModelSpec] = {}
heartbeat: liveness.Heartbeat | None = None  # set by the worker process when the broker is Redis
compile_mode: str | None = None  # set by `worker --no-compile` ("eager"); None: GRIDRENDER_COMPILE decides


def renderer() -> Renderer:
    """One renderer per worker process: its pipeline stays loaded between chunks."""
    global _renderer
    if _renderer is None:
        _renderer = Renderer(compile_mode=compile_mode)
    return _renderer


def writer() -> Writer:
    global _writer
    if _writer is None:
        _writer = Writer()
    return _writer


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
            raise ModelError(f"{spec.source!r} on this worker ({found.location}) is not the submitted model: "
                             f"sha256 {found.sha256} != {spec.sha256}")
        spec = found
    _local_models[key] = spec
    return spec


@app.task(name=RENDER_TASK, bind=True, max_retries=_settings.task_retries)
def render_chunk(self, message: dict) -> dict:
    try:
        chunk = ChunkMessage.from_message(message)
    except InputError as exc:
        # A message we cannot trust is dropped (acknowledged), never half-run or retried.
        log.error("dropping task %s: %s", self.request.id, exc)
        return {"rejected": str(exc)}
    # Storage calls retry through outages of up to STORAGE_DEADLINE seconds.
    store = RetryingStore(open_store(chunk.output), deadline=STORAGE_DEADLINE)
    if heartbeat is not None:
        heartbeat.hold(message, self.request.delivery_info.get("routing_key") or "", self.request.id)
    try:
        return _run(self, chunk, store)
    finally:
        if heartbeat is not None:
            heartbeat.release()


def _run(task, chunk: ChunkMessage, store: Store) -> dict:
    try:
        if submissions.is_cancelled(store, chunk.job, chunk.submission):
            log.info("job %s was cancelled: dropping %d cells", chunk.job, len(chunk.cells))
            return {"cancelled": len(chunk.cells)}
        if heartbeat is not None and liveness.kills(heartbeat.client, chunk.chunk) >= liveness.POISON_KILLS:
            progress.record_poisoned(store, chunk)
            return {"poisoned": len(chunk.cells)}
        result = render_cells(chunk, store)
    except Exception as exc:
        if isinstance(exc, StorageError) and exc.transient:
            # Storage still unreachable after the deadline: keep the chunk (it comes back
            # later) rather than acknowledge it unrendered or record failures we cannot write.
            log.error("chunk of %s: storage unreachable (%s); retrying the chunk later", chunk.job, exc)
            raise task.retry(countdown=60, max_retries=None) from None
        log.exception("chunk of %s failed", chunk.job)  # retried, then recorded, never silently acknowledged
        result = ChunkResult(failed={c.id: f"{type(exc).__name__}: {exc}" for c in chunk.cells})
    if result.failed:
        attempt = task.request.retries + 1
        if task.request.retries < task.max_retries:
            log.warning("chunk of %s: %d cells failed (attempt %d), retrying", chunk.job, len(result.failed), attempt)
            # The retry re-checks storage, so only the cells that failed render again.
            raise task.retry(countdown=min(2**attempt, 60))
        log.error("chunk of %s: %d cells failed after %d attempts", chunk.job, len(result.failed), attempt)
    progress.write(store, chunk.job, chunk.partition, chunk.chunk, result.stored, chunk.present + result.present,
                   result.failed, chunk.submission, liveness.worker_name())
    return {"rendered": result.rendered, "stored": len(result.stored), "present": result.present,
            "failed": len(result.failed), "oom_splits": result.oom_splits}


def render_cells(chunk: ChunkMessage, store: Store) -> ChunkResult:
    try:
        model = local_model(chunk.cells[0].model)
    except ModelError as exc:
        return ChunkResult(failed={c.id: f"ModelError: {exc}" for c in chunk.cells})
    cells = [c.replace(model=model) if c.model is not model else c for c in chunk.cells]
    return render_and_store(renderer(), writer(), store, model, cells, chunk.batch_size, chunk.job)
