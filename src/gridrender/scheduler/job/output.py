"""Where a job's files go and how its sheets are laid out."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..params import AXES, AXIS_NAMES
from ..settings import Settings
from ..storage import S3_URL

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
SHEET_AXES = tuple(AXES)


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
        axes = (self.rows, self.cols, self.pages)
        if len(set(axes)) < len(axes):
            raise ValueError("rows, cols and pages must be three different axes")
        return self


def output_root(value: str) -> str:
    """An output root: a local folder or an s3://bucket/prefix URL."""
    if "\0" in value:
        raise ValueError("must not contain NUL")
    if value.startswith("s3://") and not S3_URL.match(value):
        raise ValueError(f"{value!r} is not an s3://bucket/prefix URL")
    return value


class OutputFields(BaseModel):
    """The job's name, its output root and its sheets."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=100)]
    output: Annotated[str, Field(min_length=1)] = Field(default_factory=lambda: Settings().output)
    sheet: SheetLayout | None = None

    @field_validator("output")
    @classmethod
    def _output_root(cls, value: str) -> str:
        return output_root(value)
