"""`gridrender worker`: one solo-pool Celery worker process per GPU."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys


READY_FILE = os.environ.get("GRIDRENDER_READY_FILE", "/tmp/gridrender-ready")


def run(queues: list[str], gpus: list[str] | None, loglevel: str = "INFO", preload: str | None = None) -> int:
    if gpus:
        return _spawn_per_gpu(queues, gpus, loglevel, preload)
    return _run_here(queues, loglevel, preload)


def _preload(source: str) -> None:
    """Load the model before taking tasks, then say so in a file (a readiness probe)."""
    from gridrender.scheduler.grid import resolve_dtype
    from gridrender.scheduler.models import resolve
    from gridrender.scheduler.settings import Settings

    from . import tasks

    settings = Settings()
    renderer = tasks.renderer()
    auto = resolve_dtype("auto", renderer.device.type == "cuda")
    dtype = os.environ.get("GRIDRENDER_PRELOAD_DTYPE") or (auto if renderer.device.type == "cuda" else settings.auto_dtype)
    renderer.cache.get(tasks.local_model(resolve(source, settings=settings)), dtype)
    with open(READY_FILE, "w") as f:
        f.write(f"{source} {dtype}\n")


def _run_here(queues: list[str], loglevel: str, preload: str | None) -> int:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from . import tasks

    if preload:
        _preload(preload)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    name = f"gridrender-{os.getpid()}{'-gpu' + gpu if gpu else ''}@{socket.gethostname()}"
    argv = [
        "worker",
        "--pool=solo",  # one process owns the GPU and its resident pipeline
        "--prefetch-multiplier=1",
        f"--queues={','.join(queues)}",
        f"--hostname={name}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    try:
        tasks.app.worker_main(argv)
    finally:
        if preload and os.path.exists(READY_FILE):
            os.unlink(READY_FILE)
    return 0


def _spawn_per_gpu(queues: list[str], gpus: list[str], loglevel: str, preload: str | None) -> int:
    children = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "GRIDRENDER_READY_FILE": f"{READY_FILE}-gpu{gpu}"}
        cmd = [sys.executable, "-m", "gridrender", "worker", "-Q", ",".join(queues), "--loglevel", loglevel]
        if preload:
            cmd += ["--preload", preload]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
