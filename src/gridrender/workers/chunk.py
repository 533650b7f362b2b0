"""Rendering a chunk of cells and storing them, with I/O beside the GPU.

Used by `gridrender run` and by the Celery task alike:
1. check which cells are already stored (in parallel: each check is a round trip),
2. encode every distinct prompt once for the whole chunk,
3. render batches, each batch's cells checked in storage again first (a redelivered
   copy of this chunk may be storing them meanwhile); PNG encoding and uploads run
   on a small thread pool with a bounded queue while the GPU renders the next batch,
4. wait for every write: a failed upload fails its cell; nothing is dropped.
A batch that runs out of GPU memory is split in half and retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import torch

from gridrender.scheduler import layout
from gridrender.scheduler.errors import StorageError
from gridrender.scheduler.grid import Cell
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.storage import Store

from .passes import Embeddings
from .records import save
from .render import CellsFailed, Rendered, Renderer

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
Item = TypeVar("Item")

IO_THREADS = 8
IO_QUEUE = 32  # writes in flight before the render loop waits: bounds memory held by images


@dataclass
class ChunkResult:
    rendered: int = 0  # cells the GPU rendered
    stored: list[str] = field(default_factory=list)  # cells this call wrote or found written by an earlier attempt
    present: int = 0  # cells stored before we got to them
    failed: dict[str, str] = field(default_factory=dict)
    oom_splits: int = 0
    encoder_passes: int = 0
    render_seconds: float = 0.0  # spent rendering: rendered / render_seconds is the rate rates.publish takes

    def add(self, other: ChunkResult) -> None:
        self.rendered += other.rendered
        self.stored += other.stored
        self.present += other.present
        self.failed.update(other.failed)
        self.oom_splits += other.oom_splits
        self.encoder_passes += other.encoder_passes
        self.render_seconds += other.render_seconds


class Writer:
    """A bounded background pool for PNG encoding and uploads, and one for presence checks.

    Checks have their own threads: a batch's check never waits behind the uploads queued before it.
    """

    def __init__(self, threads: int = IO_THREADS, depth: int = IO_QUEUE):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gridrender-io")
        self.checks = ThreadPoolExecutor(threads, thread_name_prefix="gridrender-check")
        self.slots = threading.BoundedSemaphore(depth)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        self.slots.acquire()  # back-pressure: the GPU loop waits when uploads fall behind
        future = self.pool.submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _: self.slots.release())
        return future

    def map(self, fn: Callable[[Item], T], items: Iterable[Item]) -> list[T]:
        return list(self.checks.map(fn, items))

    def close(self) -> None:
        self.checks.shutdown(wait=True)
        self.pool.shutdown(wait=True)  # pending writes finish: nothing is lost on shutdown


@dataclass(frozen=True)
class ChunkJob:
    """What one `render_and_store` call renders: cells of one job on one model, in batches of `batch_size`."""

    job: str  # the job's name, as logs name it and records store it
    model: ModelSpec
    cells: list[Cell]
    batch_size: int


def render_and_store(
    renderer: Renderer, writer: Writer, store: Store, work: ChunkJob, *, on_batch: Callable[[int], None] = lambda _cells: None
) -> ChunkResult:
    result = ChunkResult()
    stored = writer.map(lambda c: store.exists(layout.cell_record(c.id)), work.cells)
    todo = [c for c, done in zip(work.cells, stored, strict=True) if not done]
    result.present = len(work.cells) - len(todo)
    if not todo:
        return result
    # Cells that are one cell (SDXL's clip skip 1 and 2) render once; each counts as stored.
    copies = Counter(c.id for c in todo)
    todo = list({c.id: c for c in todo}.values())
    passes = renderer.encoder_passes()
    try:
        embeddings = renderer.encode(work.model, todo)
    except Exception as exc:  # noqa: BLE001  (whatever the encoder raises fails these cells, reported; the worker goes on)
        result.failed = {c.id: f"{type(exc).__name__}: {exc}" for c in todo}
        on_batch(len(todo))
        return result
    batches = _BatchRenderer(renderer, work.model, embeddings, result)
    pending: list[tuple[Cell, Future[bool]]] = []
    for planned in renderer.batches(todo, work.batch_size, embeddings):
        # Checked again before each batch, the first too (loading or compiling the model may have
        # taken minutes): a redelivered copy of this chunk may be storing the same cells.
        batch = _still_missing(writer, store, planned, copies, result)
        if len(batch) < len(planned):
            log.info(
                "%d cells of %s were stored by another copy of this chunk meanwhile; skipped", len(planned) - len(batch), work.job
            )
        if not batch:
            on_batch(len(planned))
            continue
        started = time.perf_counter()
        try:
            for rendered in batches.render(batch, work.batch_size):
                result.rendered += 1
                pending.append((rendered.cell, writer.submit(save, store, rendered, work.model, renderer.device, work.job)))
        except Exception as exc:  # noqa: BLE001  (whatever fails this batch fails its cells; the rest of the chunk goes on)
            log.error("batch of %d cells of %s failed: %s", len(batch), work.job, exc)
            result.failed.update({c.id: f"{type(exc).__name__}: {exc}" for c in batch})
        result.render_seconds += time.perf_counter() - started
        on_batch(len(planned))
    _wait_for_writes(pending, copies, result)
    result.encoder_passes = renderer.encoder_passes() - passes
    log.info(
        "chunk of %s: %d cells rendered, %d stored, %d already stored, %d failed; %d encoder pass(es); %s",
        work.job,
        result.rendered,
        len(result.stored),
        result.present,
        len(result.failed),
        result.encoder_passes,
        speed(result, renderer.device),
    )
    return result


def _wait_for_writes(pending: list[tuple[Cell, Future[bool]]], copies: Counter[str], result: ChunkResult) -> None:
    """Every write finished: a stored cell counts once per copy, a failed write fails its cell.

    Storage unreachable past its deadline is not the cell's fault: raised once every write has
    ended, so the chunk is retried later (its stored cells found) without spending a render retry.
    """
    outage: StorageError | None = None
    for cell, future in pending:
        try:
            future.result()
            result.stored += [cell.id] * copies[cell.id]
        except StorageError as exc:
            if not exc.transient:
                result.failed[cell.id] = f"{type(exc).__name__}: {exc}"
            outage = outage or (exc if exc.transient else None)
        except Exception as exc:  # noqa: BLE001  (an upload or PNG error of any kind fails its cell, never the chunk)
            result.failed[cell.id] = f"{type(exc).__name__}: {exc}"
    if outage is not None:
        raise outage


def speed(result: ChunkResult, device: torch.device) -> str:
    """What an operator tunes batch sizes by: images per second of rendering, and the GPU memory it took."""
    rate = result.rendered / result.render_seconds if result.render_seconds > 0 else 0.0
    text = f"{rate:.2f} img/s"
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.reset_peak_memory_stats(device)  # the next chunk's peak is its own
        text += f", peak GPU memory {peak:.1f} of {total:.0f} GiB"
    return text


def _still_missing(writer: Writer, store: Store, batch: list[Cell], copies: Counter[str], result: ChunkResult) -> list[Cell]:
    """The batch's cells not stored yet; those stored since the chunk started count as present."""
    stored = writer.map(lambda c: store.exists(layout.cell_record(c.id)), batch)
    result.present += sum(copies[c.id] for c, done in zip(batch, stored, strict=True) if done)
    return [c for c, done in zip(batch, stored, strict=True) if not done]


@dataclass
class _BatchRenderer:
    """Renders a chunk's batches with the chunk's embeddings; failed cells and OOM splits go into `result`."""

    renderer: Renderer
    model: ModelSpec
    embeddings: Embeddings
    result: ChunkResult

    def render(self, batch: list[Cell], pad_to: int | None = None) -> list[Rendered]:
        """Render a batch padded to `pad_to` cells; on OOM, as two halves, unpadded.

        Cells that produced NaN/inf fail alone: the batch's other cells are returned and stored.
        """
        try:
            return self.renderer.render(self.model, batch, self.embeddings, pad_to)
        except CellsFailed as exc:
            self.result.failed.update(exc.failed)
            return exc.rendered
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            self.result.oom_splits += 1
            log.warning("out of GPU memory with a batch of %d; retrying as two of %d", len(batch), len(batch) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(batch) // 2
            return self.render(batch[:half]) + self.render(batch[half:])
