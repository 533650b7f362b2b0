"""A job's submissions (and local runs): what was sent, how the job was split, cancellation.

Each `submit` or `run` writes `jobs/<name>/submissions/<id>.json`; ids sort by time,
so the newest is the last key. The record carries what `status` and `finalize`
need without the model files: the total, the partition into chunks, the model.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass

from . import layout
from .storage import NotFound, Store


@dataclass
class Submission:
    id: str
    kind: str  # "broker" (submit) or "local" (run)
    queue: str | None
    cells: int  # cells in the job
    chunks: int  # chunks in the job's partition
    enqueued_cells: int
    enqueued_chunks: int
    already_stored: int
    resolved: dict  # Plan.resolved(): model, dtype, chunk size, partition
    at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @property
    def partition(self) -> str:
        return str(self.resolved["partition"])


def new_id() -> str:
    """Sorts by creation time (to the millisecond), unique across machines."""
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"


def write(store: Store, job: str, submission: Submission) -> None:
    store.put(layout.submission(job, submission.id), submission.to_json(), "application/json")
    store.put(layout.latest_submission(job), submission.to_json(), "application/json")


def ids(store: Store, job: str) -> list[str]:
    return sorted(layout.leaf(key, ".json") for key in store.list(layout.submissions_prefix(job)))


def latest(store: Store, job: str) -> Submission | None:
    """The newest submission: one GET of its copy (two submits racing: the one written last)."""
    try:
        return Submission(**json.loads(store.get(layout.latest_submission(job))))
    except NotFound:
        return None


def cancel_all(store: Store, job: str) -> list[str]:
    """Mark every submission of the job cancelled: workers drop their pending chunks."""
    done = set(cancelled(store, job))
    todo = [s for s in ids(store, job) if s not in done]
    for submission_id in todo:
        store.put(layout.cancelled(job, submission_id), b"", "text/plain")
    return todo


def cancelled(store: Store, job: str) -> list[str]:
    return [layout.leaf(key) for key in store.list(layout.cancelled_prefix(job))]


def is_cancelled(store: Store, job: str, submission_id: str) -> bool:
    return store.exists(layout.cancelled(job, submission_id))
