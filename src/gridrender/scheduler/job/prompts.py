"""The job's texts: prompts, negative prompts, CLIP skip, Prompt S/R and dynamic-prompt sampling."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from .. import prompts
from .fields import MAX_SEED, Positive, as_list, distinct_axis

# Lines that would end a prompt early in A1111's "parameters" text.
_INFOTEXT_LINE = re.compile(r"^\s*(Negative prompt:|Steps:)", re.M)
_SURROGATES = range(0xD800, 0xDFFF + 1)
_SR_MIN_VALUES = 2  # Prompt S/R: the text to search for, then at least one replacement


def _prompt_text(text: str) -> str:
    """A prompt gridrender can render as A1111 reads it and write into infotext intact."""
    if any(ord(c) in _SURROGATES for c in text):
        raise ValueError("contains a lone surrogate (invalid Unicode); fix the escape sequence")
    if match := _INFOTEXT_LINE.search(text):
        raise ValueError(f"a line may not start with {match.group(1)!r}: it would corrupt the PNG's parameters text")
    if "\0" in text:
        raise ValueError("must not contain NUL")
    reason = prompts.unsupported_syntax(text)
    if reason:
        raise ValueError(reason)
    return text


PromptText = Annotated[str, AfterValidator(_prompt_text)]


class PromptSamples(BaseModel):
    """Draw `count` variants of each dynamic-prompt template; the seed makes a resubmit draw the same."""

    model_config = ConfigDict(extra="forbid", strict=True)
    count: Annotated[int, Field(ge=1, le=100_000)]
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None


class PromptFields(BaseModel):
    """What the text encoder reads."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[PromptText]
    negative_prompt: list[PromptText] = [""]
    clip_skip: list[Positive] = [1]
    prompt_sr: list[PromptText] | None = None
    prompt_samples: Annotated[int, Field(ge=1, le=100_000)] | PromptSamples | None = None

    _prompts: list[str] = PrivateAttr(default_factory=list)  # the prompts with dynamic templates expanded

    @field_validator("prompts", "negative_prompt", "clip_skip", mode="before")
    @classmethod
    def _text_axes(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("prompt_sr", mode="before")
    @classmethod
    def _sr_list(cls, value: Any) -> Any:
        return value if value is None else as_list(value)

    @field_validator("prompt_sr")
    @classmethod
    def _sr_values(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < _SR_MIN_VALUES or not value[0]):
            raise ValueError("list the text to search for first, then what to replace it with (at least two values)")
        return value

    @field_validator("prompts", "negative_prompt", "clip_skip", "prompt_sr")
    @classmethod
    def _text_axes_distinct(cls, value: Any) -> Any:
        return distinct_axis(value)
