"""Who is alive and what they hold: worker heartbeats, held chunks, and the reaper.

Redis' visibility timeout redelivers a dead worker's chunk only after an hour; this
notices within seconds. Each worker refreshes a TTL key (`gridrender:worker:<name>`,
naming its queues) and, while it renders, keeps its chunk's message in the
`gridrender:held` hash. A reaper (a thread of its own in every worker, and a step
of `submit --wait`) finds held chunks whose worker key expired and re-enqueues each
once (a Redis lock). The late redelivery of the original message finds the cells
stored and does no GPU work. A chunk that killed POISON_KILLS workers in one
submission is recorded as failed instead of being sent again.

A worker's name is unique per boot (`…@host#<boot>`): a container restarted in
place keeps its pid and host name, and must not pass for the worker that died.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis

from .broker import RENDER_TASK, redact
from .ledger import POISON_KILLS, KillCounts, Ledger
from .messages import ChunkMessage
from .settings import Settings
from .storage import RetryingStore
from .stores import open_store

log = logging.getLogger(__name__)

PREFIX = "gridrender:"
WORKER = PREFIX + "worker:"  # + name: {"queues": [...], "host": ..., "pid": ...}, expires
HELD = PREFIX + "held"  # hash: worker name -> {"message", "queue", "task", "chunk", "job", "submission"}
LOCK = PREFIX + "reap:"  # + worker name + task id: one reaper re-enqueues it
LOCK_TTL = 3600
# Forget a held entry only if it is still the one the reaper read: a worker whose heartbeat lapsed
# (a stalled host, a long GC) may have come back and hold its next chunk under the same name.
_FORGET_IF_UNCHANGED = (
    "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0"
)


def connect(settings: Settings) -> redis.Redis | None:
    """A Redis client on the broker, or None when the broker is not Redis (no heartbeats then)."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    # A call must give up well inside the heartbeat TTL: a beat blocked as long as the TTL lets the key
    # expire, and peers then reap a live worker's chunk and count a kill against it.
    timeout = min(10.0, settings.heartbeat_ttl / 3)
    return redis.Redis.from_url(settings.broker_url, socket_timeout=timeout, socket_connect_timeout=timeout)


@cache
def boot_id() -> str:
    """Unique to this process's life: a restart in place (same pid, same host name) gets another."""
    return f"{int(time.time()):x}{secrets.token_hex(3)}"


def worker_name() -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"gridrender-{os.getpid()}{'-gpu' + gpu if gpu else ''}@{socket.gethostname()}#{boot_id()}"


class Loop:
    """A daemon thread running `step` every `interval` seconds until stopped; a failed step is logged."""

    def __init__(self, name: str, interval: float, step: Callable[[], object]):
        self.interval, self.step = interval, step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval * 2 + 1)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001  (whatever a step raises, broker or storage down: the next step tries again)
                log.warning("%s failed: %s", self._thread.name, redact(str(exc)) or type(exc).__name__)


