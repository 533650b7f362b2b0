"""How many workers died holding a chunk: counted per (submission, chunk), in Redis.

A count belongs to one submission's attempt at a chunk: a resubmit starts from
zero, a stored chunk clears its count, `gridrender retry` clears it on purpose.
Each death is counted once however many reapers notice it (a set of the dead
workers' task ids), so a reaper that fails half-way and tries again counts nothing twice.

A retry also marks the chunk with its id: the copies of the chunk that the killed workers
left unacknowledged come back when the visibility timeout passes, and are dropped rather
than rendered beside the retried one (or, if the chunk kills again, counted against it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import redis

from ..errors import InputError

log = logging.getLogger(__name__)

KILLS = "gridrender:kills:"  # + job:submission:chunk -> set of "<worker>/<task>" that died holding it
KILLS_TTL = 7 * 24 * 3600  # a submission's counts outlive any run of it; then they go
RETRIED = "gridrender:retried:"  # + job:submission:chunk -> the id of the retry that sent it last
RETRYING = "gridrender:retrying:"  # + job -> the id of the `gridrender retry` running now
RETRYING_TTL = 600  # a retry sends a few chunks; a crashed one's lock goes after this
_DELETE_IF_OURS = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
POISON_KILLS = 2


class KillCounts:
    def __init__(self, client: redis.Redis):
        self.client = client

    @staticmethod
    def key(job: str, submission: str, chunk: str) -> str:
        return f"{KILLS}{job}:{submission}:{chunk}"

    def add(self, job: str, submission: str, chunk: str, death: str) -> int:
        """Count `death` (worker and task) against the chunk; the number of distinct deaths."""
        key = self.key(job, submission, chunk)
        pipe = self.client.pipeline()
        pipe.sadd(key, death)
        pipe.expire(key, KILLS_TTL)
        pipe.scard(key)
        return int(pipe.execute()[-1])

    def get(self, job: str, submission: str, chunk: str) -> int:
        """Deaths counted (0 when Redis cannot say: render it)."""
        try:
            return int(self.client.scard(self.key(job, submission, chunk)))
        except redis.RedisError:
            return 0

    def clear(self, job: str, submission: str, chunk: str) -> None:
        try:
            self.client.delete(self.key(job, submission, chunk))
        except redis.RedisError as exc:  # best effort: the count expires anyway
            log.warning("cannot clear the kill count of chunk %s: %s", chunk, exc)

    def supersede(self, job: str, submission: str, chunk: str, retry: str) -> None:
        """From now on only the message of `retry` renders this chunk, its kill count cleared; one transaction,
        raising when Redis fails (a count left behind would drop the retried message as poison)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(f"{RETRIED}{job}:{submission}:{chunk}", retry, ex=KILLS_TTL)
        pipe.delete(self.key(job, submission, chunk))
        pipe.execute()

    def retried(self, job: str, submission: str, chunk: str) -> str | None:
        """The retry that sent the chunk last, if any (None when Redis cannot say: render it)."""
        try:
            value = self.client.get(f"{RETRIED}{job}:{submission}:{chunk}")
        except redis.RedisError:
            return None
        return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None

    @contextlib.contextmanager
    def retrying(self, job: str, retry: str) -> Iterator[None]:
        """One `gridrender retry` of a job at a time: two at once could each supersede the other's message."""
        key = f"{RETRYING}{job}"
        if not self.client.set(key, retry, nx=True, ex=RETRYING_TTL):
            raise InputError(f"another `gridrender retry {job}` is running; try again when it has finished")
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError):  # the lock expires anyway
                self.client.eval(_DELETE_IF_OURS, 1, key, retry)
