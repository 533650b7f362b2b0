"""A million-cell job on this machine: submit, status, resubmit and finalize against real services.

Run by hand:  python bench/scale.py [--cells 1000000] [--other-cells 100000] [--redis-db 14] [--rate 0.1]
(`--cells 5000000` is the largest job GRIDRENDER_MAX_CELLS allows by default.)
Starts a moto S3 server on loopback; uses the Redis of GRIDRENDER_BROKER_URL's host
(default 127.0.0.1:6379) in its own DB, which it flushes before and after. Workers
are not run: "half done" and "finished" are written as the progress records workers
write, so what is measured is the scheduler side alone:
  - validate and submit of the job: wall time and peak RSS of the CLI process;
  - status with half the chunks done, in a bucket holding --other-cells cells of other
    jobs: wall time and the S3 requests it made (compared with an empty bucket);
  - resubmit of the finished job: S3 list calls and messages enqueued;
  - finalize of the finished job (a streamed manifest line per cell): time and RSS.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


def measured(*args: str, env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of `gridrender ARGS` in its own process.

    Through /usr/bin/time: a child forked from this (large) process would count this
    process's pages in its own peak RSS until it execs.
    """
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.perf_counter()
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, sys.executable, "-m", "gridrender", *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )  # stderr raised below
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"gridrender {' '.join(args)} failed:\n{result.stderr}")
        return seconds, int(rss.read().split()[-1]) / 1024, result.stdout


class Requests:
    """Counts the S3 requests a boto3 client makes, by operation."""

    def __init__(self, client):
        self.counts: Counter = Counter()
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model, **_):
        self.counts[model.name] += 1

    def reset(self) -> Counter:
        counts, self.counts = self.counts, Counter()
        return counts