@dataclass
class Heartbeat:
    """A worker's own liveness: a thread refreshing its key, and the chunk it holds. Nothing else runs on it."""

    client: redis.Redis
    name: str
    queues: list[str]
    settings: Settings

    def __post_init__(self) -> None:
        self._loop = Loop("gridrender-heartbeat", self.settings.heartbeat_interval, self.beat)

    def start(self) -> None:
        self.beat()
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        with contextlib.suppress(redis.RedisError):  # the key expires anyway
            self.client.delete(WORKER + self.name)

    def beat(self) -> None:
        body = json.dumps({"queues": self.queues, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
        self.client.set(WORKER + self.name, body, px=int(self.settings.heartbeat_ttl * 1000))

    def hold(self, message: dict[str, Any], queue: str, task_id: str) -> None:
        """Say which chunk this worker renders. Best effort: without it, the visibility timeout still recovers it."""
        entry = {
            "message": message,
            "queue": queue,
            "task": task_id,
            "chunk": message.get("chunk"),
            "job": message.get("job"),
            "submission": message.get("submission"),
            "since": time.time(),
        }
        try:
            self.client.hset(HELD, self.name, json.dumps(entry))
        except redis.RedisError as exc:
            log.warning("cannot record the chunk held (%s); a crash would wait for the visibility timeout", redact(str(exc)))

    def release(self) -> None:
        try:
            self.client.hdel(HELD, self.name)
        except redis.RedisError as exc:
            log.warning("cannot release the chunk held (%s)", redact(str(exc)))


def consumed_queues(client: redis.Redis) -> dict[str, int]:
    """Queue name -> number of live workers consuming it."""
    counts: dict[str, int] = {}
    for key in client.scan_iter(WORKER + "*", count=500):
        raw = client.get(key)
        if raw:
            for queue in json.loads(raw).get("queues", []):
                counts[queue] = counts.get(queue, 0) + 1
    return counts


def held_by_job(client: redis.Redis, job: str) -> int:
    """Chunks of `job` that live workers hold right now."""
    return sum(1 for raw in client.hvals(HELD) if json.loads(raw).get("job") == job)


@dataclass
class Reaped:
    worker: str
    chunk: str
    requeued: bool  # False: the chunk killed POISON_KILLS workers and was recorded as failed


Send = Callable[[dict[str, Any], str], Any]
Poison = Callable[[dict[str, Any], int, str], None]  # (message, kills, last worker)


def reap(client: redis.Redis, send: Send, poisoned: Poison) -> list[Reaped]:
    """Re-enqueue the chunks of workers whose heartbeat expired; each once, by whoever gets the lock.

    Each entry stands alone: a broker or storage error on one is logged, its lock
    released and its entry kept for the next pass; the others go on.
    """
    reaped = []
    kills = KillCounts(client)
    held: dict[bytes, bytes] = client.hgetall(HELD)  # type: ignore[assignment]  # redis-py's sync client
    for raw_name, raw in held.items():
        name = raw_name.decode()
        if client.exists(WORKER + name):
            continue
        try:
            entry = json.loads(raw)
            lock = f"{LOCK}{name}:{entry['task']}"
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropping an unreadable held entry of %s: %s", name, exc)
            _forget(client, raw_name, raw)
            continue
        if not client.set(lock, b"1", nx=True, ex=LOCK_TTL):
            continue  # another reaper has it
        try:
            done = _reap_one(kills, name, entry, send, poisoned)
            _forget(client, raw_name, raw)
            reaped.append(done)
        except Exception as exc:  # noqa: BLE001  (each entry stands alone: whatever fails on one leaves the others)
            client.delete(lock)  # the next pass (here or in another reaper) tries again; the kill is counted once
            log.error(
                "cannot reap chunk %s of %s held by %s (will retry): %s",
                entry.get("chunk"),
                entry.get("job"),
                name,
                redact(str(exc)) or type(exc).__name__,
            )
    return reaped


def _forget(client: redis.Redis, name: bytes, raw: bytes) -> None:
    client.eval(_FORGET_IF_UNCHANGED, 1, HELD, name, raw)


def _reap_one(kills: KillCounts, name: str, entry: dict[str, Any], send: Send, poisoned: Poison) -> Reaped:
    """Count the death against the chunk, then send the chunk again or record it as poison."""
    message = entry["message"]
    chunk = entry.get("chunk") or entry["task"]
    killed = kills.add(str(message.get("job")), str(message.get("submission")), chunk, f"{name}/{entry['task']}")
    if killed >= POISON_KILLS:
        log.error("chunk %s of %s killed %d workers (last: %s); recording it as failed", chunk, entry.get("job"), killed, name)
        poisoned(message, killed, name)
    else:
        log.warning(
            "worker %s stopped heartbeating holding chunk %s of %s; re-enqueueing it on %s",
            name,
            chunk,
            entry.get("job"),
            entry["queue"],
        )
        send(message, entry["queue"])
    return Reaped(name, chunk, killed < POISON_KILLS)


def send_chunk(app: Any, message: dict[str, Any], queue: str) -> None:
    app.send_task(
        RENDER_TASK,
        args=[message],
        queue=queue,
        retry=False,
        argsrepr=f"[chunk {message.get('chunk')} of {message.get('job')}]",
        kwargsrepr="{}",
    )


def record_poisoned(client: redis.Redis, message: dict[str, Any], kills: int, last: str, deadline: float = 60) -> None:
    chunk = ChunkMessage.from_message(message)
    store = RetryingStore(open_store(chunk.output), deadline=deadline)
    with Ledger(store, chunk.job, kills=KillCounts(client)) as ledger:
        ledger.record_poisoned(chunk, kills, last)


def reap_dead(client: redis.Redis, app: Any, storage_deadline: float = 60) -> list[Reaped]:
    """The reaper as workers and `submit --wait` run it."""
    return reap(
        client,
        lambda message, queue: send_chunk(app, message, queue),
        lambda message, kills, last: record_poisoned(client, message, kills, last, storage_deadline),
    )


class Reaper(Loop):
    """The reaper on a thread of its own: a slow store or broker never delays a heartbeat."""

    def __init__(self, client: redis.Redis, app: Any, settings: Settings):
        super().__init__(
            "gridrender-reaper", settings.heartbeat_interval, lambda: reap_dead(client, app, settings.storage_deadline)
        )
