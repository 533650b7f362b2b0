"""Per-chunk progress records: what `status`, `--wait`, `finalize` and resubmits read.

A worker (or `run`, or a submit that found a chunk's cells stored already, or the
reaper giving up on a poisoned chunk) writes one record per attempt at a chunk.
The record's key carries its counts and a sequence, so reading a job's progress
is one listing of its own `progress/` prefix, never a listing of `cells/`, which
many jobs share. A chunk's newest record is the one with the highest sequence,
never the store's LastModified (one second granularity on S3: a stale failure
written in the same second as a success could hide it).
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from .. import layout
from ..storage import Store


@dataclass(frozen=True)
class ChunkProgress:
    chunk: str
    sequence: int
    stored: int
    failed: int
    submission: str  # whose attempt it records: failures of older submissions are being retried
    poisoned: bool  # the reaper gave up on the chunk (its key says so: no GET to find out)
    at: float  # when the record was written (the store's time: for the rate only)
    key: str

    def newer_than(self, other: ChunkProgress) -> bool:
        """The record that found more cells stored wins (cells are never unstored: a later attempt finds at
        least as many), then the higher sequence. Stored counts first, so a host whose clock runs fast
        cannot hide a later success behind its earlier failure."""
        return (self.stored, self.sequence, -self.failed) > (other.stored, other.sequence, -other.failed)


class Sequence:
    """Microseconds since the epoch, strictly increasing within this process.

    Attempts at one chunk are separated by a message round trip (a retry, a
    redelivery, a resubmit), far more than the clock skew of synchronized hosts.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return self._last


SEQUENCE = Sequence()


class PoisonNote(TypedDict):
    """Why the reaper gave up on a chunk: in its record for `status` and `retry`."""

    kills: int
    last: str
    error: str


@dataclass(frozen=True)
class Attempt:
    """One attempt at a chunk, as its progress record states it."""

    stored: list[str]  # cells this attempt stored (or found stored by another copy of the chunk meanwhile)
    present: int  # cells found stored before this attempt
    failed: dict[str, str]  # cell id: error
    submission: str
    by: str  # the worker, or "run", "check", "reaper"
    poisoned: PoisonNote | None = None


def write(store: Store, job: str, partition: str, chunk: str, attempt: Attempt) -> str:
    """Record a chunk's outcome. Returns the key."""
    sequence = SEQUENCE.next()
    body = {
        "job": job,
        "chunk": chunk,
        "partition": partition,
        "submission": attempt.submission,
        "sequence": sequence,
        "stored": attempt.stored,
        "present": attempt.present,
        "failed": attempt.failed,
        "by": attempt.by,
        "host": socket.gethostname(),
        "at": time.time(),
        **({"poisoned": attempt.poisoned} if attempt.poisoned else {}),
    }
    counts = layout.ProgressKey(
        chunk, sequence, len(attempt.stored) + attempt.present, len(attempt.failed), attempt.submission, bool(attempt.poisoned)
    )
    key = layout.progress(job, partition, counts)
    store.put(key, json.dumps(body, ensure_ascii=False).encode(), "application/json")
    return key


def read(store: Store, job: str, partition: str) -> dict[str, ChunkProgress]:
    """The newest record of every chunk of the partition (a resubmit may have written a newer one)."""
    newest: dict[str, ChunkProgress] = {}
    for key, at in store.list_with_times(layout.progress_prefix(job, partition)):
        parsed = layout.parse_progress(key)
        if parsed is None:
            continue
        record = ChunkProgress(*parsed, at=at, key=key)
        known = newest.get(record.chunk)
        if known is None or record.newer_than(known):
            newest[record.chunk] = record
    return newest


def bodies(store: Store, records: Iterable[ChunkProgress], limit: int) -> list[dict[str, Any]]:
    """The bodies of up to `limit` records that failed cells (each a GET)."""
    failing = itertools.islice((r for r in records if r.failed), limit)
    return [json.loads(store.get(r.key)) for r in failing]


_RATE_POINTS = 2  # a rate needs two moments


@dataclass
class Tally:
    stored: int = 0
    failed: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, cells) of each record

    def rate(self, now: float, window: float) -> float | None:
        """Cells per second over the records of the last `window` seconds."""
        points = sorted((t, n) for t, n in self.recent if t >= now - window)
        if len(points) < _RATE_POINTS or points[-1][0] <= points[0][0]:
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


def complete(cells: int, record: ChunkProgress | None) -> bool:
    return record is not None and record.stored == cells
