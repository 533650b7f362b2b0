"""The Celery task: render a chunk of cells with the worker's resident pipeline."""
from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

from scheduler import grid, models
from scheduler.broker import RENDER_TASK, shared_app
from scheduler.chunks import Chunk
from scheduler.errors import InputError, ModelError
from scheduler.models import ModelSpec
from scheduler.settings import Settings
from scheduler.status import cancelled_submissions, failure_key
from scheduler.storage import Store, cell_record, open_store

from .records import save
from .render import Renderer

log = logging.getLogger(__name__)
app = shared_app()
_settings = Settings()
_renderer: Renderer | None = None
_local_models: dict[tuple, ModelSpec] = {}


def renderer() -> Renderer:
    """One renderer per worker process: its pipeline stays loaded between chunks."""
    global _renderer
    if _renderer is None:
        _renderer = Renderer()
    return _renderer


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
    store = open_store(chunk.output)
    if chunk.submission in cancelled_submissions(store, chunk.job):
        log.info("job %s was cancelled: dropping %d cells", chunk.job, len(chunk.cells))
        return {"cancelled": len(chunk.cells)}
    result = render_cells(chunk, store)
    if result["failed"]:
        attempt = self.request.retries + 1
        if self.request.retries < self.max_retries:
            log.warning("chunk of %s: %d cells failed (attempt %d), retrying", chunk.job, len(result["failed"]), attempt)
            # The retry re-checks storage, so only the cells that failed render again.
            raise self.retry(countdown=min(2**attempt, 60))
        record_failures(store, chunk, result["failed"], attempt)
    return {k: v if isinstance(v, int) else len(v) for k, v in result.items()}


def render_cells(chunk: Chunk, store: Store) -> dict:
    todo = [c for c in chunk.cells if not store.exists(cell_record(c.id))]
    result = {"rendered": 0, "present": len(chunk.cells) - len(todo), "failed": {}}
    if not todo:
        return result
    worker = renderer()
    try:
        model = local_model(chunk.model)
    except ModelError as exc:
        result["failed"] = {c.id: f"ModelError: {exc}" for c in todo}
        return result
    for batch in grid.batches(todo, chunk.batch_size):
        try:
            for rendered in worker.render(model, batch):
                result["rendered"] += save(store, rendered, model, worker.device, chunk.job, len(batch))
        except Exception as exc:  # one batch's failure (OOM, storage) must not sink the chunk
            log.exception("batch of %d cells of %s failed", len(batch), chunk.job)
            result["failed"].update({c.id: f"{type(exc).__name__}: {exc}" for c in batch})
    return result


def record_failures(store: Store, chunk: Chunk, failed: dict[str, str], attempts: int) -> None:
    for cell_id, error in failed.items():
        body = {"cell_id": cell_id, "job": chunk.job, "submission": chunk.submission, "error": error, "attempts": attempts,
                "host": socket.gethostname(), "at": time.time()}
        store.put(failure_key(chunk.job, cell_id), json.dumps(body).encode(), "application/json")
    log.error("chunk of %s: %d cells failed after %d attempts", chunk.job, len(failed), attempts)
