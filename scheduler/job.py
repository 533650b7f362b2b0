"""The job file: YAML -> pydantic model with `extra="forbid"`, errors with lines."""
from __future__ import annotations

import math
import re
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic_core import PydanticCustomError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from . import samplers, yamlfile
from .errors import JobError, Problem
from .settings import Settings

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1

Positive = Annotated[int, Field(ge=1)]
Side = Annotated[int, Field(ge=8, le=8192)]


class SeedRange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    start: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    count: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _fits(self) -> "SeedRange":
        if self.start + self.count - 1 > MAX_SEED:
            raise ValueError(f"start + count - 1 must be at most {MAX_SEED}")
        return self


SHEET_AXES = ("prompt", "negative_prompt", "sampler", "steps", "guidance", "size", "clip_skip", "seed")
_AXIS_ALIASES = {"prompts": "prompt", "seeds": "seed", "width": "size", "height": "size"}


class SheetLayout(BaseModel):
    """Which axis runs down the rows, across the columns, and over separate sheets."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rows: str = "clip_skip"
    cols: str = "seed"
    pages: str = "prompt"

    @field_validator("rows", "cols", "pages")
    @classmethod
    def _an_axis(cls, value: str) -> str:
        value = _AXIS_ALIASES.get(value, value)
        if value not in SHEET_AXES:
            raise ValueError(f"{value!r} is not an axis; axes: {', '.join(SHEET_AXES)}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> "SheetLayout":
        if len({self.rows, self.cols, self.pages}) < 3:
            raise ValueError("rows, cols and pages must be three different axes")
        return self


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class Job(BaseModel):
    """A job file. Axis keys take one value or a list; the grid is their product."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]
    model: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    prompts: list[str]
    negative_prompt: list[str] = [""]
    clip_skip: list[Positive] = [1]
    seeds: list[Annotated[int, Field(ge=RANDOM_SEED, le=MAX_SEED)]] | SeedRange = [0]
    sampler: list[str] = ["Euler a"]
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = [25]
    guidance: list[Annotated[float, Field(ge=0, le=100)]] = [7.0]
    width: Side | None = None
    height: Side | None = None
    size: list[tuple[Side, Side]] | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    output: Annotated[str, Field(min_length=1)] = Field(default_factory=lambda: Settings().output)
    sheet: SheetLayout | None = None

    _source: str = PrivateAttr(default="<job>")
    _lines: dict = PrivateAttr(default_factory=dict)

    @field_validator("prompts", "negative_prompt", "clip_skip", "sampler", "steps", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_list(cls, value: Any) -> Any:
        return value if isinstance(value, (list, dict)) else [value]

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance_floats(cls, value: Any) -> Any:
        # YAML reads `7` as an int; a float axis should accept it (but not a bool).
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in _as_list(value)]

    @field_validator("size", mode="before")
    @classmethod
    def _size_pairs(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            value = [value]  # `size: [512, 768]` is one size, not two
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    @field_validator("prompts", "negative_prompt", "clip_skip", "seeds", "sampler", "steps", "guidance", "size")
    @classmethod
    def _axis_well_formed(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be empty")
            seen = set()
            for item in value:
                if item in seen and item != RANDOM_SEED:
                    raise ValueError(f"{item!r} is listed twice (every cell of a grid is different)")
                seen.add(item)
        return value

    @field_validator("sampler")
    @classmethod
    def _known_samplers(cls, value: list[str]) -> list[str]:
        names = []
        for name in value:
            try:
                names.append(samplers.lookup(name).name)
            except KeyError:
                raise ValueError(f"unknown sampler {name!r}; valid: " + ", ".join(samplers.valid_names())) from None
        return names

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be divisible by 8, got {value}")
        return value

    @field_validator("size")
    @classmethod
    def _sizes_multiple_of_8(cls, value: list[tuple[int, int]] | None) -> Any:
        for w, h in value or []:
            if w % 8 or h % 8:
                raise ValueError(f"width and height must be divisible by 8, got {w}x{h}")
        return value

    @field_validator("output")
    @classmethod
    def _output_root(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("must not contain NUL")
        if value.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", value):
            raise ValueError(f"{value!r} is not an s3://bucket/prefix URL")
        return value

    @model_validator(mode="after")
    def _one_way_to_give_size(self) -> "Job":
        if self.size is not None and (self.width is not None or self.height is not None):
            raise PydanticCustomError("conflict", "give either `size` or `width`/`height`, not both")
        return self

    def problem(self, field: str, message: str) -> Problem:
        """A problem found after parsing (e.g. against the model), located in the file."""
        return Problem(field, message, yamlfile.line_for(self._lines, tuple(field.split("."))))

    def error(self, problems: list[Problem]) -> JobError:
        return JobError(problems, self._source)

    # -- derived views -------------------------------------------------------------
    @property
    def sizes(self) -> list[tuple[int, int]]:
        return list(self.size) if self.size else [(self.width or 512, self.height or 512)]

    @property
    def seed_list(self) -> list[int]:
        if isinstance(self.seeds, SeedRange):
            return list(range(self.seeds.start, self.seeds.start + self.seeds.count))
        return list(self.seeds)

    def axes(self) -> dict[str, list]:
        """Every axis with its values, in expansion order (outermost first)."""
        return {
            "prompt": self.prompts,
            "negative_prompt": self.negative_prompt,
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance": self.guidance,
            "size": [f"{w}x{h}" for w, h in self.sizes],
            "clip_skip": self.clip_skip,
            "seed": self.seed_list,
        }

    def cell_count(self) -> int:
        seeds = self.seeds.count if isinstance(self.seeds, SeedRange) else len(self.seeds)
        return math.prod(len(v) for k, v in self.axes().items() if k != "seed") * seeds

    def with_random_seeds_drawn(self) -> "Job":
        """Replace every seed -1 by a random seed, drawn once (recorded in job.yaml)."""
        if isinstance(self.seeds, SeedRange) or RANDOM_SEED not in self.seeds:
            return self
        taken = set(self.seeds)
        drawn = []
        for seed in self.seeds:
            while seed == RANDOM_SEED or (seed in drawn):
                seed = secrets.randbelow(MAX_SEED + 1)
                seed = RANDOM_SEED if seed in taken else seed
            drawn.append(seed)
        return self.model_copy(update={"seeds": drawn})

    def normalized(self) -> dict:
        """The job as job.yaml stores it: every key, axes as lists, no defaults hidden."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["size"] = [list(s) for s in self.sizes]
        data.pop("width")
        data.pop("height")
        return data


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
    if job.cell_count() > settings.max_cells:
        raise JobError(
            [Problem("", f"the grid has {job.cell_count():,} cells, over the limit of {settings.max_cells:,} (GRIDRENDER_MAX_CELLS)")],
            source,
        )
    return job


def _branch_applies(err: dict, data: dict) -> bool:
    """`seeds` is a list or a {start, count} mapping: report only the branch the user wrote."""
    loc = err["loc"]
    if len(loc) >= 2 and loc[0] == "seeds" and isinstance(loc[1], str):
        wrote_mapping = isinstance(data.get("seeds"), dict)
        return ("SeedRange" in loc[1]) == wrote_mapping
    return True


def _problem(err: dict, lines: dict) -> Problem:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "SeedRange"))]
    if err["type"] == "conflict":
        loc = ["size"]
    field = ".".join(str(p) for p in loc)
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown key (valid keys: {', '.join(Job.model_fields)})"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif "input" in err and err["type"].endswith(("_type", "_parsing")):
        message = f"{message}, got {_show(err['input'])}"
    elif err["type"] in ("greater_than_equal", "less_than_equal", "string_pattern_mismatch", "too_long"):
        message = f"{message}, got {_show(err['input'])}"
    return Problem(field, message, yamlfile.line_for(lines, tuple(loc)))



def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
