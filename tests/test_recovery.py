"""Overnight at scale: crash recovery in seconds, work that finds workers, costs that stay the job's.

Real Redis, real worker processes, a real S3 endpoint. The visibility timeout stays
at its default (an hour) unless a test says otherwise: recovery comes from heartbeats.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import redis

from gridrender.scheduler import liveness
from gridrender.scheduler.broker import make_app
from gridrender.scheduler.settings import Settings
from tests.services import wait_for

SMALL = dict(dtype="float32", clip_skip=1, prompts=["a cow"], steps=6, batch_size=1)
FAST_HEARTBEAT = {"GRIDRENDER_HEARTBEAT_TTL": "4", "GRIDRENDER_HEARTBEAT_INTERVAL": "1"}


def stored(cluster) -> int:
    return len([k for k in cluster.keys() if k.endswith(".json")])  # noqa: SIM118  (the cluster's method)


def renders(*workers) -> int:
    return sum(int(n) for w in workers for n in re.findall(r"chunk of t: (\d+) cells rendered", w.text()))


def held(cluster) -> dict:
    client = redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"])
    return {k.decode(): json.loads(v) for k, v in client.hgetall(liveness.HELD).items()}


def test_a_killed_workers_chunk_is_rendered_by_another_within_seconds(cluster, job_file):
    path = job_file(output=cluster.output, **SMALL, seeds=list(range(12)))
    first = cluster.worker()
    cluster.cli("submit", str(path))
    wait_for(lambda: stored(cluster) >= 2, 90, "the first cells")
    first.kill()
    before = stored(cluster)
    killed_at = time.monotonic()
    second = cluster.worker()  # the visibility timeout is an hour: only the heartbeat can bring the chunk back
    wait_for(lambda: stored(cluster) == 12, 60, "every cell after the kill")
    assert time.monotonic() - killed_at < 30
    versions = cluster.versions("grid/cells/")
    assert len(versions) == 24 and all(v == 1 for v in versions.values())
    assert renders(second) == 12 - before  # no cell stored before the kill was rendered again
    assert "re-enqueueing it" in second.text()
    print(f"kill: {before} stored at the kill, the rest {time.monotonic() - killed_at:.1f}s later")


def test_a_chunk_that_killed_two_workers_is_recorded_failed(cluster, job_file):
    path = job_file(output=cluster.output, **{**SMALL, "steps": 12}, seeds=list(range(12)))
    cluster.cli("submit", str(path))
    holdings = []
    for _ in range(2):
        worker = cluster.worker(**FAST_HEARTBEAT)
        wait_for(
            lambda w=worker: any(n.startswith("gridrender-") and w.proc.pid and str(w.proc.pid) in n for n in held(cluster)),
            60,
            "the worker to hold the chunk",
        )
        holdings += [e for n, e in held(cluster).items() if str(worker.proc.pid) in n]
        worker.kill()
    survivor = cluster.worker(**FAST_HEARTBEAT)
    wait_for(lambda: "killed 2 workers" in survivor.text(), 60, "the reaper to give up on the chunk")
    status = cluster.cli("status", "t", "--output", cluster.output)
    assert status.returncode == 1 and "killed 2 workers" in status.stderr, status.stdout + status.stderr
    done, failed = re.search(r"(\d+)/12 done, (\d+) failed", status.stdout).groups()
    assert int(done) + int(failed) == 12 and int(failed) > 0
    time.sleep(3)
    assert "received" not in survivor.text().split("killed 2 workers")[-1]  # not sent again
    assert "poisoned chunk" in status.stderr and "killed 2 workers" in status.stderr
    # `gridrender retry` clears the chunk's kill count and sends it again: the survivor finishes the job.
    retried = cluster.cli("retry", "t", "--output", cluster.output)
    assert retried.returncode == 0 and "1 poisoned chunk(s) sent again" in retried.stdout, retried.stdout + retried.stderr
    # The killed workers' copies come back when the visibility timeout passes (an hour): as if it had, now.
    app = make_app(Settings(broker_url=cluster.env["GRIDRENDER_BROKER_URL"]))
    for entry in holdings:
        liveness.send_chunk(app, entry["message"], entry["queue"])
    wait_for(lambda: stored(cluster) == 12, 180, "the retried chunk")
    wait_for(lambda: survivor.text().count("dropping this earlier copy") == 2, 60, "the earlier copies to be dropped")
    status = cluster.cli("status", "t", "--output", cluster.output)
    assert status.returncode == 0 and "12/12 done, 0 failed" in status.stdout, status.stdout + status.stderr
    versions = cluster.versions("grid/cells/")
    assert len(versions) == 24 and all(v == 1 for v in versions.values())


def test_reapers_race_for_a_dead_workers_chunk_and_one_wins(redis_url):
    client = redis.Redis.from_url(redis_url)
    message = {"chunk": "c0ffee", "job": "t", "cells": []}
    client.hset(
        liveness.HELD,
        "gridrender-1@gone",
        json.dumps({"message": message, "queue": "q", "task": "t1", "chunk": "c0ffee", "job": "t"}),
    )
    sent: list = []
    first = liveness.reap(client, lambda m, q: sent.append((m, q)), lambda _m, _k, _w: None)
    second = liveness.reap(client, lambda m, q: sent.append((m, q)), lambda _m, _k, _w: None)
    assert [r.requeued for r in first] == [True] and second == []
    assert sent == [(message, "q")] and not client.hgetall(liveness.HELD)
    alive = liveness.Heartbeat(client, "gridrender-2@here", ["q"], Settings(heartbeat_ttl=5))
    alive.beat()
    client.hset(liveness.HELD, "gridrender-2@here", json.dumps({"message": message, "queue": "q", "task": "t2"}))
    assert liveness.reap(client, lambda m, q: sent.append((m, q)), lambda _m, _k, _w: None) == []  # alive: left alone
    assert liveness.consumed_queues(client) == {"q": 1}


def test_a_bare_worker_takes_any_jobs_chunks(cluster, job_file):
    worker = cluster.worker()  # gridrender worker, no queue named
    path = job_file(output=cluster.output, **{**SMALL, "steps": 2, "batch_size": 4}, seeds=[1, 2, 3])
    result = cluster.cli("submit", str(path), "--wait")
    assert result.returncode == 0, result.stderr
    assert "on queue gridrender " in result.stdout and stored(cluster) == 3
    assert "model load #1" in worker.text()


def test_a_model_worker_gets_its_models_chunks_on_its_own_queue(cluster, job_file):
    cluster.worker(None, "--model", "builtin:tiny", GRIDRENDER_AUTO_DTYPE="float32")
    path = job_file(output=cluster.output, **{**SMALL, "steps": 2}, seeds=[1])
    result = cluster.cli("submit", str(path), "--wait")
    assert result.returncode == 0, result.stderr
    assert "on queue gridrender.builtin-tiny-" in result.stdout


def test_wait_without_a_worker_fails_after_the_idle_timeout(cluster, job_file):
    path = job_file(output=cluster.output, **SMALL, seeds=[1])
    start = time.monotonic()
    result = cluster.cli("submit", str(path), "--wait", "--idle-timeout", "3")
    assert result.returncode == 1
    assert "no worker consumes queue gridrender" in result.stderr and "no worker took a chunk" in result.stderr
    assert time.monotonic() - start < 60


def test_cancel_after_two_submissions_stops_both(cluster, job_file):
    cluster.cli("submit", str(job_file(output=cluster.output, **SMALL, seeds=[1, 2])))
    cluster.cli("submit", str(job_file(output=cluster.output, **SMALL, seeds=[1, 2, 3, 4])))
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gridrender",
            "submit",
            str(job_file(output=cluster.output, **SMALL, seeds=[1, 2, 3, 4, 5])),
            "--wait",
        ],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(5)
    result = cluster.cli("cancel", "t", "--output", cluster.output)
    assert result.returncode == 0 and "3 submission(s) cancelled" in result.stdout, result.stdout
    _out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1 and "cancelled with 5 cells not rendered" in err, err
    worker = cluster.worker()
    wait_for(lambda: worker.text().count("dropping") >= 3, 60, "the worker to drop every submission's chunks")
    assert stored(cluster) == 0
    assert redis.Redis.from_url(cluster.env["GRIDRENDER_BROKER_URL"]).llen("gridrender") == 0


class Counting:
    """A store that records every listing and request, to show what status and finalize cost."""

    def __init__(self, inner):
        self.inner, self.lists, self.calls = inner, [], 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.calls += 1
            if name in ("list", "list_with_times"):
                self.lists.append(args[0])
            return attr(*args, **kwargs)

        return counted


def test_status_and_finalize_never_list_cells(cluster, job_file):
    from gridrender.scheduler.finalize import finalize
    from gridrender.scheduler.s3 import S3Store
    from gridrender.scheduler.status import job_status

    for i in range(200):  # other jobs' cells share the bucket
        cluster.s3.put_object(Bucket=cluster.bucket, Key=f"grid/cells/other{i:04d}.json", Body=b"{}")
    cluster.worker()
    path = job_file(output=cluster.output, **{**SMALL, "steps": 2, "batch_size": 4}, seeds=[1, 2, 3, 4])
    assert cluster.cli("submit", str(path), "--wait").returncode == 0
    import os

    old = {k: os.environ.get(k) for k in cluster.env}
    os.environ.update(cluster.env)
    try:
        store = Counting(S3Store.from_url(cluster.output))
        status = job_status(store, "t")
        assert (status.done, status.total) == (4, 4)
        assert not [p for p in store.lists if p.startswith("cells")]
        status_calls = store.calls
        store.calls = 0
        finalize(store, "t")
        assert not [p for p in store.lists if p.startswith("cells")]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert status_calls <= 5, status_calls
    print(f"status: {status_calls} storage requests for a 4-cell job in a bucket of 200 other cells")
