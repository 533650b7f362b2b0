"""What the job renders with: checkpoints, VAEs, LoRAs, embeddings, and the dtype they run in."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .fields import Weight, as_list, distinct_axis, floats

# git's ref-name rules (git check-ref-format), or a commit hash: what a hub revision can be.
_REF = re.compile(r"^(?!-)(?!.*\.\.)(?!.*@\{)(?!.*//)(?!.*\.lock$)(?!.*[./]$)[^\x00-\x20~^:?*\[\\\x7f]{1,255}$")


class LoraEntry(BaseModel):
    """A LoRA applied to every cell, at each of its weights (a list of weights is an axis)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    path: Annotated[str, Field(min_length=1)]
    weight: list[Weight] = [1.0]

    @field_validator("weight", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        return floats(value)

    @field_validator("weight")
    @classmethod
    def _distinct(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("must not be empty")
        if len(set(value)) < len(value):
            raise ValueError("a weight is listed twice (every cell of a grid is different)")
        return value


class ComponentFields(BaseModel):
    """The checkpoint and everything loaded beside it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: list[Annotated[str, Field(min_length=1)]]
    revision: str | None = None
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    # What the UNet predicts and its noise schedule: `auto` reads the model's files (v_pred/ztsnr keys,
    # the scheduler config); a value overrides them for every model of the job.
    prediction: Literal["auto", "epsilon", "v_prediction"] = "auto"
    noise_schedule: Literal["auto", "Default", "Zero Terminal SNR"] = "auto"
    vae: list[Annotated[str, Field(min_length=1)] | None] = [None]
    loras: list[LoraEntry] = []
    embeddings: list[Annotated[str, Field(min_length=1)]] = []

    @field_validator("model", "vae", mode="before")
    @classmethod
    def _component_axes(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("loras", "embeddings", mode="before")
    @classmethod
    def _a_list(cls, value: Any) -> Any:
        return [] if value is None else as_list(value)

    @field_validator("embeddings")
    @classmethod
    def _distinct_files(cls, value: list[str]) -> list[str]:
        if len(set(value)) < len(value):
            raise ValueError("a file or folder is listed twice")
        return value

    @field_validator("model", "vae")
    @classmethod
    def _component_axes_distinct(cls, value: Any) -> Any:
        return distinct_axis(value)

    @field_validator("revision")
    @classmethod
    def _git_ref(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError(f"{value!r} is not a valid git revision (a branch, tag or commit hash)")
        return value
