"""Who is alive and what they hold: worker heartbeats, held chunks, and the reaper.

Redis' visibility timeout redelivers a dead worker's chunk only after an hour; this
notices within seconds. Each worker refreshes a TTL key (`gridrender:worker:<name>`,
naming its queues) and, while it renders, keeps its chunk's message in the
`gridrender:held` hash. A reaper (in every worker, and in `submit --wait`) finds held
chunks whose worker key expired and re-enqueues each once (a Redis lock). The late
redelivery of the original message finds the cells stored and does no GPU work. A
chunk that killed two workers is recorded as failed instead of being sent again.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import progress
from .broker import RENDER_TASK, redact
from .messages import ChunkMessage
from .settings import Settings
from .storage import RetryingStore
from .stores import open_store

log = logging.getLogger(__name__)

PREFIX = "gridrender:"
WORKER = PREFIX + "worker:"  # + name: {"queues": [...], "host": ..., "chunk": ...}, expires
HELD = PREFIX + "held"  # hash: worker name -> {"message", "queue", "task", "chunk", "job"}
KILLS = PREFIX + "kills:"  # + chunk id: workers that died holding it
LOCK = PREFIX + "reap:"  # + worker name + task id: one reaper re-enqueues it
POISON_KILLS = 2
KILLS_TTL = 30 * 24 * 3600


def connect(settings: Settings) -> redis.Redis | None:
    """A Redis client on the broker, or None when the broker is not Redis (no heartbeats then)."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    return redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10)


def worker_name() -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"gridrender-{os.getpid()}{'-gpu' + gpu if gpu else ''}@{socket.gethostname()}"


@dataclass
class Heartbeat:
    """A worker's own liveness: a background thread refreshing its key, and what it holds."""

    client: redis.Redis
    name: str
    queues: list[str]
    settings: Settings
    on_beat: Callable[[], object] = lambda: None  # the worker's reaper rides on the heartbeat

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gridrender-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.heartbeat_interval * 2)
        try:
            self.client.delete(WORKER + self.name)
        except redis.RedisError:
            pass

    def beat(self) -> None:
        body = json.dumps({"queues": self.queues, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
        self.client.set(WORKER + self.name, body, px=int(self.settings.heartbeat_ttl * 1000))

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.beat()
                self.on_beat()
            except redis.RedisError as exc:  # the broker restarting: keep trying, the TTL covers it
                log.warning("heartbeat failed: %s", redact(str(exc)))

    def hold(self, message: dict, queue: str, task_id: str) -> None:
        """Say which chunk this worker renders. Best effort: without it, the visibility timeout still recovers it."""
        entry = {"message": message, "queue": queue, "task": task_id, "chunk": message.get("chunk"),
                 "job": message.get("job"), "since": time.time()}
        try:
            self.client.hset(HELD, self.name, json.dumps(entry))
        except redis.RedisError as exc:
            log.warning("cannot record the chunk held (%s); a crash would wait for the visibility timeout",
                        redact(str(exc)))

    def release(self) -> None:
        try:
            self.client.hdel(HELD, self.name)
        except redis.RedisError as exc:
            log.warning("cannot release the chunk held (%s)", redact(str(exc)))


def kills(client: redis.Redis, chunk: str) -> int:
    """Workers that died holding the chunk (0 when Redis cannot say: render it)."""
    try:
        return int(client.get(KILLS + chunk) or 0)
    except redis.RedisError:
        return 0


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


def reap(client: redis.Redis, send: Callable[[dict, str], Any], poisoned: Callable[[dict], None]) -> list[Reaped]:
    """Re-enqueue the chunks of workers whose heartbeat expired; each once, by whoever gets the lock."""
    reaped = []
    held: dict[bytes, bytes] = client.hgetall(HELD)  # type: ignore[assignment]  # redis-py's sync client
    for raw_name, raw in held.items():
        name = raw_name.decode()
        if client.exists(WORKER + name):
            continue
        entry = json.loads(raw)
        if not client.set(f"{LOCK}{name}:{entry['task']}", b"1", nx=True, ex=3600):
            continue  # another reaper has it
        chunk = entry.get("chunk") or entry["task"]
        killed = client.incr(KILLS + chunk)
        client.expire(KILLS + chunk, KILLS_TTL)
        if killed >= POISON_KILLS:
            log.error("chunk %s of %s killed %d workers (last: %s); recording it as failed",
                      chunk, entry.get("job"), killed, name)
            poisoned(entry["message"])
        else:
            log.warning("worker %s stopped heartbeating holding chunk %s of %s; re-enqueueing it on %s",
                        name, chunk, entry.get("job"), entry["queue"])
            send(entry["message"], entry["queue"])
        client.hdel(HELD, name)
        reaped.append(Reaped(name, chunk, killed < POISON_KILLS))
    return reaped


def send_chunk(app: Any, message: dict, queue: str) -> None:
    app.send_task(RENDER_TASK, args=[message], queue=queue,
                  argsrepr=f"[chunk {message.get('chunk')} of {message.get('job')}]", kwargsrepr="{}")


def record_poisoned(message: dict) -> None:
    chunk = ChunkMessage.from_message(message)
    progress.record_poisoned(RetryingStore(open_store(chunk.output), deadline=60), chunk, POISON_KILLS)


def reap_dead(client: redis.Redis, app: Any) -> list[Reaped]:
    """The reaper as workers and `submit --wait` run it."""
    return reap(client, lambda message, queue: send_chunk(app, message, queue), record_poisoned)
