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
from .components import Component, LoraUse
from .families import SDXL
from .hires import Hires, InitImage
from .models import ModelSpec
from .prompts import is_empty_prompt


def _same(value: Any) -> Any:
    return value


REQUIRED = object()  # a Param default: every cell names it


def short_model_name(source: str) -> str:
    """A label for a model: the file or folder stem, the hub id, or builtin:name."""
    if source.startswith("builtin:") or (
        "/" in source and not source.startswith((".", "/", "~")) and not source.endswith((".safetensors", ".ckpt"))
    ):
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
    default: Any = REQUIRED  # what a cell holds when the job does not use the parameter


def _none(_: Any) -> None:
    return None


def _vae_label(source: str | None) -> str:
    return short_model_name(source) if source else "model's own"


# Bump when what a LoRA file renders changes: it is part of the id of every cell using LoRAs.
# "a1111-merge-1": A1111's key matching and module types, merged into the weights.
# "a1111-merge-2": a full-weight module's diff_b changes the layer's bias, as in A1111.
LORA_SEMANTICS = "a1111-merge-2"


def _loras_identity(loras: tuple[LoraUse, ...]) -> dict[str, Any] | None:
    # In order: A1111 applies a set one LoRA after another (DoRA's result depends on it).
    return {"semantics": LORA_SEMANTICS, "applied": [use.identity() for use in loras]} if loras else None


def _loras_public(loras: tuple[LoraUse, ...]) -> list[dict[str, Any]]:
    return [use.public() for use in loras]


def _loras_label(loras: list[dict[str, Any]]) -> str:
    return (
        ", ".join(
            f"{short_model_name(x['path'])}:{x['weight']:g}" + (f":{x['unet_weight']:g}" if "unet_weight" in x else "")
            for x in loras
        )
        or "none"
    )


def _loras_unpack(data: list[list[Any]]) -> tuple[LoraUse, ...]:
    return tuple(LoraUse.unpack(item) for item in data)


def _hires_label(public: dict[str, Any] | None) -> str:
    if not public:
        return "no hires"
    keys = {k: v for k, v in public.items() if k not in ("model",)}
    return Hires(**keys).label()


def _components_unpack(data: list[dict[str, Any]]) -> tuple[Component, ...]:
    return tuple(Component.from_dict(c) for c in data)


