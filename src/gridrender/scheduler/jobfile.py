"""Reading a job file: YAML -> Job, every problem at once with its key and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from . import dynamic, yamlfile
from .errors import JobError, Problem
from .job import Job, PromptSamples
from .settings import Settings


def load_job(path: str | Path, settings: Settings | None = None) -> Job:
    """Read, parse and validate a job file; every problem at once in one JobError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobError(f"cannot read the job file: {exc.strerror}", str(path)) from None
    return parse_job(raw, str(path), settings)


def parse_job(raw: bytes | str, source: str = "<job>", settings: Settings | None = None) -> Job:
    settings = settings or Settings()
    text = yamlfile.decode(raw, source) if isinstance(raw, bytes) else raw
    data, lines = yamlfile.load(text, source)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise JobError([Problem("", f"a job file must be a mapping of keys, got {kind}", 1)], source)
    if any(not isinstance(k, str) for k in data):
        bad = next(k for k in data if not isinstance(k, str))
        raise JobError([Problem(str(bad), "keys must be strings", yamlfile.line_for(lines, (bad,)))], source)
    try:
        job = Job.model_validate(data)
    except ValidationError as exc:
        errors = [err for err in exc.errors() if _branch_applies(err, data)]
        problems = sorted((_problem(err, lines) for err in errors), key=lambda p: p.line or 0)
        raise JobError(problems, source) from None
    job._source, job._lines = source, lines
    expand_prompts(job, settings)
    if job.cell_count() > settings.max_cells:
        raise JobError(
            [
                Problem(
                    "",
                    f"the grid has {job.cell_count():,} cells, over the limit of {settings.max_cells:,} (GRIDRENDER_MAX_CELLS)",
                )
            ],
            source,
        )
    return job


def expand_prompts(job: Job, settings: Settings) -> None:
    """Dynamic templates into prompts (recording the sampling seed); Prompt S/R must find its text."""
    problems: list[Problem] = []
    if any(dynamic.is_template(p) for p in job.prompts):
        samples = job.prompt_samples
        if isinstance(samples, int):
            samples = PromptSamples(count=samples)
        if samples is not None and samples.seed is None:
            samples = PromptSamples(count=samples.count, seed=dynamic.default_seed(job.name, job.prompts))
        if samples is not None:
            job.prompt_samples = samples
        # Counted before expanding: the prompts may be as many as the cell limit leaves to them.
        others = job.cell_count() // max(1, len(job.values_of("prompts")))
        job._prompts, problems = dynamic.expand(
            job.prompts,
            samples.count if samples else None,
            samples.seed or 0 if samples else 0,
            settings,
            limit=settings.max_cells // max(1, others),
        )
        problems = [job.problem(p.field, p.message) for p in problems]
    if job.prompt_sr is not None:
        search = job.prompt_sr[0]
        if not any(search in text for text in [*job.values_of("prompts"), *job.negative_prompt]):
            problems.append(
                job.problem("prompt_sr", f"{search!r} (the text to replace) occurs in no prompt and no negative prompt")
            )
    if problems:
        raise job.error(problems)


# Pydantic errors whose message reads better with the value the user wrote.
_SHOWS_INPUT = ("greater_than_equal", "less_than_equal", "string_pattern_mismatch", "too_long")
_SHOWN_CHARS = 60  # of a rejected value's repr in an error message


def _branch_applies(err: ErrorDetails, data: dict[str, Any]) -> bool:
    """`seeds` is a list or a {start, count} mapping: report only the branch the user wrote."""
    loc = err["loc"]
    if len(loc) > 1 and loc[0] == "seeds" and isinstance(loc[1], str):
        wrote_mapping = isinstance(data.get("seeds"), dict)
        return ("SeedRange" in loc[1]) == wrote_mapping
    return True


def _problem(err: ErrorDetails, lines: dict[yamlfile.Path, int]) -> Problem:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "SeedRange"))]
    if err["type"] == "conflict":
        loc = ["size"]
    elif err["type"] == "sampler_schedule":
        loc = ["sampler"]
    field = ".".join(str(p) for p in loc)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown key (valid keys: {', '.join(Job.model_fields)})"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif ("input" in err and err["type"].endswith(("_type", "_parsing"))) or err["type"] in _SHOWS_INPUT:
        message = f"{message}, got {_show(err['input'])}"
    return Problem(field, message, yamlfile.line_for(lines, tuple(loc)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."
