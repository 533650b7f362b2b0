"""What every part of the job model shares: one-or-many axis values and their checks."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from ..prompts import MAX_LORA_WEIGHT

MAX_SEED = 2**32 - 1
RANDOM_SEED = -1


_WIDTH_AND_HEIGHT = 2


def is_one_size(value: Any) -> bool:
    """`[512, 768]` (a width and a height) where a list of sizes may stand: one size, not two."""
    return isinstance(value, list) and len(value) == _WIDTH_AND_HEIGHT and all(isinstance(v, int) for v in value)


Positive = Annotated[int, Field(ge=1)]
Weight = Annotated[float, Field(ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, allow_inf_nan=False)]  # a LoRA's


def as_list(value: Any) -> Any:
    """One value or a list of them: an axis key's two spellings."""
    return value if isinstance(value, list) else [value]


def floats(value: Any) -> Any:
    """YAML reads `7` as an int; a float axis should accept it (but not a bool)."""
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in as_list(value)]


def distinct_axis(value: Any) -> Any:
    """An axis lists each value once: every cell of a grid is different."""
    if isinstance(value, list):
        if not value:
            raise ValueError("must not be empty")
        seen = set()
        for item in value:
            if item in seen and item != RANDOM_SEED:
                raise ValueError(f"{item!r} is listed twice (every cell of a grid is different)")
            seen.add(item)
    return value
