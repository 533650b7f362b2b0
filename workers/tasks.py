"""The Celery task: render a chunk of cells with the worker's resident pipeline."""
from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from gridrender.scheduler import models
from gridrender.scheduler.broker import RENDER_TASK, shared_app
from gridrender.scheduler.chunks import Chunk
from gridrender.scheduler.errors import InputError, ModelError, StorageError
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.status import cancelled_submissions, failure_key
from gridrender.scheduler.storage import RetryingStore, Store, open_store

from .chunk import Writer, render_and_store
from .render import Renderer

log = logging.getLogger(__name__)
app = shared_app()
_settings = Settings()
STORAGE_DEADLINE = 600.0  # seconds a worker keeps retrying storage before giving the chunk back
_renderer: Renderer | None = None
_writer: Writer | None = None
_local_models: dict[tuple, ModelSpec] = {}


def renderer() -> Renderer:
    """One renderer per worker process: its pipeline stays loaded between chunks."""
    global _renderer
    if _renderer is None:
        _renderer = Renderer()
    return _renderer


def writer() -> Writer:
    global _writer
    if _writer is None:
        _writer = Writer()
    return _writer


def local_model(spec: ModelSpec) -> ModelSpec:
    """The submitted model as found on this machine; its identity must be the same."""
    key = tuple(sorted(spec.identity().items()))
    if key in _local_models:
        return _local_models[key]
    if spec.kind in ("file", "folder") and not Path(spec.location).exists():
        found = models.resolve(spec.source, spec.revision, _settings)
        if found.identity() != spec.identity():
            raise ModelError(f"{spec.source!r} on this worker is not the submitted model (sha256 differs)")
        spec = found
    _local_models[key] = spec
    return spec


@app.task(name=RENDER_TASK, bind=True, max_retries=_settings.task_retries)
def render_chunk(self, message: dict) -> dict:
    try:
        chunk = Chunk.from_message(message)
    except InputError as exc:
        # A message we cannot trust is dropped (acknowledged), never half-run or retried.
        log.error("dropping task %s: %s", self.request.id, exc)
        return {"rejected": str(exc)}
    # Storage calls retry through outages of up to STORAGE_DEADLINE seconds.
    store = RetryingStore(open_store(chunk.output), deadline=STORAGE_DEADLINE)
    try:
        if chunk.submission in cancelled_submissions(store, chunk.job):
            log.info("job %s was cancelled: dropping %d cells", chunk.job, len(chunk.cells))
            return {"cancelled": len(chunk.cells)}
        result = render_cells(chunk, store)
    except Exception as exc:
        if isinstance(exc, StorageError) and exc.transient:
            # Storage still unreachable after the deadline: keep the chunk (it comes back
            # later) rather than acknowledge it unrendered or record failures we cannot write.
            log.error("chunk of %s: storage unreachable (%s); retrying the chunk later", chunk.job, exc)
            raise self.retry(countdown=60, max_retries=None) from None
        log.exception("chunk of %s failed", chunk.job)  # retried, then recorded, never silently acknowledged
        result = {"rendered": 0, "present": 0, "failed": {c.id: f"{type(exc).__name__}: {exc}" for c in chunk.cells}}
    if result["failed"]:
        attempt = self.request.retries + 1
        if self.request.retries < self.max_retries:
            log.warning("chunk of %s: %d cells failed (attempt %d), retrying", chunk.job, len(result["failed"]), attempt)
            # The retry re-checks storage, so only the cells that failed render again.
            raise self.retry(countdown=min(2**attempt, 60))
        record_failures(store, chunk, result["failed"], attempt)
    return {k: v if isinstance(v, int) else len(v) for k, v in result.items()}


def render_cells(chunk: Chunk, store: Store) -> dict:
    try:
        model = local_model(chunk.model)
    except ModelError as exc:
        return {"rendered": 0, "present": 0, "failed": {c.id: f"ModelError: {exc}" for c in chunk.cells}}
    result = render_and_store(renderer(), writer(), store, model, chunk.cells, chunk.batch_size, chunk.job)
    return {"rendered": result.rendered, "stored": result.stored, "present": result.present, "failed": result.failed,
            "oom_splits": result.oom_splits}


def record_failures(store: Store, chunk: Chunk, failed: dict[str, str], attempts: int) -> None:
    for cell_id, error in failed.items():
        body = {"cell_id": cell_id, "job": chunk.job, "submission": chunk.submission, "error": error, "attempts": attempts,
                "host": socket.gethostname(), "at": time.time()}
        store.put(failure_key(chunk.job, cell_id), json.dumps(body).encode(), "application/json")
    log.error("chunk of %s: %d cells failed after %d attempts", chunk.job, len(failed), attempts)
