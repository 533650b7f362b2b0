"""How far a job is: done / total from storage, failures, rate and ETA."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .finalize import read_manifest
from .storage import Store, job_key

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
    failed = {}
    for key in store.list(job_key(name, "failed/")):
        cell_id = key.rsplit("/", 1)[-1].removesuffix(".json")
        if cell_id in ids and cell_id not in times:
            failed[cell_id] = json.loads(store.get(key)).get("error", "?")
    cancelled = store.exists(job_key(name, "cancelled.json"))
    return Status(name, len(times), len(ids), failed, rate, cancelled)
