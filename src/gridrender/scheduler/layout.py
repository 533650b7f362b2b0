"""Every storage key gridrender reads or writes, and how keys are read back.

The layout of DESIGN.md, the same under a local folder and an S3 prefix:

    cells/<cell_id>.png | .json           shared by every job of the output root
    jobs/<name>/job.yaml, manifest.jsonl, index.html, sheets/<file>.png
    jobs/<name>/submissions/<id>.json     one per submit or run (what was sent where)
    jobs/<name>/submission.json           a copy of the newest: status reads it without a listing
    jobs/<name>/cancelled/<id>            a submission that workers must drop
    jobs/<name>/progress/<partition>/<chunk_id>.<stored>.<failed>.<submission>.json
                                          what a chunk stored and failed (counts in the key)

Nothing else in gridrender spells a key.
"""
from __future__ import annotations

import posixpath

CELLS = "cells/"
JOBS = "jobs/"
IMAGE_SUFFIX, RECORD_SUFFIX = ".png", ".json"


def cell_image(cell_id: str) -> str:
    return f"{CELLS}{cell_id}{IMAGE_SUFFIX}"


def cell_record(cell_id: str) -> str:
    return f"{CELLS}{cell_id}{RECORD_SUFFIX}"


def record_image(record_key: str) -> str:
    """The image stored beside a record (a key, path or URL ending in .json)."""
    return record_key.removesuffix(RECORD_SUFFIX) + IMAGE_SUFFIX


def job_prefix(name: str) -> str:
    return f"{JOBS}{name}/"


def job_file(name: str) -> str:
    return f"{job_prefix(name)}job.yaml"


def manifest(name: str) -> str:
    return f"{job_prefix(name)}manifest.jsonl"


def gallery(name: str) -> str:
    return f"{job_prefix(name)}index.html"


def sheets_prefix(name: str) -> str:
    return f"{job_prefix(name)}sheets/"


def sheet(name: str, file_name: str) -> str:
    return f"{sheets_prefix(name)}{file_name}"


def submissions_prefix(name: str) -> str:
    return f"{job_prefix(name)}submissions/"


def submission(name: str, submission_id: str) -> str:
    return f"{submissions_prefix(name)}{submission_id}.json"


def latest_submission(name: str) -> str:
    return f"{job_prefix(name)}submission.json"


def cancelled_prefix(name: str) -> str:
    return f"{job_prefix(name)}cancelled/"


def cancelled(name: str, submission_id: str) -> str:
    return f"{cancelled_prefix(name)}{submission_id}"


def progress_prefix(name: str, partition: str) -> str:
    return f"{job_prefix(name)}progress/{partition}/"


# The key's six parts as progress.py passes them (a parameter object when progress.py is next rewritten).
def progress(name: str, partition: str, chunk_id: str, stored: int, failed: int,  # noqa: PLR0913, PLR0917
             submission_id: str) -> str:
    return f"{progress_prefix(name, partition)}{chunk_id}.{stored}.{failed}.{submission_id}.json"


_PROGRESS_FIELDS = 4  # a progress key's leaf: chunk id, cells stored, cells failed, submission id


def parse_progress(key: str) -> tuple[str, int, int, str] | None:
    """(chunk id, cells stored, cells failed, submission id) from a progress key; None for anything else."""
    parts = leaf(key, ".json").split(".")
    if len(parts) != _PROGRESS_FIELDS or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2]), parts[3]


def leaf(key: str, suffix: str = "") -> str:
    """The last segment of a key without `suffix`: a cell, chunk or submission id."""
    return key.rsplit("/", 1)[-1].removesuffix(suffix)


def relative(from_key: str, to_key: str) -> str:
    """A relative URL from the object at `from_key` to `to_key` (for the gallery page)."""
    return posixpath.relpath(to_key, posixpath.dirname(from_key))
