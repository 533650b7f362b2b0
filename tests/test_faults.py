"""Faults: killed workers, a flushed Redis, an S3 outage, OOM, a poison cell, SIGTERM.

Each test runs real worker processes against real Redis and a real S3 endpoint and
checks the promises: no cell lost, none rendered twice, nothing overwritten.
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from tests.services import TcpProxy, wait_for

pytestmark = pytest.mark.faults

SHARED = "gridrender"  # workers here are bare: they consume the shared queue submit uses when none listens
SMALL = dict(dtype="float32", steps=2, batch_size=4, clip_skip=[1, 2], prompts=["a cow", "a barn"])


def done(cluster, prefix="grid/cells/") -> int:
    return len([k for k in cluster.keys(prefix) if k.endswith(".json")])


def assert_each_cell_once(cluster, expected: int) -> None:
    versions = cluster.versions("grid/cells/")
    pngs = [k for k in versions if k.endswith(".png")]
    records = [k for k in versions if k.endswith(".json")]
    assert len(pngs) == len(records) == expected, (len(pngs), len(records))
    overwritten = {k: v for k, v in versions.items() if v > 1}
    assert not overwritten, overwritten
    assert not [k for k in cluster.keys("grid/") if "tmp" in k.rsplit("/", 1)[-1]]


def test_workers_killed_repeatedly_during_a_200_cell_job(cluster, job_file):
    """SIGKILL four workers mid-job; the fifth finishes. Every cell exactly once.

    The visibility timeout stays at its default (an hour): the killed workers' chunks
    come back through their expired heartbeats."""
    env = {"GRIDRENDER_CHUNK_CELLS": "8"}
    path = job_file(output=cluster.output, **SMALL, seeds={"start": 0, "count": 50})
    result = cluster.cli("submit", str(path), **env)
    assert "200 cells in 25 chunks" in result.stdout, result.stdout
    kills = []
    for _ in range(4):
        worker = cluster.worker(**env)
        before = done(cluster)
        wait_for(lambda: done(cluster) > before, 60, "progress before the kill", interval=0.05)
        time.sleep(0.3)  # land inside a chunk
        worker.kill()
        kills.append(done(cluster))
    assert kills[-1] < 200, "the job finished before the last kill; make chunks slower"
    cluster.worker(**env)  # its reaper re-enqueues the killed workers' chunks once their heartbeats expire
    wait_for(lambda: done(cluster) == 200, 180, "all 200 cells")
    assert_each_cell_once(cluster, 200)
    print(f"cells stored at each kill: {kills}")


def test_redis_flushed_mid_job_then_resubmit_finishes_only_the_missing(cluster, job_file):
    env = {"GRIDRENDER_CHUNK_CELLS": "8"}
    path = job_file(output=cluster.output, **SMALL, seeds={"start": 0, "count": 50})
    cluster.cli("submit", str(path), **env)
    cluster.worker(**env)
    wait_for(lambda: done(cluster) >= 40, 120, "40 cells")
    redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"]).flushdb()  # a restart without persistence
    time.sleep(2)  # the chunk in hand finishes; nothing else is queued
    stored = done(cluster)
    status = cluster.cli("status", "t", "--output", cluster.output)
    reported = int(re.search(r"t: (\d+)/200 done", status.stdout)[1])
    assert reported <= done(cluster)  # status counts storage, never the queue
    again = cluster.cli("submit", str(path), "--wait", **env)
    assert again.returncode == 0, again.stderr
    enqueued = int(re.search(r": ([\d,]+) cells in", again.stdout)[1])
    assert enqueued <= 200 - stored
    assert_each_cell_once(cluster, 200)
    print(f"redis flush: {stored} cells stored at the flush, status said {reported}, resubmit enqueued {enqueued}")


@contextlib.contextmanager
def s3_down_mid_job(cluster, job_file, chunk_cells: int, after: int, **worker_env: str) -> Iterator[tuple]:
    """An 80-cell job whose CLI and worker reach S3 through a proxy, taken down once `after` cells are stored.

    Yields (proxy, worker, env): the test brings S3 back with `proxy.up()`; `env` routes a CLI through the proxy.
    """
    proxy = TcpProxy(int(cluster.env["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]))
    try:
        env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}", "GRIDRENDER_CHUNK_CELLS": str(chunk_cells)}
        path = job_file(output=cluster.output, **SMALL, seeds={"start": 0, "count": 20})
        cluster.cli("submit", str(path), **env)
        worker = cluster.worker(**env, **worker_env)
        wait_for(lambda: done(cluster) >= after, 120, f"{after} cells")
        proxy.down()
        yield proxy, worker, env
    finally:
        proxy.close()


def test_s3_down_for_20_seconds_mid_job(cluster, job_file):
    """Uploads retry with backoff through a 20 s outage; no cell is rendered twice."""
    with s3_down_mid_job(cluster, job_file, chunk_cells=40, after=10) as (proxy, worker, _env):
        time.sleep(20)
        proxy.up()
        wait_for(lambda: done(cluster) == 80, 240, "all 80 cells")
        assert_each_cell_once(cluster, 80)
        log = worker.text()
        rendered = sum(int(n) for n in re.findall(r"chunk of t: (\d+) cells rendered", log))
        assert rendered == 80, f"{rendered} renders for 80 cells"
        assert "failed after" not in log
        print(f"s3 outage: 80 cells, {rendered} GPU renders, {log.count('retrying in')} storage retries logged")


def test_s3_down_past_the_storage_deadline_retries_the_chunk_and_loses_nothing(cluster, job_file):
    """Uploads give up after GRIDRENDER_STORAGE_DEADLINE: the chunk is retried (not acknowledged and forgotten),
    and once S3 is back every cell is stored exactly once and the job finishes."""
    outage = s3_down_mid_job(cluster, job_file, chunk_cells=80, after=8, GRIDRENDER_STORAGE_DEADLINE="3")
    with outage as (proxy, worker, env):
        assert done(cluster) < 80, "the chunk finished before the outage: nothing was tested"
        wait_for(lambda: "storage unreachable" in worker.text(), 60, "the uploads to give up")
        time.sleep(5)  # the chunk's retry meets the outage too, and is retried again
        proxy.up()
        wait_for(lambda: done(cluster) == 80, 240, "all 80 cells")
        assert_each_cell_once(cluster, 80)
        status = cluster.cli("status", "t", "--output", cluster.output, **env)
        assert status.returncode == 0 and "80/80 done, 0 failed" in status.stdout, status.stdout + status.stderr
        log = worker.text()
        assert "retrying the chunk later" in log and "failed after" not in log and "cells failed" not in log
        # attempts that met the outage end without their summary line: the one that finished rendered what was missing
        (finished,) = re.findall(r"chunk of t: (\d+) cells rendered, \d+ stored, (\d+) already stored", log)
        assert int(finished[0]) + int(finished[1]) == 80
        print(f"s3 outage past the deadline: the chunk's last attempt rendered {finished[0]}, found {finished[1]} stored")


def test_out_of_memory_splits_the_batch_and_the_worker_lives(renderer, tiny, tmp_path):
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import ChunkJob, Writer, render_and_store

    pipe = renderer.cache.get(tiny, "float32").pipe
    real_forward = pipe.unet.forward

    def forward(sample, *args, **kwargs):
        if sample.shape[0] > 2:  # more than one cell (CFG doubles the batch)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the test)")
        return real_forward(sample, *args, **kwargs)

    cells = [
        make_cell(
            tiny,
            prompt="a cow",
            negative_prompt="",
            clip_skip=1,
            seed=s,
            sampler="Euler a",
            steps=2,
            guidance=7.0,
            width=64,
            height=64,
            dtype="float32",
        )
        for s in range(4)
    ]
    store, writer = LocalStore(tmp_path), Writer()
    pipe.unet.forward = forward
    try:
        result = render_and_store(renderer, writer, store, ChunkJob("oom", tiny, cells, 4))
    finally:
        pipe.unet.forward = real_forward
        writer.close()
    assert result.rendered == 4 and not result.failed
    assert result.oom_splits == 3  # 4 -> 2+2 -> 1+1, 1+1
    import json

    assert {json.loads(store.get(f"cells/{c.id}.json"))["batch_size"] for c in cells} == {1}
    print(f"oom: {result.oom_splits} splits, {result.rendered} cells rendered, {len(result.failed)} failed")


def test_poison_cell_fails_a_bounded_number_of_times_and_the_rest_completes(cluster, job_file, tmp_path):
    output = tmp_path / "out"
    path = job_file(output=str(output), **{**SMALL, "clip_skip": 1}, seeds=[1, 2, 3, 4, 5, 6])
    from gridrender.scheduler.plan import prepare

    poison = list(prepare(path, cuda=None).cells())[2]
    (output / "cells" / f"{poison.id}.png").mkdir(parents=True)  # its image can never be written or read
    env = {"GRIDRENDER_TASK_RETRIES": "2", "GRIDRENDER_CHUNK_CELLS": "3"}
    cluster.cli("submit", str(path), **env)
    worker = cluster.worker(**env)
    wait_for(
        lambda: "11/12 done, 1 failed" in cluster.cli("status", "t", "--output", str(output)).stdout,
        90,
        "the failure in the progress record",
    )
    status = cluster.cli("status", "t", "--output", str(output))
    assert status.returncode == 1 and poison.id in status.stderr
    assert "StorageError" in status.stderr
    log = worker.text()
    assert log.count("failed (attempt") == 2  # two retries ...
    assert log.count("1 cells failed after 3 attempts") == 1  # ... then recorded, once
    assert worker.alive()
    print(f"poison: {status.stdout.strip()}")


def test_sigterm_mid_chunk_finishes_the_chunk(cluster, job_file):
    env = {"GRIDRENDER_CHUNK_CELLS": "24"}
    path = job_file(output=cluster.output, **{**SMALL, "batch_size": 1, "steps": 4}, seeds={"start": 0, "count": 6})
    worker = cluster.worker(**env)
    cluster.cli("submit", str(path), **env)
    wait_for(lambda: done(cluster) >= 2, 60, "the chunk to start")
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    assert done(cluster) == 24  # warm shutdown: the chunk in hand was finished, not dropped
    assert redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"]).llen(SHARED) == 0
    assert_each_cell_once(cluster, 24)
    print("sigterm: worker exited 0 with 24/24 cells stored, queue empty")


def test_a_redelivered_copy_skips_cells_the_other_copy_stored_after_it_started(renderer, tiny, tmp_path):
    """Redis redelivers a chunk that runs past the visibility timeout: two copies run at once. The one
    that started first re-checks storage before each batch, so no cell is rendered twice."""
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import ChunkJob, Writer, render_and_store

    cells = [
        make_cell(
            tiny,
            prompt="a cow",
            negative_prompt="",
            clip_skip=1,
            seed=s,
            sampler="Euler a",
            steps=2,
            guidance=7.0,
            width=64,
            height=64,
            dtype="float32",
        )
        for s in range(4)
    ]
    store, first_writer, second_writer = LocalStore(tmp_path), Writer(), Writer()
    second = []

    def redelivered(_done: int) -> None:  # once the first copy's first cell is stored, the second copy runs
        if not second:
            deadline = time.monotonic() + 30
            while not store.exists(f"cells/{cells[0].id}.json"):
                assert time.monotonic() < deadline, "the first copy's first cell was never stored"
                time.sleep(0.05)
            second.append(render_and_store(renderer, second_writer, store, ChunkJob("redelivered", tiny, cells, 1)))

    try:
        first = render_and_store(renderer, first_writer, store, ChunkJob("redelivered", tiny, cells, 1), on_batch=redelivered)
    finally:
        first_writer.close()
        second_writer.close()
    assert not first.failed and not second[0].failed
    assert first.rendered + second[0].rendered == 4  # every cell rendered exactly once
    assert first.rendered == 1 and first.present == 3 and second[0].rendered == 3
    assert sorted(first.stored + second[0].stored) == sorted(c.id for c in cells)
    assert len(list((tmp_path / "cells").glob("*.png"))) == 4
