"""The cell parameters: one table from which cells, ids, records, messages and axes derive.

A row says where a parameter comes from in the job file, which sheet axis shows it,
whether cells that differ in it can still share one pipeline call, and how its
value appears in the cell id, in records and on labels. Adding an axis is one row
here plus the code that uses the new value.

Rows are in expansion order, outermost first: the call parameters come first, so a
job's cells arrive grouped by pipeline call and can be chunked as they stream.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from . import samplers
from .models import ModelSpec


def _same(value: Any) -> Any:
    return value


def short_model_name(source: str) -> str:
    """A label for a model: the file or folder stem, the hub id, or builtin:name."""
    if source.startswith("builtin:") or ("/" in source and not source.startswith((".", "/", "~"))
                                         and not source.endswith((".safetensors", ".ckpt"))):
        return source
    path = PurePosixPath(source.rstrip("/"))
    return path.name.removesuffix(".safetensors").removesuffix(".ckpt") or source


@dataclass(frozen=True)
class Param:
    name: str  # Cell attribute; key in the record's `params`, manifest lines and exports
    key: str  # the job-file key its values come from
    axis: str  # the sheet and gallery axis it belongs to
    call: bool  # cells that differ in it cannot share one pipeline call
    text: bool = False  # a string repeated across cells: listed once per task message
    identity: Callable[[Any], Any] = _same  # its part of the cell id
    public: Callable[[Any], Any] = _same  # as records, manifests and exports show it
    label: Callable[[Any], str] = str  # from the public value, for sheets and the gallery
    pack: Callable[[Any], Any] = _same  # into a JSON task message
    unpack: Callable[[Any], Any] = _same  # back from it


PARAMS: tuple[Param, ...] = (
    Param("model", "model", "model", call=True, identity=ModelSpec.identity, public=lambda m: m.source,
          label=short_model_name, pack=ModelSpec.to_dict, unpack=ModelSpec.from_dict),
    Param("dtype", "dtype", "dtype", call=True),
    Param("sampler", "sampler", "sampler", call=True, identity=samplers.identity),
    Param("schedule", "schedule", "schedule", call=True),
    Param("steps", "steps", "steps", call=True),
    Param("guidance", "guidance", "guidance", call=True, label=lambda g: f"{g:g}"),
    Param("width", "size", "size", call=True),
    Param("height", "size", "size", call=True),
    Param("prompt", "prompts", "prompt", call=False, text=True),
    Param("negative_prompt", "negative_prompt", "negative_prompt", call=False, text=True),
    Param("clip_skip", "clip_skip", "clip_skip", call=False),
    Param("seed", "seeds", "seed", call=False),
)

NAMES: tuple[str, ...] = tuple(p.name for p in PARAMS)
INDEX: dict[str, int] = {p.name: i for i, p in enumerate(PARAMS)}
BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
CALL: tuple[Param, ...] = tuple(p for p in PARAMS if p.call)
PER_CELL: tuple[Param, ...] = tuple(p for p in PARAMS if not p.call)


@dataclass(frozen=True)
class Axis:
    """What sheets and the gallery vary: one or more parameters shown as one label."""

    name: str
    params: tuple[str, ...]
    key: str  # the job-file key that lists its values

    def value(self, line: dict) -> Any:
        """This axis' value in a manifest line (public values), hashable."""
        if len(self.params) == 1:
            return line[self.params[0]]
        return tuple(line[p] for p in self.params)

    def label(self, value: Any) -> str:
        values = value if len(self.params) > 1 else (value,)
        return "x".join(BY_NAME[p].label(v) for p, v in zip(self.params, values))


def _axes() -> dict[str, Axis]:
    grouped: dict[str, list[Param]] = {}
    for param in PARAMS:
        grouped.setdefault(param.axis, []).append(param)
    return {name: Axis(name, tuple(p.name for p in ps), ps[0].key) for name, ps in grouped.items()}


AXES: dict[str, Axis] = _axes()
# Every spelling a sheet layout may use for an axis: its name, its job-file key, its parameters.
AXIS_NAMES: dict[str, str] = {
    spelling: axis.name for axis in AXES.values() for spelling in (axis.name, axis.key, *axis.params)
}


def public_params(values: tuple) -> dict:
    """A cell's parameters under the job file's own names, as records and manifests store them."""
    return {p.name: p.public(v) for p, v in zip(PARAMS, values)}
