"""How far a job is, from its own files: done / total, failures, rate, ETA; and following it.

Costs what the job costs: the newest submission record, a listing of the job's
progress records and of its cancellations. Never a listing of `cells/`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import GridrenderError
from .ledger import Ledger, Poisoned, tally
from .settings import Settings
from .storage import Store

RATE_WINDOW = 300.0  # seconds of recent completions the rate is measured over
SHOWN_FAILURES = 10


class Stalled(GridrenderError):
    """No worker took any of the job's chunks within the idle timeout."""


@dataclass
class Status:
    name: str
    done: int
    total: int
    failed: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # cell id -> error, the first few
    rate: float | None = None  # cells per second, recently
    cancelled: bool = False
    poisoned: list[Poisoned] = field(default_factory=list)  # chunks given up on: workers died holding them

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.failed, 0)

    @property
    def finished(self) -> bool:
        return self.pending == 0

    @property
    def eta(self) -> float | None:
        return self.pending / self.rate if self.rate and self.pending else None


def job_status(store: Store, name: str, now: float | None = None) -> Status:
    ledger = Ledger(store, name)
    record = ledger.current()
    records = ledger.progress(record.partition)
    counts = tally(records, record.id)
    failures: dict[str, str] = {}
    poisoned: list[Poisoned] = []
    if counts.failed:
        current = [r for r in records.values() if r.submission == record.id]
        for body in ledger.failing(current, SHOWN_FAILURES):
            failures.update(itertools.islice(body["failed"].items(), SHOWN_FAILURES - len(failures)))
        poisoned = ledger.poisoned(record)
    return Status(
        name,
        min(counts.stored, record.cells),
        record.cells,
        counts.failed,
        failures,
        counts.rate(now or time.time(), RATE_WINDOW),
        ledger.is_cancelled(record.id),
        poisoned,
    )


@dataclass(frozen=True)
class Polling:
    """How `follow` polls: from `interval` seconds, backing off to `max_interval` while nothing changes;
    with no progress and no worker holding a chunk for `idle_timeout` seconds, the job has stalled."""

    interval: float = 1.0
    max_interval: float = 15.0
    idle_timeout: float | None = None


def follow(  # noqa: PLR0913  (the hooks are keyword-only, each with a default)
    store: Store,
    name: str,
    on_update: Callable[[Status], None],
    polling: Polling = Polling(),
    *,
    working: Callable[[], bool] = lambda: False,
    tick: Callable[[], None] = lambda: None,
    until: Callable[[Status], bool] = lambda s: s.finished or s.cancelled,
) -> Status:
    """Poll the job's status until `until`; polling backs off while nothing changes.

    `working()` says whether a worker holds one of the job's chunks right now; with no
    progress and no such worker for `polling.idle_timeout` seconds, raises Stalled. `tick()`
    runs every poll (`submit --wait` reaps dead workers' chunks there).
    """
    status = job_status(store, name)
    on_update(status)
    last_change = time.monotonic()
    delay, idle_timeout = polling.interval, polling.idle_timeout
    while not until(status):
        time.sleep(delay)
        tick()
        now = job_status(store, name)
        if (now.done, now.failed) != (status.done, status.failed) or working():
            last_change, delay = time.monotonic(), polling.interval
        else:
            delay = min(delay * 1.5, polling.max_interval)
        status = now
        on_update(status)
        if idle_timeout is not None and time.monotonic() - last_change > idle_timeout:
            raise Stalled(
                f"no worker took a chunk of {name} in {idle_timeout:.0f} s "
                f"({status.done:,}/{status.total:,} done); is a worker consuming its queue?"
            )
    return status


def wait(
    store: Store, name: str, idle_timeout: float | None, on_update: Callable[[Status], None], settings: Settings | None = None
) -> Status:
    """`submit --wait`: follow the job, reaping dead workers' chunks, until it finishes or stalls."""
    from . import liveness
    from .broker import reaching_broker, shared_app

    settings = settings or Settings()
    client = liveness.connect(settings)

    def tick() -> None:
        if client is not None:
            with reaching_broker("reap dead workers' chunks"):
                liveness.reap_dead(client, shared_app())

    def working() -> bool:
        if client is None:
            return True  # without heartbeats there is no telling; never call the job stalled
        with reaching_broker("list the workers"):
            return liveness.held_by_job(client, name) > 0

    return follow(store, name, on_update, Polling(idle_timeout=idle_timeout), working=working, tick=tick)
