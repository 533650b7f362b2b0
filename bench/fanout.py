"""Fan-out speed: the whole `gridrender submit` process for a 100,000-cell grid, against moto S3 and Redis.

Run by hand:  python bench/fanout.py [--cells 100000] [--redis-db 14] [--profile]
Starts a moto S3 server on loopback (a fresh bucket per run: a first submit) and uses
its own Redis DB on 127.0.0.1:6379 (flushed before and after). Prints the wall time of
the CLI process (imports, validation, expansion, job files, messages) against the 5 s
target, then a per-cell apply_async loop for comparison. `--profile` adds the top of a
cProfile of the same submit, in process.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import math
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from scale import start_services

TARGET = 5.0  # seconds for 100,000 cells, the whole process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--naive-cells", type=int, default=10_000, help="cells for the per-cell baseline")
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="a Redis server (its --redis-db is used)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    broker = f"{args.redis}/{args.redis_db}"
    moto, client, env = start_services(broker)
    import boto3

    s3 = boto3.client("s3")
    prompts = 10
    seeds = math.ceil(args.cells / (prompts * 2))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            times = []
            for run in range(args.runs):
                bucket = f"fanout-{run}"
                s3.create_bucket(Bucket=bucket)
                path = write_job(tmp, prompts, seeds, f"s3://{bucket}/grid")
                client.flushdb()
                start = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-m", "gridrender", "submit", path], env=env, capture_output=True, text=True, check=False
                )  # stderr raised below
                times.append(time.perf_counter() - start)
                if result.returncode != 0:
                    raise RuntimeError(result.stderr)
                queued = sum(client.llen(q) for q in client.scan_iter("gridrender*") if client.type(q) == b"list")
            best = min(times)
            cells = prompts * 2 * seeds
            print(
                f"gridrender submit (whole process, moto S3 + Redis): {cells:,} cells in {queued:,} messages: "
                f"best {best:.2f} s of {', '.join(f'{t:.2f}' for t in times)} "
                f"({cells / best:,.0f} cells/s); target {TARGET:.0f} s: {'met' if best <= TARGET else 'MISSED'}"
            )
            print(f"  ({result.stdout.strip()})")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import gridrender.cli"], env=env, check=True)
            print(f"  of which starting Python and importing the CLI: {time.perf_counter() - started:.2f} s")
            if args.profile:
                profile(tmp, prompts, seeds, s3, client)
            naive(write_job(tmp, prompts, seeds, "s3://fanout-0/grid"), args, broker, client)
    finally:
        client.flushdb()
        moto.terminate()
        moto.wait(10)


def write_job(tmp: str, prompts: int, seeds: int, output: str) -> str:
    job = {
        "name": "fanout",
        "model": "builtin:tiny",
        "prompts": [f"prompt number {i}" for i in range(prompts)],
        "clip_skip": [1, 2],
        "seeds": {"start": 0, "count": seeds},
        "dtype": "float16",
        "steps": 25,
        "width": 512,
        "height": 512,
        "output": output,
    }
    path = f"{tmp}/job-{output.split('/')[2]}.yaml"
    Path(path).write_text(yaml.safe_dump(job))
    return path


def profile(tmp: str, prompts: int, seeds: int, s3, client) -> None:
    from gridrender.scheduler.broker import shared_app
    from gridrender.scheduler.plan import check_output, prepare
    from gridrender.scheduler.submit import submit

    s3.create_bucket(Bucket="fanout-profile")
    path = write_job(tmp, prompts, seeds, "s3://fanout-profile/grid")
    client.flushdb()
    profiler = cProfile.Profile()
    profiler.enable()
    plan = prepare(path, cuda=None)
    submit(plan, check_output(plan), shared_app())
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def naive(job: str, args, broker: str, client) -> None:
    from gridrender.scheduler.broker import RENDER_TASK, make_app
    from gridrender.scheduler.plan import prepare
    from gridrender.scheduler.settings import Settings

    client.flushdb()
    app = make_app(Settings(broker_url=broker))
    plan = prepare(job, cuda=None)
    cells = list(itertools.islice(plan.cells(), args.naive_cells))
    start = time.perf_counter()
    for cell in cells:
        app.send_task(RENDER_TASK, args=[{"cell": cell.params(), "id": cell.id}], queue="naive")
    elapsed = time.perf_counter() - start
    print(
        f"per-cell apply_async: {len(cells):,} cells: {elapsed:.2f} s ({len(cells) / elapsed:,.0f} cells/s; "
        f"{args.cells / (len(cells) / elapsed):.1f} s extrapolated to {args.cells:,})"
    )


if __name__ == "__main__":
    main()
