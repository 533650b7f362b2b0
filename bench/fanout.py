"""Fan-out speed: `submit` of a 100,000-cell grid vs a per-cell apply_async loop.

Run by hand:  python bench/fanout.py [--cells 100000] [--redis redis://127.0.0.1:6379/14]
Uses its own Redis DB (flushed before and after) and a temporary local output folder.
Prints cells enqueued per second for both, from the same run.
"""
from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time

import redis
import yaml

from gridrender.scheduler.broker import RENDER_TASK, make_app
from gridrender.scheduler.plan import prepare
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.storage import LocalStore
from gridrender.scheduler.submit import submit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--naive-cells", type=int, default=10_000, help="cells for the per-cell baseline")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    settings = Settings(broker_url=args.redis)
    app = make_app(settings)
    prompts = 10
    seeds = math.ceil(args.cells / (prompts * 2))
    with tempfile.TemporaryDirectory() as tmp:
        job = {"name": "fanout", "model": "builtin:tiny", "prompts": [f"prompt number {i}" for i in range(prompts)],
               "clip_skip": [1, 2], "seeds": {"start": 0, "count": seeds}, "dtype": "float16", "steps": 25,
               "width": 512, "height": 512, "output": f"{tmp}/out"}
        path = f"{tmp}/job.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(job, f)

        start = time.perf_counter()
        plan = prepare(path, cuda=None, settings=settings)
        expanded = time.perf_counter()
        sent = submit(plan, LocalStore(f"{tmp}/out"), app, settings=settings)
        done = time.perf_counter()
        assert sum(client.llen(q) for q in sent.queues) == sent.chunks, (sent.queues, sent.chunks)
        total = done - start
        print(f"gridrender submit: {sent.cells:,} cells in {sent.chunks:,} messages: {total:.2f} s "
              f"({sent.cells / total:,.0f} cells/s; parse+expand {expanded - start:.2f} s, "
              f"job files + enqueue {done - expanded:.2f} s)")

        client.flushdb()
        naive = list(itertools.islice(plan.cells(), args.naive_cells))
        start = time.perf_counter()
        for cell in naive:
            app.send_task(RENDER_TASK, args=[{"cell": cell.params(), "id": cell.id}], queue="naive")
        elapsed = time.perf_counter() - start
        print(f"per-cell apply_async: {len(naive):,} cells: {elapsed:.2f} s ({len(naive) / elapsed:,.0f} cells/s; "
              f"{args.cells / (len(naive) / elapsed):.1f} s extrapolated to {args.cells:,})")
        print(f"speed-up: {(sent.cells / total) / (len(naive) / elapsed):.1f}x")
    client.flushdb()


if __name__ == "__main__":
    main()
