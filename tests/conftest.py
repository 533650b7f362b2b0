"""Shared fixtures: a private cache for builtin models, a resident tiny renderer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each test process and the workers and CLIs it starts get one thread: the processes run side
    # by side on few cores, and OpenMP threads spinning against each other cost more than they give.
    # Set before anything imports torch, so in-process and subprocess renders round alike.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The files that take minutes (inductor compiles, worker fleets, fresh-process renders), longest first:
# under pytest-xdist each file runs whole on one process, so starting them first keeps the other
# process busy with the short files instead of leaving one long file to run alone at the end.
LONGEST_FIRST = (
    "test_compile.py",
    "test_lora.py",
    "test_faults.py",
    "test_a1111.py",
    "test_sdxl.py",
    "test_recovery.py",
    "test_static.py",
    "test_a1111_rng.py",
    "test_distributed.py",
    "test_models.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Builtin models are written into a cache of the test session's own."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield cache
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def renderer(private_cache):  # noqa: ARG001  (loads into the session's private cache, for its side effect)
    from gridrender.workers.render import Renderer

    return Renderer()


@pytest.fixture(scope="session")
def tiny(private_cache):  # noqa: ARG001  (resolves in the session's private cache, for its side effect)
    from gridrender.scheduler.models import resolve

    return resolve("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_folder(private_cache):  # noqa: ARG001  (written into the session's private cache, for its side effect)
    from gridrender.workers.pipelines import builtin_folder

    return builtin_folder("tiny")


BASE_JOB = {
    "name": "t",
    "model": "builtin:tiny",
    "prompts": ["a cow standing in a field"],
    "negative_prompt": "lowres, blurry",
    "clip_skip": [1, 2],
    "seeds": [1, 2],
    "sampler": "Euler a",
    "steps": 3,
    "guidance": 7.0,
    "width": 64,
    "height": 64,
    "batch_size": 4,
}


@pytest.fixture
def job_file(tmp_path):
    """Write a job file from BASE_JOB plus overrides; output defaults to tmp_path/out."""

    def write(name: str = "job.yaml", **overrides) -> Path:
        data = {**BASE_JOB, "output": str(tmp_path / "out"), **overrides}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real `gridrender` entry point in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "gridrender", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # callers assert the return code (and read stderr when it is not 0)
    )


# -- distributed: real Redis, a real S3 endpoint, real worker processes ----------------


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    from tests.services import start_moto

    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    yield endpoint
    proc.stop()


@pytest.fixture(scope="session")
def redis_base(tmp_path_factory):
    """The Redis on 127.0.0.1:6379 if one runs, else a private redis-server started for the session."""
    from tests.services import SHARED_REDIS, redis_answers, start_redis

    if redis_answers(SHARED_REDIS):
        yield SHARED_REDIS
        return
    proc, port = start_redis(tmp_path_factory.mktemp("redis") / "redis.log")
    yield f"redis://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture
def redis_url(redis_base):
    import redis

    from tests.services import REDIS_DB

    url = f"{redis_base}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def cluster(tmp_path, moto_endpoint, redis_url, private_cache, tiny_folder):  # noqa: ARG001  (tiny built before workers start)
    """Environment, bucket and worker launcher for one distributed test."""
    import uuid

    import boto3

    from tests.services import start_worker

    bucket = f"gr-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": moto_endpoint,
        "GRIDRENDER_BROKER_URL": redis_url,
        "XDG_CACHE_HOME": str(private_cache),
        "PYTHONUNBUFFERED": "1",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing-secret-key",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})  # to see overwrites

    class Cluster:
        def __init__(self):
            self.env, self.bucket, self.s3, self.workers = env, bucket, s3, []
            self.output = f"s3://{bucket}/grid"

        def worker(self, queue: str | None = None, *args: str, **extra_env) -> object:
            """A worker process on `queue`, or a bare one (`gridrender worker`: the shared queue)."""
            log = tmp_path / f"worker-{len(self.workers)}.log"
            proc = start_worker({**self.env, **extra_env}, log, queue, *args)
            self.workers.append(proc)
            return proc

        def cli(self, *args, **extra_env):
            return cli(*args, env={**self.env, **extra_env})

        def keys(self, prefix: str = "grid/cells/") -> list[str]:
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

        def versions(self, prefix: str = "grid/") -> dict[str, int]:
            counts: dict[str, int] = {}
            for page in self.s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
                for v in page.get("Versions", []):
                    counts[v["Key"]] = counts.get(v["Key"], 0) + 1
            return counts

    c = Cluster()
    yield c
    for proc in c.workers:
        proc.stop()
