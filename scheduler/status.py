"""How far a job is: done / total from storage, failures, rate and ETA."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .finalize import read_manifest
from .storage import NotFound, Store, job_key

RATE_WINDOW = 300.0  # seconds of recent completions the rate is measured over


@dataclass
class Status:
    name: str
    done: int
    total: int
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> error, for cells not done
    rate: float | None = None  # cells per second, recently
    cancelled: bool = False

    @property
    def missing(self) -> int:
        return self.total - self.done

    @property
    def eta(self) -> float | None:
        pending = self.missing - len(self.failed)
        return pending / self.rate if self.rate and pending > 0 else None


def failure_key(name: str, cell_id: str) -> str:
    return job_key(name, f"failed/{cell_id}.json")


def job_status(store: Store, name: str, now: float | None = None) -> Status:
    now = now or time.time()
    ids = {line["cell_id"] for line in read_manifest(store, name)}
    times = {cid: t for cid, t in store.done_cell_times().items() if cid in ids}
    recent = sorted(t for t in times.values() if t >= now - RATE_WINDOW)
    rate = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and recent[-1] > recent[0] else None
    current = current_submission(store, name)
    failed = {}
    for key in store.list(job_key(name, "failed/")):
        cell_id = key.rsplit("/", 1)[-1].removesuffix(".json")
        if cell_id in ids and cell_id not in times:
            failure = json.loads(store.get(key))
            if failure.get("submission") == current:  # older failures were retried by this submission
                failed[cell_id] = failure.get("error", "?")
    cancelled = current is not None and current in cancelled_submissions(store, name)
    return Status(name, len(times), len(ids), failed, rate, cancelled)


def current_submission(store: Store, name: str) -> str | None:
    try:
        return json.loads(store.get(job_key(name, "submission.json")))["submission"]
    except NotFound:
        return None


def cancelled_submissions(store: Store, name: str) -> set[str]:
    try:
        return set(json.loads(store.get(job_key(name, "cancelled.json"))))
    except NotFound:
        return set()
