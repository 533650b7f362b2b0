"""The job ledger: one object per (store, job) owning every record a job leaves behind.

job.yaml, the submissions and what each expanded the job into, cancellation,
presence checks of cells (one thread pool), chunk progress records and the kill
counts of chunks that took workers down. `submit`, `run`, the worker task, the
reaper, `status`, `finalize`, `export` and `retry` all read and write through it,
so a record is spelled and interpreted in one place.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from .. import layout
from ..errors import InputError
from ..jobfile import parse_job
from ..plan import Plan
from ..settings import Settings
from ..storage import NotFound, Store
from . import records
from .expansion import Expansion, RecordedPlan, recorded_job
from .kills import POISON_KILLS, KillCounts
from .records import Attempt, ChunkProgress, PoisonNote
from .submissions import FORMAT, Submission, new_id

if TYPE_CHECKING:
    from ..grid import Cell
    from ..messages import ChunkMessage
    from ..plan import Chunk

WINDOW = 64  # chunks checked together
CHECK_THREADS = 16  # presence checks are round trips: run them side by side


@dataclass(frozen=True)
class Poisoned:
    """A chunk given up on because workers died holding it: what `status` shows and `retry` clears."""

    chunk: str
    submission: str
    failed: int
    kills: int
    error: str


def job_yaml(plan: Plan) -> bytes:
    """job.yaml: the job as submitted, normalized, with its models' identities in a header."""
    data = plan.job.normalized()
    data["dtype"] = plan.dtype
    hub = [m for m in plan.models if m.kind == "hub"]
    if len(hub) == 1 and len(plan.models) == 1:
        data["revision"] = hub[0].revision  # the resolved commit: a branch moves, a commit does not
    identities = "".join(f"# model {m.source}: {json.dumps(m.identity(), sort_keys=True)}\n" for m in plan.models)
    header = f"# normalized by gridrender: {plan.total} cells\n{identities}"
    body: str = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return (header + body).encode()


