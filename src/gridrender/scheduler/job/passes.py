"""A1111's second passes: hires fix (`hires:`) and img2img (`init_images:` with `denoise:`)."""

from __future__ import annotations

import itertools
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import hires, samplers
from ..hires import Hires
from .fields import as_list, distinct_axis, floats, is_one_size

Denoise = Annotated[float, Field(gt=0, le=1)]
Resize = tuple[Annotated[int, Field(ge=0, le=8192)], Annotated[int, Field(ge=0, le=8192)]]


class HiresFields(BaseModel):
    """`hires: {scale, resize, upscaler, steps, denoise, sampler, schedule, prompt}`: each value may be a list."""

    model_config = ConfigDict(extra="forbid", strict=True)

    scale: list[Annotated[float, Field(gt=0, le=16)]] | None = None
    resize: list[Resize] | None = None
    upscaler: list[Annotated[str, Field(min_length=1)]] = [next(iter(hires.LATENT_MODES))]
    steps: list[Annotated[int, Field(ge=0, le=1000)]] = [0]
    denoise: list[Denoise] = [0.7]
    sampler: list[str | None] = [None]
    schedule: list[str | None] = [None]
    prompt: list[str | None] = [None]

    @field_validator("upscaler", "steps", "sampler", "schedule", "prompt", mode="before")
    @classmethod
    def _axes(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("scale", "denoise", mode="before")
    @classmethod
    def _float_axes(cls, value: Any) -> Any:
        return value if value is None else floats(value)

    @field_validator("resize", mode="before")
    @classmethod
    def _resize_pairs(cls, value: Any) -> Any:
        if is_one_size(value):
            value = [value]  # `resize: [1024, 768]` is one size
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    @field_validator("scale", "resize", "upscaler", "steps", "denoise", "sampler", "schedule", "prompt")
    @classmethod
    def _distinct(cls, value: Any) -> Any:
        return value if value is None else distinct_axis(value)

    @field_validator("upscaler")
    @classmethod
    def _known_upscalers(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in hires.LATENT_MODES and name not in hires.PIXEL_UPSCALERS and not hires.is_model_file(name):
                raise ValueError(f"unknown upscaler {name!r}; valid: {', '.join(hires.upscaler_names())}")
        return value

    @field_validator("sampler")
    @classmethod
    def _a1111_samplers(cls, value: list[str | None]) -> list[str | None]:
        for name in value:
            if name is not None and samplers.split_name(name)[0].family != "a1111":
                raise ValueError(f"the hires pass runs A1111's samplers; {name!r} is a diffusers class")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedules(cls, value: list[str | None]) -> list[str | None]:
        return [None if label is None else samplers.schedule(label).label for label in value]

    @model_validator(mode="after")
    def _scale_or_resize(self) -> HiresFields:
        if self.scale is not None and self.resize is not None:
            raise ValueError("give either `scale` or `resize`, not both")
        for w, h in self.resize or []:
            if w == 0 and h == 0:
                raise ValueError("resize: give a width, a height or both (0 means: from the other side)")
        return self

    def values(self, models: dict[str, Any] | None = None) -> list[Hires]:
        """Every combination of the listed values, unresolved (sampler and schedule as written)."""
        sizes: list[tuple[float, int, int]] = (
            [(2.0, 0, 0)]
            if self.scale is None and self.resize is None
            else [(s, 0, 0) for s in self.scale or []] + [(2.0, w, h) for w, h in self.resize or []]
        )
        out = []
        for (scale, rx, ry), upscaler, steps, denoise, sampler, schedule, prompt in itertools.product(
            sizes, self.upscaler, self.steps, self.denoise, self.sampler, self.schedule, self.prompt
        ):
            model = (models or {}).get(upscaler)
            name = model.name if model is not None else upscaler
            out.append(Hires(name, denoise, steps, scale, rx, ry, sampler, schedule, prompt, model))
        return out


class PassFields(BaseModel):
    """A second pass: hires fix after the first pass, or img2img from init images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hires: HiresFields | None = None
    init_images: list[Annotated[str, Field(min_length=1)]] | None = None
    denoise: list[Denoise] = [0.75]

    @field_validator("init_images", mode="before")
    @classmethod
    def _images(cls, value: Any) -> Any:
        return value if value is None else as_list(value)

    @field_validator("denoise", mode="before")
    @classmethod
    def _denoise(cls, value: Any) -> Any:
        return floats(value)

    @field_validator("init_images", "denoise")
    @classmethod
    def _distinct_passes(cls, value: Any) -> Any:
        return value if value is None else distinct_axis(value)

    @model_validator(mode="after")
    def _one_second_pass(self) -> PassFields:
        if self.hires is not None and self.init_images is not None:
            raise ValueError("hires fix is txt2img's second pass; a job with init_images is img2img: give one")
        return self
