"""The job file: YAML -> pydantic model with `extra="forbid"`, errors with lines."""
from __future__ import annotations

import itertools
import math
import re
import secrets
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import prompts, samplers, yamlfile
from .errors import JobError, Problem
from .params import AXES, AXIS_NAMES, PARAMS
from .settings import Settings
from .storage import S3_URL

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1
# git's ref-name rules (git check-ref-format), or a commit hash: what a hub revision can be.
_REF = re.compile(r"^(?!-)(?!.*\.\.)(?!.*@\{)(?!.*//)(?!.*\.lock$)(?!.*[./]$)[^\x00-\x20~^:?*\[\\\x7f]{1,255}$")
# Lines that would end a prompt early in A1111's "parameters" text.
_INFOTEXT_LINE = re.compile(r"^\s*(Negative prompt:|Steps:)", re.M)


def _prompt_text(text: str) -> str:
    """A prompt gridrender can render as A1111 reads it and write into infotext intact."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise ValueError("contains a lone surrogate (invalid Unicode); fix the escape sequence")
    if match := _INFOTEXT_LINE.search(text):
        raise ValueError(f"a line may not start with {match.group(1)!r}: it would corrupt the PNG's parameters text")
    if "\0" in text:
        raise ValueError("must not contain NUL")
    reason = prompts.unsupported_syntax(text)
    if reason:
        raise ValueError(reason)
    return text


Positive = Annotated[int, Field(ge=1)]
Side = Annotated[int, Field(ge=8, le=8192)]
PromptText = Annotated[str, AfterValidator(_prompt_text)]


class SeedRange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    start: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    count: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _fits(self) -> SeedRange:
        if self.start + self.count - 1 > MAX_SEED:
            raise ValueError(f"start + count - 1 must be at most {MAX_SEED}")
        return self


SHEET_AXES = tuple(AXES)
# Job-file keys that take one value or a list (an axis). `seeds`, `size` and `loras` have forms
# of their own; `embeddings` is a set of files, derived per cell.
_LISTS = tuple(dict.fromkeys(p.key for p in PARAMS
                             if p.key not in ("dtype", "seeds", "size", "loras", "embeddings", "prompt_sr")))
_WEIGHT = Annotated[float, Field(ge=-10, le=10)]


def _floats(value: Any) -> Any:
    """YAML reads `7` as an int; a float axis should accept it (but not a bool)."""
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in _as_list(value)]


class LoraEntry(BaseModel):
    """A LoRA applied to every cell, at each of its weights (a list of weights is an axis)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: Annotated[str, Field(min_length=1)]
    weight: list[_WEIGHT] = [1.0]

    @field_validator("weight", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        return _floats(value)

    @field_validator("weight")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) < len(value):
            raise ValueError("a weight is listed twice (every cell of a grid is different)")
        return value


class PromptSamples(BaseModel):
    """Draw `count` variants of each dynamic-prompt template; the seed makes a resubmit draw the same."""

    model_config = ConfigDict(extra="forbid", strict=True)
    count: Annotated[int, Field(ge=1, le=100_000)]
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None


