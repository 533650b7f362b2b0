"""How fast workers render a model, and the chunk size that keeps a chunk short.

A chunk must finish well within the broker's visibility timeout (Redis redelivers a
chunk still running after it) and the pod's termination grace (a rollout kills a chunk
still running after it): `chunk_size` divides the job so a chunk's expected duration is
about `chunk_seconds`, at the workers' measured rate when one is published, else at a
conservative assumed rate, between 1 cell and MAX_CHUNK_CELLS.

Workers publish their rate per (model, dtype) in Redis (`publish`, an average over recent
chunks, kept a week); `measured` reads it. Torch-free: `submit` calls it.
"""
from __future__ import annotations

import hashlib
import json
import math

from .models import ModelSpec
from .settings import Settings

MAX_CHUNK_CELLS = 4096  # above: progress records and task messages grow without a gain
RATE_TTL = 7 * 24 * 3600  # seconds a published rate is trusted
SMOOTHING = 0.3  # weight of the newest chunk in the published average


def rate_key(model: ModelSpec, dtype: str) -> str:
    identity = json.dumps(model.identity(), sort_keys=True)
    return f"gridrender:rate:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:{dtype}"


def publish(client, model: ModelSpec, dtype: str, cells: int, seconds: float) -> float | None:
    """Fold a chunk's cells per second into the model's published rate; the rate now published."""
    if cells <= 0 or seconds <= 0:
        return None
    key = rate_key(model, dtype)
    rate = cells / seconds
    old = client.get(key)
    if old is not None:
        rate = SMOOTHING * rate + (1 - SMOOTHING) * float(old)
    client.set(key, f"{rate:.6g}", ex=RATE_TTL)
    return rate


def measured(client, model: ModelSpec, dtype: str) -> float | None:
    """The published cells per second of one worker for this model and dtype, if any."""
    value = client.get(rate_key(model, dtype))
    try:
        rate = float(value) if value is not None else None
    except ValueError:
        return None
    return rate if rate is not None and math.isfinite(rate) and rate > 0 else None


def chunk_seconds(settings: Settings) -> float:
    """The target duration of a chunk: `chunk_seconds`, and never above a quarter of the visibility timeout."""
    return min(settings.chunk_seconds, settings.visibility_timeout / 4)


def chunk_size(total: int, settings: Settings, rate: float | None = None) -> int:
    """Cells per chunk: `chunk_cells`, grown so a job has at most `max_chunks` chunks, but never more
    than `rate` (cells/s of one worker; else GRIDRENDER_WORKER_RATE, else `assumed_rate`) renders in
    `chunk_seconds`; at least 1 cell, at most MAX_CHUNK_CELLS."""
    wanted = max(settings.chunk_cells, math.ceil(total / settings.max_chunks))
    rate = rate or settings.worker_rate or settings.assumed_rate
    by_duration = math.floor(rate * chunk_seconds(settings))
    return max(1, min(wanted, by_duration, MAX_CHUNK_CELLS))


def from_broker(settings: Settings):
    """`measured` against the broker's Redis, as `prepare(rate_of=...)` takes it; None when the broker
    is not Redis. A broker that cannot be reached gives no rate (the assumed one): submit reports it."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)

    def rate_of(model: ModelSpec, dtype: str) -> float | None:
        try:
            return measured(client, model, dtype)
        except (redis.RedisError, OSError):
            return None

    return rate_of
