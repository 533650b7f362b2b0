"""Every storage key gridrender reads or writes, and how keys are read back.

The layout of DESIGN.md, the same under a local folder and an S3 prefix:

    cells/<cell_id>.png | .json           shared by every job of the output root
    jobs/<name>/job.yaml, manifest.jsonl, index.html, sheets/<file>.png
    jobs/<name>/submissions/<id>.json     one per submit or run (what was sent where)
    jobs/<name>/submission.json           a copy of the newest: status reads it without a listing
    jobs/<name>/expansions/<id>.json      what a submission expanded the job into: prompts, the
                                          embeddings each text triggers, partition (finalize and
                                          export never re-derive ids)
    jobs/<name>/cancelled/<id>            a submission that workers must drop
    jobs/<name>/progress/<partition>/<chunk_id>.<sequence>.<stored>.<failed>.<submission>[.poisoned].json
                                          what a chunk stored and failed (counts in the key); the
                                          highest sequence is the chunk's newest record; `.poisoned`
                                          when the reaper gave up on it

Nothing else in gridrender spells a key.
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

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


def expansion(name: str, submission_id: str) -> str:
    return f"{job_prefix(name)}expansions/{submission_id}.json"


def cancelled_prefix(name: str) -> str:
    return f"{job_prefix(name)}cancelled/"


def cancelled(name: str, submission_id: str) -> str:
    return f"{cancelled_prefix(name)}{submission_id}"


def progress_prefix(name: str, partition: str) -> str:
    return f"{job_prefix(name)}progress/{partition}/"


SEQUENCE_DIGITS = 19  # zero-padded: keys sort as their sequences do


class ProgressKey(NamedTuple):
    """What a progress record's key carries, in key order."""

    chunk_id: str
    sequence: int
    stored: int  # cells stored
    failed: int  # cells failed
    submission_id: str
    poisoned: bool = False  # the reaper gave up on the chunk: `status` reads only these records' bodies


_PROGRESS_FIELDS = len(ProgressKey._fields) - 1  # `poisoned` is a suffix, present or not
_PROGRESS_FIELDS_BEFORE_SEQUENCES = _PROGRESS_FIELDS - 1
_POISONED = "poisoned"


def progress(name: str, partition: str, fields: ProgressKey) -> str:
    return (
        f"{progress_prefix(name, partition)}{fields.chunk_id}.{fields.sequence:0{SEQUENCE_DIGITS}d}."
        f"{fields.stored}.{fields.failed}.{fields.submission_id}{'.' + _POISONED if fields.poisoned else ''}.json"
    )


def parse_progress(key: str) -> ProgressKey | None:
    """What a progress key carries; None for anything else.

    Keys written before sequences existed (`<chunk>.<stored>.<failed>.<submission>.json`) read as sequence 0.
    """
    parts = leaf(key, ".json").split(".")
    poisoned = len(parts) > _PROGRESS_FIELDS_BEFORE_SEQUENCES and parts[-1] == _POISONED
    if poisoned:
        parts.pop()
    if len(parts) == _PROGRESS_FIELDS_BEFORE_SEQUENCES:
        parts.insert(1, "0")
    if len(parts) != _PROGRESS_FIELDS or not all(p.isdigit() for p in parts[1:4]):
        return None
    return ProgressKey(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4], poisoned)


def leaf(key: str, suffix: str = "") -> str:
    """The last segment of a key without `suffix`: a cell, chunk or submission id."""
    return key.rsplit("/", 1)[-1].removesuffix(suffix)


def relative(from_key: str, to_key: str) -> str:
    """A relative URL from the object at `from_key` to `to_key` (for the gallery page)."""
    return posixpath.relpath(to_key, posixpath.dirname(from_key))
