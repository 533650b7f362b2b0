"""A submission (or local run) record: what was sent, how the job was split.

Each `submit` or `run` writes `jobs/<name>/submissions/<id>.json`; ids sort by time,
so the newest is the last key. The record carries what `status` and `finalize`
need without the model files: the total, the partition into chunks, the model.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, fields
from typing import Any


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
    resolved: dict[str, Any]  # Plan.resolved(): model, dtype, chunk size, partition
    at: float
    # 2: its poisoned chunks' progress keys say so (`records.write`); 1 (records from before): read the bodies
    format: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Submission:
        data = json.loads(raw)
        # Fields a newer gridrender added are left out: a record it wrote still reads here.
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @property
    def partition(self) -> str:
        return str(self.resolved["partition"])


FORMAT = 2  # what a new submission writes: see `Submission.format`


def new_id() -> str:
    """Sorts by creation time (to the millisecond), unique across machines."""
    return f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