class SheetLayout(BaseModel):
    """Which axis runs down the rows, across the columns, and over separate sheets."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rows: str = "clip_skip"
    cols: str = "seed"
    pages: str = "prompt"

    @field_validator("rows", "cols", "pages")
    @classmethod
    def _an_axis(cls, value: str) -> str:
        value = AXIS_NAMES.get(value, value)
        if value not in SHEET_AXES:
            raise ValueError(f"{value!r} is not an axis; axes: {', '.join(SHEET_AXES)}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> SheetLayout:
        if len({self.rows, self.cols, self.pages}) < 3:
            raise ValueError("rows, cols and pages must be three different axes")
        return self


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class Job(BaseModel):
    """A job file. Axis keys take one value or a list; the grid is their product."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]
    model: list[Annotated[str, Field(min_length=1)]]
    revision: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    prompts: list[PromptText]
    negative_prompt: list[PromptText] = [""]
    clip_skip: list[Positive] = [1]
    seeds: list[Annotated[int, Field(ge=RANDOM_SEED, le=MAX_SEED)]] | SeedRange = [0]
    sampler: list[str] = ["Euler a"]
    schedule: list[str] = [samplers.AUTOMATIC]
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = [25]
    guidance: list[Annotated[float, Field(ge=0, le=100)]] = [7.0]
    width: Side | None = None
    height: Side | None = None
    size: list[tuple[Side, Side]] | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4
    output: Annotated[str, Field(min_length=1)] = Field(default_factory=lambda: Settings().output)
    sheet: SheetLayout | None = None
    vae: list[Annotated[str, Field(min_length=1)] | None] = [None]
    loras: list[LoraEntry] = []
    embeddings: list[Annotated[str, Field(min_length=1)]] = []
    prompt_sr: list[PromptText] | None = None
    prompt_samples: Annotated[int, Field(ge=1, le=100_000)] | PromptSamples | None = None

    _source: str = PrivateAttr(default="<job>")
    _lines: dict = PrivateAttr(default_factory=dict)
    _prompts: list[str] = PrivateAttr(default_factory=list)  # the prompts with dynamic templates expanded

    @field_validator(*(k for k in _LISTS if k != "guidance"), mode="before")
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
        return _floats(value)

    @field_validator("loras", "embeddings", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        return [] if value is None else _as_list(value)

    @field_validator("prompt_sr", mode="before")
    @classmethod
    def _sr_list(cls, value: Any) -> Any:
        return value if value is None else _as_list(value)

    @field_validator("prompt_sr")
    @classmethod
    def _sr_values(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or not value[0]):
            raise ValueError("list the text to search for first, then what to replace it with (at least two values)")
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _size_pairs(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
            value = [value]  # `size: [512, 768]` is one size, not two
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    @field_validator("embeddings")
    @classmethod
    def _distinct_files(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError("a file or folder is listed twice")
        return value

    @field_validator(*_LISTS, "seeds", "size", "prompt_sr")
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

    @field_validator("sampler", mode="before")
    @classmethod
    def _known_samplers(cls, value: Any) -> Any:
        """Canonical spellings before duplicates are looked for ("euler  A" is "Euler a")."""
        names = []
        for name in _as_list(value):
            if not isinstance(name, str):
                return value  # the type check reports it
            base, implied = samplers.split_name(name)  # raises UnknownName, a ValueError
            names.append(f"{base.name} {implied.label}" if implied else base.name)
        return names

    @field_validator("schedule", mode="before")
    @classmethod
    def _known_schedules(cls, value: Any) -> Any:
        labels = []
        for label in _as_list(value):
            if not isinstance(label, str):
                return value
            labels.append(samplers.schedule(label).label)
        return labels

    @field_validator("revision")
    @classmethod
    def _git_ref(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError(f"{value!r} is not a valid git revision (a branch, tag or commit hash)")
        return value

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
        if value.startswith("s3://") and not S3_URL.match(value):
            raise ValueError(f"{value!r} is not an s3://bucket/prefix URL")
        return value

    @model_validator(mode="after")
    def _one_way_to_give_size(self) -> Job:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise PydanticCustomError("conflict", "give either `size` or `width`/`height`, not both")
        return self

    @model_validator(mode="after")
    def _samplers_and_schedules_agree(self) -> Job:
        """Every sampler x schedule pair is a different, possible cell ("DPM++ 2M Karras" = "DPM++ 2M" + Karras)."""
        seen: dict[tuple[str, str], tuple[str, str]] = {}
        for name in self.sampler:
            for label in self.schedule:
                try:
                    pair = samplers.canonical(name, label)
                except ValueError as exc:
                    raise PydanticCustomError("sampler_schedule", str(exc)) from None
                if pair in seen:
                    raise PydanticCustomError(
                        "sampler_schedule",
                        f"sampler {name!r} with schedule {label!r} is the same as {seen[pair][0]!r} with "
                        f"{seen[pair][1]!r} ({pair[0]}, {pair[1]}); list each combination once")
                seen[pair] = (name, label)
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
    def seed_list(self) -> Sequence[int]:
        if isinstance(self.seeds, SeedRange):
            return range(self.seeds.start, self.seeds.start + self.seeds.count)
        return list(self.seeds)

    def values_of(self, key: str) -> Sequence:
        """The values the job lists under a job-file key, as a sequence (an axis)."""
        if key == "seeds":
            return self.seed_list
        if key == "size":
            return self.sizes
        if key == "prompts":
            return self._prompts or self.prompts
        if key == "loras":  # every combination of the LoRAs' weights, applied together
            return list(itertools.product(*([(e.path, w) for w in e.weight] for e in self.loras)))
        if key == "prompt_sr":
            return [None] if self.prompt_sr is None else [(self.prompt_sr[0], v) for v in self.prompt_sr]
        if key == "embeddings":
            return [()]  # derived per cell from its texts
        return _as_list(getattr(self, key))

    def axes(self) -> dict[str, Sequence]:
        """Every axis with the values the job lists, in expansion order (outermost first)."""
        return {axis.name: self.values_of(axis.key) for axis in AXES.values()}

    def grid_values(self) -> dict[str, Sequence]:
        """Values per parameter (per axis for width x height), as `grid.expand` takes them."""
        values: dict[str, Sequence] = {}
        for param in PARAMS:
            values[param.axis if param.key == "size" else param.name] = self.values_of(param.key)
        return values

    def cell_count(self) -> int:
        return math.prod(len(v) for v in self.axes().values())

    def with_random_seeds_drawn(self) -> Job:
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

    def with_output(self, output: str | None) -> Job:
        """The job writing under another output root (the CLI's --output)."""
        if output is None:
            return self
        try:
            checked = Job._output_root(output)
        except ValueError as exc:
            raise self.error([Problem("output", str(exc))]) from None
        job = self.model_copy(update={"output": checked})
        job._source, job._lines = self._source, self._lines
        return job

    def normalized(self) -> dict:
        """The job as job.yaml stores it: every key, axes as lists, no defaults hidden."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["size"] = [list(s) for s in self.sizes]
        data.pop("width")
        data.pop("height")
        return data