def start_services(broker: str) -> tuple[subprocess.Popen, Any, dict[str, str]]:
    """A moto S3 server, the broker's Redis DB flushed, and the environment (also this process's) that
    points gridrender at both: (moto, redis client, env)."""
    import redis

    moto, endpoint = start_moto()
    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "GRIDRENDER_BROKER_URL": broker,
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    return moto, client, env


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--other-cells", type=int, default=100_000)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="a Redis server (its --redis-db is used)")
    parser.add_argument("--rate", type=float, default=0.1, help="img/s of a slow worker: the chunk duration it implies")
    args = parser.parse_args()

    import boto3

    moto, client, env = start_services(f"{args.redis}/{args.redis_db}")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="scale-bench")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = write_job(Path(tmp), args.cells)
            seconds, rss, _ = measured("validate", str(job), env=env)
            print(f"validate: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
            seconds, rss, out = measured("submit", str(job), env=env)
            queued = client.llen("gridrender")
            print(f"submit: {seconds:.1f} s, peak RSS {rss:.0f} MiB, {queued:,} messages ({out.strip()})")

            big = Submitted.read(args.rate)
            big.record_done(big.chunks[: len(big.chunks) // 2])
            status_half_done(big, s3, args.other_cells)
            big.record_done(big.chunks[len(big.chunks) // 2 :])
            resubmit_and_finalize(big, job, env, client)
    finally:
        client.flushdb()
        moto.terminate()
        moto.wait(10)


def write_job(folder: Path, cells: int) -> Path:
    prompts = ", ".join(f"a prompt number {i} with a few more words" for i in range(10))
    job = folder / "big.yaml"
    job.write_text(
        f"name: big\nmodel: builtin:tiny\nprompts: [{prompts}]\nclip_skip: 1\n"
        f"seeds: {{start: 0, count: {cells // 10}}}\noutput: s3://scale-bench/grid\n"
    )
    print(f"job: {cells:,} cells (10 prompts x {cells // 10:,} seeds), builtin:tiny, S3 on moto, Redis")
    return job


@dataclass
class Submitted:
    """The submitted job as the benchmark reads and completes it, its S3 requests counted."""

    store: Any  # S3Store, Ledger, Submission, Plan: gridrender is imported once the environment is set
    requests: Requests
    ledger: Any
    record: Any
    plan: Any
    chunks: list[tuple[str, int]]  # (id, cells): ids only, bounded memory

    @classmethod
    def read(cls, rate: float) -> Submitted:
        """The job's plan and chunks; prints the chunk size and the duration it implies at `rate` img/s."""
        from gridrender.scheduler.ledger import Ledger
        from gridrender.scheduler.s3 import S3Store
        from gridrender.scheduler.settings import Settings

        store = S3Store.from_url("s3://scale-bench/grid")
        requests = Requests(store.client)
        ledger = Ledger(store, "big")
        record = ledger.current()
        plan = ledger.plan(record)
        chunks = [(chunk.id, len(chunk.cells)) for chunk in plan.chunks()]
        visibility = Settings().visibility_timeout
        duration = plan.chunk_cells / rate
        print(
            f"chunks: {len(chunks):,} of up to {plan.chunk_cells:,} cells; at {rate} img/s a chunk runs "
            f"{duration:,.0f} s, {'under' if duration < visibility else 'OVER'} the visibility timeout "
            f"({visibility:,} s)"
        )
        return cls(store, requests, ledger, record, plan, chunks)

    def record_done(self, chunks: list[tuple[str, int]]) -> None:
        """Progress records saying these chunks are complete, as workers would write them."""

        def done(chunk: tuple[str, int]) -> None:
            chunk_id, cells = chunk
            self.ledger.record(self.plan.partition, chunk_id, [], cells, {}, self.record.id, "bench")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(done, chunks))


def status_half_done(big: Submitted, s3, other_cells: int) -> None:
    """`status` of the half-done job: alone in the bucket, then beside other jobs' cells."""
    from gridrender.scheduler.status import job_status

    big.requests.reset()
    start = time.perf_counter()
    st = job_status(big.store, "big")
    empty_seconds, empty_requests = time.perf_counter() - start, sum(big.requests.reset().values())
    print(
        f"status, half done, no other cells in the bucket: {empty_seconds:.2f} s, {empty_requests} requests "
        f"({st.done:,}/{st.total:,} done)"
    )

    def other(i):
        s3.put_object(Bucket="scale-bench", Key=f"grid/cells/{i:016x}.json", Body=b"{}")

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(other, range(other_cells)))
    print(f"(wrote {other_cells:,} cells of other jobs in {time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    st = job_status(big.store, "big")
    seconds, counts = time.perf_counter() - start, big.requests.reset()
    print(
        f"status, half done, {other_cells:,} other cells: {seconds:.2f} s, {sum(counts.values())} "
        f"requests {dict(counts)} ({st.done:,}/{st.total:,} done)"
    )


def resubmit_and_finalize(big: Submitted, job: Path, env: dict[str, str], client) -> None:
    """The finished job submitted again (by the CLI, then in process to count its list calls), then finalized."""
    client.delete("gridrender")
    seconds, rss, out = measured("submit", str(job), env=env)
    print(
        f"resubmit of the finished job: {seconds:.1f} s, peak RSS {rss:.0f} MiB, "
        f"{client.llen('gridrender')} messages ({out.strip()})"
    )
    big.requests.reset()
    from gridrender.scheduler.broker import shared_app
    from gridrender.scheduler.plan import prepare
    from gridrender.scheduler.submit import submit  # in process, to count its list calls

    sent = submit(prepare(job, cuda=None), big.store, shared_app())
    counts = big.requests.reset()
    print(
        f"resubmit, counted in process: {counts['ListObjectsV2']} list calls, {sum(counts.values())} requests, "
        f"{sent.chunks} chunks enqueued"
    )

    seconds, rss, out = measured("finalize", "big", "--output", "s3://scale-bench/grid", env=env)
    print(f"finalize of the finished job: {seconds:.1f} s, peak RSS {rss:.0f} MiB ({out.strip()})")


if __name__ == "__main__":
    main()
