"""Per-chunk completion records: what `status`, `--wait`, `finalize` and resubmits read.

A worker (or `run`, or a submit that found a chunk's cells stored already) writes
one record per chunk after the chunk's cells are stored. The record's key carries
its counts, so reading a job's progress is a listing of its own `progress/` prefix:
never a listing of `cells/`, which many jobs share.
"""
from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import layout, submissions
from .settings import Settings
from .storage import Store

if TYPE_CHECKING:
    from .grid import Cell
    from .messages import ChunkMessage
    from .plan import Chunk, Plan

WINDOW = 64  # chunks checked together
CHECK_THREADS = 16  # presence checks are round trips: run them side by side


@dataclass(frozen=True)
class ChunkProgress:
    chunk: str
    stored: int
    failed: int
    submission: str  # whose attempt it records: failures of older submissions are being retried
    at: float  # when the record was written
    key: str


def write(store: Store, job: str, partition: str, chunk: str, stored: Iterable[str], present: int,
          failed: dict[str, str], submission: str, by: str) -> None:
    """Record a chunk's outcome; `present` counts cells found stored before this attempt."""
    stored = list(stored)
    body = {"job": job, "chunk": chunk, "partition": partition, "submission": submission, "stored": stored,
            "present": present, "failed": failed, "by": by, "host": socket.gethostname(), "at": time.time()}
    key = layout.progress(job, partition, chunk, len(stored) + present, len(failed), submission)
    store.put(key, json.dumps(body, ensure_ascii=False).encode(), "application/json")


def read(store: Store, job: str, partition: str) -> dict[str, ChunkProgress]:
    """The newest record of every chunk of the partition (a resubmit may have written a newer one)."""
    newest: dict[str, ChunkProgress] = {}
    for key, at in store.list_with_times(layout.progress_prefix(job, partition)):
        parsed = layout.parse_progress(key)
        if parsed is None:
            continue
        chunk, stored, failed, submission = parsed
        if chunk not in newest or at >= newest[chunk].at:
            newest[chunk] = ChunkProgress(chunk, stored, failed, submission, at, key)
    return newest


def record_poisoned(store: Store, chunk: ChunkMessage, kills: int = 2) -> None:
    """A chunk that killed workers: its cells not stored yet are recorded as failed."""
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="gridrender-check") as pool:
        stored = list(pool.map(lambda c: store.exists(layout.cell_record(c.id)), chunk.cells))
    reason = f"the chunk killed {kills} workers (out of memory, or a crash in the GPU driver?)"
    failed = {c.id: reason for c, ok in zip(chunk.cells, stored) if not ok}
    write(store, chunk.job, chunk.partition, chunk.chunk, [c.id for c, ok in zip(chunk.cells, stored) if ok],
          chunk.present, failed, chunk.submission, "reaper")


def failures(store: Store, records: Iterable[ChunkProgress], limit: int) -> dict[str, str]:
    """Cell id -> error for up to `limit` failed cells, from the records' bodies."""
    found: dict[str, str] = {}
    for record in records:
        if record.failed and len(found) < limit:
            found.update(json.loads(store.get(record.key)).get("failed", {}))
    return dict(list(found.items())[:limit])


@dataclass
class Tally:
    stored: int = 0
    failed: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, cells) of each record

    def rate(self, now: float, window: float) -> float | None:
        """Cells per second over the records of the last `window` seconds."""
        points = sorted((t, n) for t, n in self.recent if t >= now - window)
        if len(points) < 2 or points[-1][0] <= points[0][0]:
            return None
        return sum(n for _, n in points[1:]) / (points[-1][0] - points[0][0])


def tally(records: dict[str, ChunkProgress], submission: str) -> Tally:
    """Cells stored, and cells that failed in `submission` (older failures are being retried)."""
    result = Tally()
    for record in records.values():
        result.stored += record.stored
        if record.submission == submission:
            result.failed += record.failed
        result.recent.append((record.at, record.stored))
    return result


def worth_checking(store: Store, plan: Plan, settings: Settings) -> bool:
    """Check incomplete chunks cell by cell? Yes on a resubmit or for a small job.

    A first submit of a big job has nothing of its own stored yet; its workers
    check each cell before rendering it, so cells shared with other jobs are
    still never rendered twice.
    """
    return bool(submissions.ids(store, plan.job.name)) or plan.total <= settings.presence_check_cells


def pending(plan: Plan, store: Store, check_each: bool, submission: str) -> Iterator[tuple[Chunk, list[Cell]]]:
    """Every chunk of the plan with the cells it still needs ([] for a complete one).

    A chunk whose record says it is complete costs nothing; the cells of the others
    are checked when `check_each`. Chunks found complete that way get a record, so
    the next status and resubmit see them without checking again.
    """
    done = read(store, plan.job.name, plan.partition)
    with ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="gridrender-check") as pool:
        for window in _windows(plan.chunks(), WINDOW):
            unknown = [c for c in window if not complete(c, done)]
            present: set[str] = set()
            if check_each and unknown:
                cells = [cell for chunk in unknown for cell in chunk.cells]
                found = pool.map(lambda cell: store.exists(layout.cell_record(cell.id)), cells)
                present = {cell.id for cell, exists in zip(cells, found) if exists}
            for chunk in window:
                if complete(chunk, done):
                    yield chunk, []
                    continue
                missing = [cell for cell in chunk.cells if cell.id not in present]
                if not missing:
                    write(store, plan.job.name, plan.partition, chunk.id, [], len(chunk.cells), {}, submission, "check")
                yield chunk, missing


def complete(chunk: Chunk, done: dict[str, ChunkProgress]) -> bool:
    record = done.get(chunk.id)
    return record is not None and record.stored == len(chunk.cells)


def _windows(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    iterator = iter(chunks)
    while window := list(itertools.islice(iterator, size)):
        yield window
