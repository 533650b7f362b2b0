"""Cells: one image each, named by its content, expanded from the job's axes as a stream."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from . import samplers
from .params import CALL, INDEX, NAMES, PARAMS, REQUIRED, clip_skip_identity, negative_identity, public_params
from .prompts import encoder_text, is_empty_prompt
from .tokens import text_identity

# CALL holds several parameters, so the getter returns a tuple of their values.
_call_values: Callable[[tuple[Any, ...]], tuple[Any, ...]] = operator.itemgetter(*(INDEX[p.name] for p in CALL))
CELL_ID_HEX = 16  # 64 bits: a collision among 10^6 cells has odds of about 1 in 3.7e7
CHUNK_ID_HEX = 16


class Cell:
    """One image: its id and a value for every parameter of `params.PARAMS`.

    Attribute access by parameter name (`cell.prompt`, `cell.seed`); values are kept
    in a tuple so that streams of a million cells stay small.
    """

    __slots__ = ("id", "values")

    def __init__(self, values: tuple[Any, ...], id: str | None = None):
        self.values = values
        self.id = id or cell_id(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[INDEX[name]]
        except KeyError:
            raise AttributeError(f"Cell has no parameter {name!r}") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cell) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Cell({self.id}, seed={self.seed}, clip_skip={self.clip_skip}, prompt={self.prompt[:30]!r})"

    def params(self) -> dict[str, Any]:
        """The cell's parameters under the job file's own key names."""
        return public_params(self.values)

    def rendered(self) -> dict[str, str]:
        """The texts as rendered (Prompt S/R and templates applied, `<lora:>` tags removed), beside `params`'
        prompts as written: what records, manifests and dataset captions carry."""
        return {"rendered_prompt": self.text, "rendered_negative_prompt": self.negative_text}

    @property
    def text(self) -> str:
        """The prompt as the text encoder reads it (S/R applied, LoRA tags removed)."""
        return encoder_text(self.prompt, self.prompt_sr)

    @property
    def negative_text(self) -> str:
        return encoder_text(self.negative_prompt, self.prompt_sr)

    @property
    def negative_is_empty(self) -> bool:
        """SDXL conditions on zeros for this negative (A1111: the text is '' itself, spaces are not)."""
        return is_empty_prompt(self.negative_prompt, self.prompt_sr)

    def call_key(self) -> tuple[Any, ...]:
        """Cells with equal keys can share one pipeline call."""
        return _call_values(self.values)

    def replace(self, **changes: Any) -> Cell:
        values = list(self.values)
        for name, value in changes.items():
            values[INDEX[name]] = value
        return Cell(tuple(values))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


# The id hashes the canonical JSON of {name: identity} with sorted keys. It is built from
# per-parameter fragments, and the fragments of call parameters (a handful of values per
# job) are cached: expanding a million cells is then mostly the per-cell values.
_ORDER = sorted(range(len(PARAMS)), key=lambda i: PARAMS[i].name)
_KEYS = [canonical_json(PARAMS[i].name) for i in _ORDER]
_CACHED = {i for i in _ORDER if PARAMS[i].call}
_fragments: dict[tuple[int, Any], str] = {}
_FRAGMENTS_MAX = 100_000  # past this many, start the cache afresh (texts vary per cell)


_PROMPT, _NEGATIVE, _SR = INDEX["prompt"], INDEX["negative_prompt"], INDEX["prompt_sr"]
_MODEL, _CLIP_SKIP = INDEX["model"], INDEX["clip_skip"]


def cell_id(values: tuple[Any, ...]) -> str:
    """A hash of everything that changes the cell's pixels: the texts as the encoder reads them
    (S/R applied, LoRA tags removed: the LoRAs are in `loras`; on SDXL a blank negative is not an
    empty one), each component's identity,
    the CLIP layers used (on SDXL, clip skip 1 and 2 read the same layers: one cell)."""
    sr = values[_SR]
    negative = negative_identity(values[_MODEL], encoder_text(values[_NEGATIVE], sr), values[_NEGATIVE], sr)
    texts = {_PROMPT: text_identity(encoder_text(values[_PROMPT], sr)), _NEGATIVE: text_identity(negative)}
    layers = clip_skip_identity(values[_MODEL], values[_CLIP_SKIP])
    parts = []
    for key, i in zip(_KEYS, _ORDER, strict=True):
        value = texts.get(i, values[i])
        if i == _CLIP_SKIP and type(layers) is not int:
            fragment = canonical_json(layers)
        elif type(value) is int and i not in _CACHED:
            fragment = str(value)  # what json.dumps writes for an int
        else:
            cached = _fragments.get((i, value)) if (i in _CACHED or type(value) is str) else None
            if cached is not None:
                fragment = cached
            else:
                identity = PARAMS[i].identity(value)
                fragment = "" if identity is None else canonical_json(identity)
                if i in _CACHED or type(value) is str:
                    if len(_fragments) > _FRAGMENTS_MAX:
                        _fragments.clear()
                    _fragments[(i, value)] = fragment
        if fragment:  # a component not in use leaves no trace: ids stay as they were without it
            parts.append(f"{key}:{fragment}")
    canonical = "{" + ",".join(parts) + "}"
    return hashlib.sha256(canonical.encode()).hexdigest()[:CELL_ID_HEX]


def make_cell(model: Any, **params: Any) -> Cell:
    """A cell from its model and keyword parameters (those with a default may be left out)."""
    defaults = {p.name: p.default for p in PARAMS if p.default is not REQUIRED}
    params = {**defaults, "model": model, **params}
    missing = set(NAMES) - params.keys()
    if missing:
        raise TypeError(f"missing cell parameters: {', '.join(sorted(missing))}")
    if params["hires"] is not None:
        params["hires"] = params["hires"].resolved(params["sampler"], params["schedule"])
    params["sampler"], params["schedule"] = samplers.canonical(params["sampler"], params["schedule"])
    return Cell(tuple(params[name] for name in NAMES))


def expand(values: Mapping[str, Sequence[Any]], derive: Callable[[list[Any]], None] | None = None) -> Iterator[Cell]:
    """Every cell of a grid, in a stable order: parameters in table order, outermost first.

    `values` maps each parameter name to its list of values, except parameters that
    share an axis (width and height), which are listed under the axis as tuples.
    `derive` completes a cell's values in place (LoRAs named in prompt tags, the
    embeddings its texts trigger) before its id is computed.
    """
    dimensions: list[tuple[tuple[int, ...], Sequence[tuple[Any, ...]]]] = []
    seen = set()
    for param in PARAMS:
        if param.axis in seen:
            continue
        seen.add(param.axis)
        members = tuple(INDEX[p.name] for p in PARAMS if p.axis == param.axis)
        listed = values[param.axis] if len(members) > 1 else [(v,) for v in values[param.name]]
        dimensions.append((members, listed))
    slots: list[Any] = [None] * len(PARAMS)
    sampler_at, schedule_at, hires_at = INDEX["sampler"], INDEX["schedule"], INDEX["hires"]
    for combo in itertools.product(*(listed for _, listed in dimensions)):
        for (members, _), value in zip(dimensions, combo, strict=True):
            for index, part in zip(members, value, strict=True):
                slots[index] = part
        if slots[hires_at] is not None:  # the hires sampler and schedule as A1111 resolves them
            slots[hires_at] = _resolved_hires(slots[hires_at], slots[sampler_at], slots[schedule_at])
        slots[sampler_at], slots[schedule_at] = samplers.canonical(slots[sampler_at], slots[schedule_at])
        if derive is not None:
            derive(slots)
        yield Cell(tuple(slots))


@functools.lru_cache(maxsize=4096)
def _resolved_hires(hires: Any, sampler: str, schedule: str) -> Any:
    return hires.resolved(sampler, schedule)


def chunked(cells: Iterable[Cell], size: int) -> Iterator[list[Cell]]:
    """Runs of at most `size` consecutive cells that share call parameters.

    Streams: expansion yields a call group's cells together, so a run ends where the
    call parameters change or the size is reached.
    """
    run: list[Cell] = []
    for cell in cells:
        if run and (len(run) == size or cell.call_key() != run[0].call_key()):
            yield run
            run = []
        run.append(cell)
    if run:
        yield run


def chunk_id(cells: list[Cell]) -> str:
    """Deterministic from the cells, so a resubmit finds the progress of the same chunk."""
    h = hashlib.sha256()
    for cell in cells:
        h.update(cell.id.encode())
    return h.hexdigest()[:CHUNK_ID_HEX]