class Ledger:
    def __init__(self, store: Store, job: str, settings: Settings | None = None, kills: KillCounts | None = None):
        self.store, self.job = store, job
        self.settings = settings or Settings()
        self.kills = kills
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- job.yaml and submissions -------------------------------------------------------
    def exists(self) -> bool:
        try:
            return self.store.exists(layout.job_file(self.job))
        except NotFound:
            return False

    def begin(self, plan: Plan, kind: str, queue: str | None = None) -> Submission:
        """A new submission: job.yaml, what it expands to, its record (counts filled in by `update`)."""
        record = Submission(new_id(), kind, queue, plan.total, 0, 0, 0, 0, plan.resolved(), time.time(), FORMAT)
        self.store.put(layout.job_file(self.job), job_yaml(plan), "application/yaml")
        self.store.put(
            layout.expansion(self.job, record.id), json.dumps(Expansion.of(plan).to_dict()).encode(), "application/json"
        )
        self.update(record)
        return record

    def update(self, record: Submission) -> None:
        self.store.put(layout.submission(self.job, record.id), record.to_json(), "application/json")
        self.store.put(layout.latest_submission(self.job), record.to_json(), "application/json")

    def ids(self) -> list[str]:
        return sorted(layout.leaf(key, ".json") for key in self.store.list(layout.submissions_prefix(self.job)))

    def latest(self) -> Submission | None:
        """The newest submission: one GET of its copy (two submits racing: the one written last)."""
        try:
            return Submission.from_json(self.store.get(layout.latest_submission(self.job)))
        except NotFound:
            return None

    def current(self) -> Submission:
        record = self.latest()
        if record is None:
            raise InputError(f"job {self.job!r} under {self.store.root} was never run or submitted")
        return record

    def plan(self, record: Submission | None = None) -> Plan:
        """The job as `record` (default: the newest submission) expanded it, without the model files."""
        record = record or self.current()
        raw = self.store.get(layout.job_file(self.job))
        source = layout.job_file(self.job)
        try:
            expansion = Expansion.from_dict(json.loads(self.store.get(layout.expansion(self.job, record.id))))
        except NotFound:  # recorded before expansions were: expand here, as it was done then
            return Plan.from_resolved(parse_job(raw, source, self.settings), record.resolved)
        base = Plan.from_resolved(recorded_job(raw, source, expansion), record.resolved)
        return RecordedPlan(base.job, base.components, base.dtype, [], base.chunk_cells, expansion)

    # -- cancellation --------------------------------------------------------------------
    def cancel_all(self) -> list[str]:
        """Mark every submission of the job cancelled: workers drop their pending chunks."""
        done = set(self.cancelled())
        todo = [s for s in self.ids() if s not in done]
        for submission_id in todo:
            self.store.put(layout.cancelled(self.job, submission_id), b"", "text/plain")
        return todo

    def cancelled(self) -> list[str]:
        return [layout.leaf(key) for key in self.store.list(layout.cancelled_prefix(self.job))]

    def is_cancelled(self, submission: str) -> bool:
        return self.store.exists(layout.cancelled(self.job, submission))

    # -- presence of cells -----------------------------------------------------------------
    def present(self, cells: Iterable[Cell]) -> list[bool]:
        """Whether each cell's record is stored, checked side by side."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="gridrender-check")
        return list(self._pool.map(lambda cell: self.store.exists(layout.cell_record(cell.id)), cells))

    def worth_checking(self, plan: Plan) -> bool:
        """Check incomplete chunks cell by cell? Yes on a resubmit or for a small job.

        A first submit of a big job has nothing of its own stored yet; its workers
        check each cell before rendering it, so cells shared with other jobs are
        still never rendered twice. Ask before `begin`: it adds a submission.
        """
        return plan.total <= self.settings.presence_check_cells or bool(self.ids())

    def pending(self, plan: Plan, check_each: bool, submission: str) -> Iterator[tuple[Chunk, list[Cell]]]:
        """Every chunk of the plan with the cells it still needs ([] for a complete one).

        A chunk whose record says it is complete costs nothing; the cells of the others
        are checked when `check_each`. Chunks found complete that way get a record, so
        the next status and resubmit see them without checking again.
        """
        done = self.progress(plan.partition)
        chunks = iter(plan.chunks())
        while window := list(itertools.islice(chunks, WINDOW)):
            unknown = [c for c in window if not records.complete(len(c.cells), done.get(c.id))]
            present: set[str] = set()
            if check_each and unknown:
                cells = [cell for chunk in unknown for cell in chunk.cells]
                present = {cell.id for cell, ok in zip(cells, self.present(cells), strict=True) if ok}
            for chunk in window:
                if records.complete(len(chunk.cells), done.get(chunk.id)):
                    yield chunk, []
                    continue
                missing = [cell for cell in chunk.cells if cell.id not in present]
                if not missing:
                    self.record(plan.partition, chunk.id, [], len(chunk.cells), {}, submission, "check")
                yield chunk, missing

    # -- progress ----------------------------------------------------------------------------
    def progress(self, partition: str) -> dict[str, ChunkProgress]:
        return records.read(self.store, self.job, partition)

    # Keeps the positional signature workers/tasks.py calls (being rewritten in parallel): to take an
    # `Attempt` once it is free.
    def record(  # noqa: PLR0913, PLR0917
        self,
        partition: str,
        chunk: str,
        stored: Iterable[str],
        present: int,
        failed: dict[str, str],
        submission: str,
        by: str,
        poisoned: PoisonNote | None = None,
    ) -> None:
        """A chunk's outcome; `present` counts cells found stored before this attempt.

        A chunk whose every cell is stored forgets the workers it killed.
        """
        attempt = Attempt(list(stored), present, failed, submission, by, poisoned)
        records.write(self.store, self.job, partition, chunk, attempt)
        if not failed and self.kills is not None:
            self.kills.clear(self.job, submission, chunk)

    def record_poisoned(self, chunk: ChunkMessage, kills: int, last: str) -> None:
        """A chunk that killed workers: its cells not stored yet are recorded as failed."""
        stored = self.present(chunk.cells)
        error = (
            f"the chunk killed {kills} workers (last: {last}; out of memory, or a crash in the GPU driver?); "
            f"`gridrender retry {self.job}` renders it again"
        )
        failed = {c.id: error for c, ok in zip(chunk.cells, stored, strict=True) if not ok}
        self.record(
            chunk.partition,
            chunk.chunk,
            [c.id for c, ok in zip(chunk.cells, stored, strict=True) if ok],
            chunk.present,
            failed,
            chunk.submission,
            "reaper",
            {"kills": kills, "last": last, "error": error},
        )

    def kill_count(self, submission: str, chunk: str) -> int:
        return 0 if self.kills is None else self.kills.get(self.job, submission, chunk)

    def superseded(self, chunk: ChunkMessage) -> bool:
        """Whether a later `gridrender retry` sent this chunk again: this copy is an earlier one."""
        latest = None if self.kills is None else self.kills.retried(self.job, chunk.submission, chunk.chunk)
        return latest is not None and chunk.retry != latest

    def poisoned_by_kills(self, submission: str, chunk: str) -> bool:
        return self.kill_count(submission, chunk) >= POISON_KILLS

    def failing(self, records_: Iterable[ChunkProgress], limit: int) -> list[dict[str, Any]]:
        """Bodies of up to `limit` records with failed cells."""
        return records.bodies(self.store, records_, limit)

    def poisoned(self, submission: Submission, limit: int = 1000) -> list[Poisoned]:
        """The submission's chunks given up on as poison (their newest record says so)."""
        marked = submission.format >= FORMAT  # else written before progress keys said so: read the failing ones
        newest = self.progress(submission.partition).values()
        current = [r for r in newest if r.submission == submission.id and (r.poisoned or not marked)]
        return [
            Poisoned(body["chunk"], body["submission"], len(body["failed"]), body["poisoned"]["kills"], body["poisoned"]["error"])
            for body in self.failing(current, limit)
            if body.get("poisoned")
        ]