PARAMS: tuple[Param, ...] = (
    Param(
        "model",
        "model",
        "model",
        call=True,
        identity=ModelSpec.identity,
        public=lambda m: m.source,
        label=short_model_name,
        pack=ModelSpec.to_dict,
        unpack=ModelSpec.from_dict,
    ),
    Param(
        "vae",
        "vae",
        "vae",
        call=True,
        identity=lambda c: c.identity() if c else None,
        public=lambda c: c.source if c else None,
        label=_vae_label,
        pack=lambda c: c.to_dict() if c else None,
        unpack=lambda d: Component.from_dict(d) if d else None,
        default=None,
    ),
    Param(
        "loras",
        "loras",
        "loras",
        call=True,
        identity=_loras_identity,
        public=_loras_public,
        label=_loras_label,
        pack=lambda loras: [use.pack() for use in loras],
        unpack=_loras_unpack,
        default=(),
    ),
    Param("dtype", "dtype", "dtype", call=True),
    Param("sampler", "sampler", "sampler", call=True, identity=samplers.identity),
    Param("schedule", "schedule", "schedule", call=True, identity=samplers.schedule_identity, default=samplers.AUTOMATIC),
    Param("rng", "rng", "rng", call=True, default=samplers.DEFAULT_RNG),
    # A1111's eta_noise_seed_delta; 0 leaves no trace in the id (ids stay as they were without it)
    Param(
        "eta_noise_seed_delta", "eta_noise_seed_delta", "eta_noise_seed_delta", call=True, identity=lambda d: d or None, default=0
    ),
    Param("steps", "steps", "steps", call=True),
    Param("guidance", "guidance", "guidance", call=True, label=lambda g: f"{g:g}"),
    Param("width", "size", "size", call=True),
    Param("height", "size", "size", call=True),
    # img2img's denoising strength (None without init images): it sets the pass's sigmas
    Param("denoise", "denoise", "denoise", call=True, label=lambda d: "-" if d is None else f"{d:g}", default=None),
    Param("prompt", "prompts", "prompt", call=False, text=True),
    Param("negative_prompt", "negative_prompt", "negative_prompt", call=False, text=True),
    # (search, replacement) of A1111's Prompt S/R; the id holds the replaced texts instead
    Param(
        "prompt_sr",
        "prompt_sr",
        "prompt_sr",
        call=False,
        identity=_none,
        public=lambda sr: list(sr) if sr else None,
        label=lambda sr: sr[1] if sr else "-",
        pack=lambda sr: list(sr) if sr else None,
        unpack=lambda sr: tuple(sr) if sr else None,
        default=None,
    ),
    Param("clip_skip", "clip_skip", "clip_skip", call=False),
    Param("seed", "seeds", "seed", call=False),
    # the textual-inversion embeddings the cell's texts trigger: derived, not a job axis
    Param(
        "embeddings",
        "embeddings",
        "",
        call=False,
        identity=lambda es: sorted(c.identity()["sha256"] for c in es) or None,
        public=lambda es: [c.name for c in es],
        label=lambda names: ", ".join(names) or "none",
        pack=lambda es: [c.to_dict() for c in es],
        unpack=_components_unpack,
        default=(),
    ),
    # img2img's init image: its sha256 is part of the id
    Param(
        "init_image",
        "init_images",
        "init_image",
        call=False,
        identity=lambda i: i.identity() if i else None,
        public=lambda i: i.source if i else None,
        label=lambda s: PurePosixPath(s).name if s else "-",
        pack=lambda i: i.to_dict() if i else None,
        unpack=lambda d: InitImage.from_dict(d) if d else None,
        default=None,
    ),
    # the hires fix, innermost: cells that differ only in it follow each other and share one first pass
    Param(
        "hires",
        "hires",
        "hires",
        call=False,
        identity=lambda h: h.identity() if h else None,
        public=lambda h: h.public() if h else None,
        label=_hires_label,
        pack=lambda h: h.to_dict() if h else None,
        unpack=lambda d: Hires.from_dict(d) if d else None,
        default=None,
    ),
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

    def value(self, line: dict[str, Any]) -> Any:
        """This axis' value in a manifest line (public values; a component left out is its default)."""
        values = tuple(line[p] if p in line else BY_NAME[p].public(BY_NAME[p].default) for p in self.params)
        return values[0] if len(values) == 1 else values

    def label(self, value: Any) -> str:
        values = value if len(self.params) > 1 else (value,)
        return "x".join(BY_NAME[p].label(v) for p, v in zip(self.params, values, strict=True))


def _axes() -> dict[str, Axis]:
    grouped: dict[str, list[Param]] = {}
    for param in PARAMS:
        if param.axis:  # derived parameters are no axis
            grouped.setdefault(param.axis, []).append(param)
    return {name: Axis(name, tuple(p.name for p in ps), ps[0].key) for name, ps in grouped.items()}


AXES: dict[str, Axis] = _axes()
# Every spelling a sheet layout may use for an axis: its name, its job-file key, its parameters.
AXIS_NAMES: dict[str, str] = {spelling: axis.name for axis in AXES.values() for spelling in (axis.name, axis.key, *axis.params)}


def clip_skip_identity(model: ModelSpec, skip: int) -> Any:
    """A CLIP skip's part of the cell id: N on SD 1.x; on SDXL the layers both encoders read.

    SDXL takes the penultimate layer (without the final LayerNorm) for N = 1 and 2, so
    those are one cell; N >= 3 takes layer L-N+1 of each encoder.
    """
    if getattr(model, "family", None) != SDXL:
        return skip
    return {"layers": [layers + 1 - max(skip, 2) for layers in model.encoder_layers()]}


def negative_identity(model: ModelSpec, text: str, raw: str, sr: tuple[str, str] | None) -> str:
    """The negative prompt's part of the cell id: the text as the encoder reads it (`text`).

    On SDXL an empty negative renders as zeros, a negative of only spaces as the encoded
    empty chunk (A1111 compares the raw text with ''): two images, so two ids. SD 1.x reads
    both as the same empty chunk, and ids stay as they were.
    """
    if text == "" and getattr(model, "family", None) == SDXL and not is_empty_prompt(raw, sr):
        return " "  # never an encoder text (those are stripped): marks "blank but not empty"
    return text


# components and settings a job may not use at all
_OPTIONAL = ("vae", "loras", "prompt_sr", "embeddings", "eta_noise_seed_delta", "denoise", "init_image", "hires")


def public_params(values: tuple[Any, ...]) -> dict[str, Any]:
    """A cell's parameters under the job file's own names, as records and manifests store them.

    Components the cell does not use (no VAE of its own, no LoRA, ...) are left out.
    """
    return {p.name: p.public(v) for p, v in zip(PARAMS, values, strict=True) if not (p.name in _OPTIONAL and v == p.default)}
