"""Shared fixtures: a private cache for builtin models, a resident tiny renderer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


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
def renderer(private_cache):
    from workers.render import Renderer

    return Renderer()


@pytest.fixture(scope="session")
def tiny(private_cache):
    from scheduler.models import resolve

    return resolve("builtin:tiny")


@pytest.fixture(scope="session")
def tiny_folder(private_cache):
    from workers.pipelines import builtin_folder

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
    )
