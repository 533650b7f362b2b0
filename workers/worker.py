"""`gridrender worker`: one solo-pool Celery worker process per GPU."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys


def run(queues: list[str], gpus: list[str] | None, loglevel: str = "INFO") -> int:
    if gpus:
        return _spawn_per_gpu(queues, gpus, loglevel)
    return _run_here(queues, loglevel)


def _run_here(queues: list[str], loglevel: str) -> int:
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from . import tasks

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
    tasks.app.worker_main(argv)
    return 0


def _spawn_per_gpu(queues: list[str], gpus: list[str], loglevel: str) -> int:
    children = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        cmd = [sys.executable, "-m", "gridrender", "worker", "-Q", ",".join(queues), "--loglevel", loglevel]
        children.append(subprocess.Popen(cmd, env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)
