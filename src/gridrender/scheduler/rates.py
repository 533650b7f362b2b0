"""How fast workers render a model, and the chunk size that keeps a chunk short.

A chunk must finish well within the broker's visibility timeout (Redis redelivers a
chunk still running after it) and the pod's termination grace (a rollout kills a chunk
still running after it): `chunk_size` divides the job so a chunk's expected duration is
about `chunk_seconds`, at the workers' measured rate when one is published, else at a
conservative assumed rate, between 1 cell and MAX_CHUNK_CELLS.

Workers publish their rate per (model, dtype) in Redis (`publish`, an average over recent
chunks, kept a week); `measured` reads it. Torch-free: `submit` calls it. The rate counts
work, not cells (`cell_work`: one unit is a 512² image at 20 steps, hires pass included), so
a rate measured on small quick cells sizes a job of large hires cells by what they cost.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from .hires import Hires
from .models import ModelSpec
from .settings import Settings

if TYPE_CHECKING:
    import redis

MAX_CHUNK_CELLS = 4096  # above: progress records and task messages grow without a gain
RATE_TTL = 7 * 24 * 3600  # seconds a published rate is trusted
SMOOTHING = 0.3  # weight of the newest chunk in the published average
UNIT_WORK = 512 * 512 * 20  # pixels x steps of one unit of work: a 512² image at 20 steps

RateOf = Callable[[ModelSpec, str], float | None]  # (model, dtype) -> measured work/s, as `prepare` takes it


def cell_work(size: tuple[int, int], steps: int, denoise: float | None = None, hires: Hires | None = None) -> float:
    """A cell's work in units: pixels x steps of its passes (img2img and hires run denoise x steps)."""
    width, height = size
    work = width * height * steps * (denoise if denoise is not None else 1.0)
    if hires is not None:
        target = hires.target(width, height)
        work += target.width * target.height * (hires.steps or steps) * hires.denoise
    return max(work, 1.0) / UNIT_WORK


def rate_key(model: ModelSpec, dtype: str) -> str:
    identity = json.dumps(model.identity(), sort_keys=True)
    return f"gridrender:rate:{hashlib.sha256(identity.encode()).hexdigest()[:16]}:{dtype}"


def publish(client: redis.Redis, model: ModelSpec, dtype: str, work: float, seconds: float) -> float | None:
    """Fold a chunk's work per second (`cell_work` units) into the model's published rate; the rate now published."""
    if work <= 0 or seconds <= 0:
        return None
    key = rate_key(model, dtype)
    rate = work / seconds
    old = client.get(key)
    if old is not None:
        rate = SMOOTHING * rate + (1 - SMOOTHING) * float(old)
    client.set(key, f"{rate:.6g}", ex=RATE_TTL)
    return rate


def measured(client: redis.Redis, model: ModelSpec, dtype: str) -> float | None:
    """The published work per second (`cell_work` units) of one worker for this model and dtype, if any."""
    value = client.get(rate_key(model, dtype))
    try:
        rate = float(value) if value is not None else None
    except ValueError:
        return None
    return rate if rate is not None and math.isfinite(rate) and rate > 0 else None


def chunk_seconds(settings: Settings) -> float:
    """The target duration of a chunk: `chunk_seconds`, and never above a quarter of the visibility timeout."""
    return min(settings.chunk_seconds, settings.visibility_timeout / 4)


def chunk_size(total: int, settings: Settings, rate: float | None = None, work: float | None = None) -> int:
    """Cells per chunk: `chunk_cells`, grown so a job has at most `max_chunks` chunks, but never more
    than one worker renders in `chunk_seconds`; at least 1 cell, at most MAX_CHUNK_CELLS.

    GRIDRENDER_WORKER_RATE (cells/s, the operator's figure) wins; else `rate`, the measured work/s,
    over `work`, the job's costliest cell (`cell_work`); else `assumed_rate` cells/s.
    """
    wanted = max(settings.chunk_cells, math.ceil(total / settings.max_chunks))
    if settings.worker_rate:
        cells_per_second = settings.worker_rate
    elif rate:
        cells_per_second = rate / max(work or 1.0, 1e-9)
    else:
        cells_per_second = settings.assumed_rate
    by_duration = math.floor(cells_per_second * chunk_seconds(settings))
    return max(1, min(wanted, by_duration, MAX_CHUNK_CELLS))


def from_broker(settings: Settings) -> RateOf | None:
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
