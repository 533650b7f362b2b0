"""Real services for tests: a moto S3 server, a private Redis DB, worker processes.

Every helper waits for readiness with a bounded timeout and stops exactly the
processes it started (each in its own process group).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REDIS_DB = 13  # gridrender's tests own this DB number and flush only it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Process:
    """A subprocess in its own process group, with its output in a log file."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.log = log
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()


def start_moto(log: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), log)
    endpoint = f"http://127.0.0.1:{port}"

    def up():
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 30, "the moto S3 server")
    return proc, endpoint


def start_worker(env: dict, log: Path, queues: str) -> Process:
    proc = Process([sys.executable, "-m", "gridrender", "worker", "-Q", queues], env, log)
    wait_for(lambda: " ready." in proc.text() or not proc.alive(), 60, "the worker to be ready")
    if not proc.alive():
        raise RuntimeError("worker exited:\n" + proc.text())
    return proc
