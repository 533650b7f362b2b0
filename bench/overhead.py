"""gridrender's overhead over a plain diffusers loop, same grid, same machine, one run.

Run by hand:  python bench/overhead.py [--size 256] [--steps 10] [--seeds 16]
(a) a diffusers loop written the obvious way: pipe(prompt=[...], generator=[...]) per
    batch, each image saved as PNG into a folder;
(b) gridrender run (in process, local folder);
(c) gridrender submit -> one worker process -> S3 (a moto server on loopback).
All three use builtin:tiny, the same cells and batch size, and a loaded pipeline
(model load is excluded: every path loads it once). Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def job(args, output: str, name: str) -> dict:
    return {
        "name": name,
        "model": "builtin:tiny",
        "prompts": ["a cow standing in a field", "a lighthouse at dusk"],
        "negative_prompt": "lowres, blurry",
        "clip_skip": 1,
        "seeds": {"start": 0, "count": args.seeds},
        "sampler": "Euler a",
        "steps": args.steps,
        "guidance": 7.0,
        "width": args.size,
        "height": args.size,
        "dtype": "float32",
        "batch_size": args.batch,
        "output": output,
    }


def direct(args, plan, folder: Path) -> float:
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from gridrender.workers.pipelines import builtin_folder, quiet_libraries

    quiet_libraries()
    pipe = StableDiffusionPipeline.from_pretrained(builtin_folder("tiny"), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cells = list(plan.cells())
    folder.mkdir(parents=True)
    pipe("warm up", num_inference_steps=1, width=args.size, height=args.size)
    start = time.perf_counter()
    for i in range(0, len(cells), args.batch):
        batch = cells[i : i + args.batch]
        images = pipe(
            prompt=[c.prompt for c in batch],
            negative_prompt=[c.negative_prompt for c in batch],
            generator=[torch.Generator("cpu").manual_seed(c.seed) for c in batch],
            num_inference_steps=args.steps,
            guidance_scale=7.0,
            width=args.size,
            height=args.size,
        ).images
        for cell, image in zip(batch, images, strict=True):
            image.save(folder / f"{cell.id}.png")
    return time.perf_counter() - start


def gridrender_run(job_path: Path, plan) -> float:
    from gridrender.workers import local
    from gridrender.workers.render import Renderer

    renderer = Renderer()
    renderer.cache.get(plan.model, plan.dtype)  # load before timing, as (a) does
    started, renderer = local.start(job_path, renderer=renderer)
    start = time.perf_counter()
    result = local.render_missing(started, renderer)
    elapsed = time.perf_counter() - start
    assert result.rendered == plan.total and not result.failed, result
    return elapsed


def distributed(args, job_path: Path, warm_path: Path, tmp: Path) -> float:
    import boto3
    import redis

    from gridrender.scheduler import layout
    from gridrender.scheduler.broker import make_app
    from gridrender.scheduler.plan import prepare
    from gridrender.scheduler.settings import Settings
    from gridrender.scheduler.stores import open_store
    from gridrender.scheduler.submit import submit
    from tests.services import start_moto, start_worker, wait_for

    moto, endpoint = start_moto(tmp / "moto.log")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "GRIDRENDER_BROKER_URL": args.redis,
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "GRIDRENDER_"))})
    redis.Redis.from_url(args.redis).flushdb()
    boto3.client("s3").create_bucket(Bucket="bench")
    settings = Settings()
    app = make_app(settings)
    worker = None
    try:
        warm = prepare(warm_path, cuda=None, settings=settings)
        worker = start_worker(env, tmp / "worker.log")
        submit(warm, open_store(warm.job.output), app, settings=settings)
        store = open_store(warm.job.output)
        warm_id = next(warm.cells()).id
        wait_for(lambda: store.exists(layout.cell_record(warm_id)), 120, "the warm-up cell")

        start = time.perf_counter()
        plan = prepare(job_path, cuda=None, settings=settings)
        store = open_store(plan.job.output)
        submit(plan, store, app, settings=settings)
        ids = {c.id for c in plan.cells()}

        # The worker logs each chunk once its cells are stored; watching that log costs
        # the S3 server nothing (polling it with LISTs stole CPU from the renderer on a
        # 2-core machine). Storage is checked once at the end.
        def stored() -> int:
            return sum(int(n) for n in re.findall(r"chunk of bench: \d+ cells rendered, (\d+) stored", worker.text()))

        wait_for(lambda: stored() >= len(ids), 600, "every cell", interval=0.02)
        elapsed = time.perf_counter() - start
        assert all(store.exists(layout.cell_record(i)) for i in ids)
        return elapsed
    finally:
        if worker:
            worker.stop()
        moto.stop()
        redis.Redis.from_url(args.redis).flushdb()


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    from gridrender.scheduler.plan import prepare

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ.setdefault("XDG_CACHE_HOME", str(tmp / "cache"))
        paths = {}
        for key, output in (("local", str(tmp / "b")), ("s3", "s3://bench/grid"), ("warm", "s3://bench/warm")):
            data = job(args, output, "bench")
            if key == "warm":
                data.update(seeds=[999_999], prompts=["warm up"], name="warm")
            paths[key] = tmp / f"{key}.yaml"
            paths[key].write_text(yaml.safe_dump(data))
        plan = prepare(paths["local"], cuda=False)
        n = plan.total
        a = direct(args, plan, tmp / "a")
        b = gridrender_run(paths["local"], plan)
        c = distributed(args, paths["s3"], paths["warm"], tmp)
    print(f"grid: {n} cells, builtin:tiny {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, CPU")
    print(f"(a) diffusers loop:        {a:7.2f} s  {n / a:6.2f} img/s")
    print(f"(b) gridrender run:        {b:7.2f} s  {n / b:6.2f} img/s  ratio b/a = {a / b:.3f}")
    print(f"(c) submit -> worker -> S3: {c:6.2f} s  {n / c:6.2f} img/s  ratio c/a = {a / c:.3f}")


if __name__ == "__main__":
    main()
