"""How each image is sampled: seeds, sampler and schedule, steps, guidance, size, batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .. import samplers
from .fields import MAX_SEED, RANDOM_SEED, as_list, distinct_axis, floats, is_one_size

Side = Annotated[int, Field(ge=8, le=8192)]


class SeedRange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    start: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0
    count: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _fits(self) -> SeedRange:
        if self.start + self.count - 1 > MAX_SEED:
            raise ValueError(f"start + count - 1 must be at most {MAX_SEED}")
        return self


class SamplingFields(BaseModel):
    """The noise, the sampler and the shape of each pipeline call."""

    model_config = ConfigDict(extra="forbid", strict=True)

    seeds: list[Annotated[int, Field(ge=RANDOM_SEED, le=MAX_SEED)]] | SeedRange = [0]
    sampler: list[str] = ["Euler a"]
    schedule: list[str] = [samplers.AUTOMATIC]
    rng: list[str] = [samplers.DEFAULT_RNG]
    eta_noise_seed_delta: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = [0]
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = [25]
    guidance: list[Annotated[float, Field(ge=0, le=100)]] = [7.0]
    width: Side | None = None
    height: Side | None = None
    size: list[tuple[Side, Side]] | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] = 4

    @field_validator("sampler", "schedule", "steps", "eta_noise_seed_delta", mode="before")
    @classmethod
    def _sampling_axes(cls, value: Any) -> Any:
        return as_list(value)

    @field_validator("rng", mode="before")
    @classmethod
    def _rng_sources(cls, value: Any) -> Any:
        """A1111's spellings: GPU, CPU, NV (case forgiven)."""
        sources = []
        for source in as_list(value):
            if not isinstance(source, str):
                return value  # the type check reports it
            if source.upper() not in samplers.RNG_SOURCES:
                raise ValueError(f"unknown random-number source {source!r}; valid: {', '.join(samplers.RNG_SOURCES)}")
            sources.append(source.upper())
        return sources

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_list(cls, value: Any) -> Any:
        return value if isinstance(value, (list, dict)) else [value]

    @field_validator("guidance", mode="before")
    @classmethod
    def _guidance_floats(cls, value: Any) -> Any:
        return floats(value)

    @field_validator("size", mode="before")
    @classmethod
    def _size_pairs(cls, value: Any) -> Any:
        if is_one_size(value):
            value = [value]  # `size: [512, 768]` is one size, not two
        if isinstance(value, list):
            return [tuple(v) if isinstance(v, list) else v for v in value]
        return value

    @field_validator("sampler", "schedule", "steps", "guidance", "seeds", "size", "rng", "eta_noise_seed_delta")
    @classmethod
    def _sampling_axes_distinct(cls, value: Any) -> Any:
        return distinct_axis(value)

    @field_validator("sampler", mode="before")
    @classmethod
    def _known_samplers(cls, value: Any) -> Any:
        """Canonical spellings before duplicates are looked for ("euler  A" is "Euler a")."""
        names = []
        for name in as_list(value):
            if not isinstance(name, str):
                return value  # the type check reports it
            base, implied = samplers.split_name(name)  # raises UnknownName, a ValueError
            names.append(f"{base.name} {implied.label}" if implied else base.name)
        return names

    @field_validator("schedule", mode="before")
    @classmethod
    def _known_schedules(cls, value: Any) -> Any:
        labels = []
        for label in as_list(value):
            if not isinstance(label, str):
                return value
            labels.append(samplers.schedule(label).label)
        return labels

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

    @model_validator(mode="after")
    def _one_way_to_give_size(self) -> SamplingFields:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise PydanticCustomError("conflict", "give either `size` or `width`/`height`, not both")
        return self

    @model_validator(mode="after")
    def _samplers_and_schedules_agree(self) -> SamplingFields:
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
                        f"{seen[pair][1]!r} ({pair[0]}, {pair[1]}); list each combination once",
                    )
                seen[pair] = (name, label)
        return self

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return list(self.size) if self.size else [(self.width or 512, self.height or 512)]

    @property
    def seed_list(self) -> Sequence[int]:
        if isinstance(self.seeds, SeedRange):
            return range(self.seeds.start, self.seeds.start + self.seeds.count)
        return list(self.seeds)
