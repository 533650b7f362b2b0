"""Finding a job by NAME under an output root, or by the path of its job file."""

from __future__ import annotations

import re
from pathlib import Path

from . import layout
from .errors import InputError
from .job import NAME_PATTERN
from .jobfile import load_job
from .settings import Settings
from .storage import Store
from .stores import open_store


def locate(name: str, output: str | None = None, settings: Settings | None = None) -> tuple[Store, str]:
    """(store, job name) for a NAME under `output` (default GRIDRENDER_OUTPUT), or a job file."""
    settings = settings or Settings()
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        job = load_job(name, settings)
        store, job_name = open_store(output or job.output), job.name
    else:
        if not re.match(NAME_PATTERN, name):
            raise InputError(f"{name!r} is neither a job name nor a job file")
        store, job_name = open_store(output or settings.output), name
    if not store.exists(layout.job_file(job_name)):
        raise InputError(f"no job {job_name!r} under {store.root} (no {layout.job_file(job_name)})")
    return store, job_name
