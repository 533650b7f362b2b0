"""`gridrender worker`: one solo-pool Celery worker process per GPU.

A worker consumes the queues it is given, or its model's queue plus the shared
queue (`--model`), or only the shared queue (bare): every submitted chunk finds a
worker. While it runs it heartbeats to Redis and reaps the chunks of workers that
stopped heartbeating (the reaper, on a thread of its own).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from celery import Celery, Task

from gridrender.scheduler import liveness
from gridrender.scheduler.broker import SHARED_QUEUE, model_queue
from gridrender.scheduler.errors import InputError
from gridrender.scheduler.models import resolve
from gridrender.scheduler.settings import Settings

from . import policy
from .compiled import EAGER, cache_stats

log = logging.getLogger(__name__)


def queues_for(queues: list[str], model: str | None, settings: Settings) -> list[str]:
    """Explicit queues as given; else the model's queue (if any) and the shared queue."""
    if queues:
        return queues
    names = [model_queue(resolve(model, settings=settings))] if model else []
    return [*names, SHARED_QUEUE]


@dataclass(frozen=True)
class Options:
    loglevel: str = "INFO"
    preload: str | None = None  # a model to load before taking tasks
    # (width, height, batch) shapes to compile for before taking tasks: SDXL jobs mix aspect buckets
    warmup: tuple[tuple[int, int, int], ...] = ()
    compile: bool = True  # False: `--no-compile`, eager everywhere

    def argv(self) -> list[str]:
        """The same options for a child `gridrender worker` process."""
        args = ["--loglevel", self.loglevel]
        if self.preload:
            args += ["--preload", self.preload]
        for shape in self.warmup:
            args += ["--warmup", "{}x{}:{}".format(*shape)]
        return args + ([] if self.compile else ["--no-compile"])


def parse_warmup(text: str) -> tuple[int, int, int]:
    """`512x512:8` -> (512, 512, 8)."""
    size, _, batch = text.partition(":")
    width, _, height = size.partition("x")
    try:
        values = int(width), int(height), int(batch or 1)
    except ValueError:
        raise InputError(f"--warmup must look like 512x512:8 (width x height : batch), got {text!r}") from None
    if min(values) < 1 or values[0] % 8 or values[1] % 8:
        raise InputError(f"--warmup: sizes must be positive multiples of 8 and the batch positive, got {text!r}")
    return values


def run(queues: list[str], gpus: list[str] | None, options: Options) -> int:
    if gpus:
        return _spawn_per_gpu(queues, gpus, options)
    return _run_here(queues, options)


def _preload(options: Options, settings: Settings) -> None:
    """Load (and warm up) the model before taking tasks, then say so in a file (a readiness probe)."""
    from . import tasks

    assert options.preload
    renderer = tasks.renderer()
    dtype = settings.auto_dtype  # what `dtype: auto` means for the cells submit sends
    model = tasks.local_model(resolve(options.preload, settings=settings))
    renderer.cache.get(model, dtype)
    for shape in options.warmup:
        renderer.warm_up(model, dtype, *shape)
    if options.warmup:
        log.info("compile cache: %s", cache_stats())
    with open(settings.ready_file, "w") as f:
        f.write(f"{options.preload} {dtype}\n")


def _run_here(queues: list[str], options: Options) -> int:
    logging.basicConfig(level=options.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from . import tasks

    settings = Settings()
    tasks.compile_mode = None if options.compile else EAGER
    if options.preload:
        _preload(options, settings)
    name = liveness.worker_name()
    stop = _start_liveness(name, queues, settings, tasks.app, tasks.render_chunk)
    argv = [
        "worker",
        "--pool=solo",  # one process owns the GPU and its resident pipeline
        "--prefetch-multiplier=1",
        f"--queues={','.join(queues)}",
        f"--hostname={name}",
        f"--loglevel={options.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        tasks.app.worker_main(argv)
    finally:
        stop()
        if options.preload and os.path.exists(settings.ready_file):
            os.unlink(settings.ready_file)
    return 0


def _start_liveness(name: str, queues: list[str], settings: Settings, app: Celery, task: Task) -> Callable[[], None]:
    """Heartbeat, the chunk `task` is running, and the reaper (re-sending through `app`), each on its own;
    returns what stops them."""
    client = liveness.connect(settings)
    if client is None:
        log.warning("the broker is not Redis: no heartbeats; a dead worker's chunk waits for the visibility timeout")
        return lambda: None
    heartbeat = liveness.Heartbeat(client, name, queues, settings)
    reaper = liveness.Reaper(client, app, settings)
    heartbeat.start()
    release = policy.hold_chunks(task, heartbeat)
    reaper.start()
    log.info("heartbeat %s every %.0fs on %s", name, settings.heartbeat_interval, ", ".join(queues))

    def stop() -> None:
        reaper.stop()
        release()
        heartbeat.stop()

    return stop


def _spawn_per_gpu(queues: list[str], gpus: list[str], options: Options) -> int:
    settings = Settings()
    children = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "GRIDRENDER_READY_FILE": f"{settings.ready_file}-gpu{gpu}"}
        cmd = [sys.executable, "-m", "gridrender", "worker", "-Q", ",".join(queues), *options.argv()]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
