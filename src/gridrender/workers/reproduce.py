"""`gridrender reproduce RECORD`: render a cell again from its record alone."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gridrender.scheduler import layout, models
from gridrender.scheduler.components import Component, LoraUse, resolve_embeddings, resolve_lora, resolve_upscaler, resolve_vae
from gridrender.scheduler.errors import InputError, StorageError
from gridrender.scheduler.families import Prediction
from gridrender.scheduler.grid import Cell, make_cell
from gridrender.scheduler.hires import Hires, InitImage
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.params import NAMES
from gridrender.scheduler.s3 import S3Store
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.storage import parse_s3_url

from .compiled import EAGER
from .render import Renderer

TOLERANCE = 1  # out of 255: what batching and kernel choice may move a pixel


@dataclass
class Comparison:
    cell_id: str
    max_diff: int  # 0..255
    psnr: float  # dB; inf when identical
    compile_mode: str = EAGER  # how the UNet ran this time: as the record says it ran

    @property
    def ok(self) -> bool:
        return self.max_diff <= TOLERANCE


def _read(ref: str) -> tuple[bytes, bytes]:
    """The record and the image stored beside it."""
    if ref.startswith("s3://"):
        bucket, key = parse_s3_url(ref)
        store = S3Store(bucket)
        return store.get(key), store.get(layout.record_image(key))
    path = Path(ref)
    try:
        return path.read_bytes(), Path(layout.record_image(str(path))).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {exc.filename}: {exc.strerror}") from None


def _again(recorded: dict[str, Any], resolve: Callable[[str], Component]) -> Component:
    """A recorded component found again; a file that changed since is refused."""
    component = resolve(recorded["location"] if Path(recorded["location"]).exists() else recorded["source"])
    if component.identity() != recorded["identity"]:
        raise InputError(
            f"the {recorded['kind']} {recorded['source']!r} found now is not the recorded one: "
            f"{component.identity()} != {recorded['identity']}"
        )
    return component


def _hires_again(data: dict[str, Any], settings: Settings) -> Hires:
    """The recorded hires setting; an upscaler model file found again and checked."""
    hires = Hires.from_dict(data)
    if hires.model is None:
        return hires
    model = _again(hires.model.record(), lambda s: resolve_upscaler(s, settings))
    return Hires.from_dict({**data, "model": model.to_dict()})


def recorded_cell(record: dict[str, Any], ref: str = "record") -> tuple[ModelSpec, Cell]:
    """The record's model and components, found again and checked, and its cell, checked against the id."""
    settings = Settings()
    try:
        params = {k: record["params"][k] for k in NAMES if k in record["params"]}
        recorded = record["model"]
        identity = recorded["identity"]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{ref} is not a gridrender cell record (missing {exc})") from None
    model = models.resolve(recorded["source"], recorded.get("revision") if recorded.get("kind") == "hub" else None)
    # a job's prediction / noise-schedule override, as recorded
    model = model.with_prediction(
        Prediction(recorded.get("prediction", model.prediction), recorded.get("zero_terminal_snr", model.zero_terminal_snr))
    )
    if model.identity() != identity:
        raise InputError(f"the model found now is not the recorded one: {model.identity()} != {identity}")
    params["vae"] = _again(record["vae"], lambda s: resolve_vae(s, model, settings)) if record.get("vae") else None
    params["loras"] = tuple(
        LoraUse(
            _again(x, lambda s: resolve_lora(s, model, settings)),
            float(x["weight"]),
            float(x.get("unet_weight", x["weight"])),
            str(x.get("mention", x["name"])),
        )
        for x in record.get("loras", [])
    )
    params["embeddings"] = tuple(
        _again(e, lambda s: next(iter(resolve_embeddings([s], model, settings).values()))) for e in record.get("embeddings", [])
    )
    params["prompt_sr"] = tuple(params["prompt_sr"]) if params.get("prompt_sr") else None
    params["hires"] = _hires_again(record["hires"], settings) if record.get("hires") else None
    params["init_image"] = InitImage.from_dict(record["init_image"]) if record.get("init_image") else None
    cell = make_cell(**{**params, "model": model})
    if cell.id != record["cell_id"]:
        raise InputError(f"record {record['cell_id']} does not match its own parameters (they hash to {cell.id})")
    return model, cell


def reproduce(ref: str, renderer: Renderer | None = None) -> Comparison:
    raw, png = _read(ref)
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{ref} is not a gridrender cell record ({exc})") from None
    model, cell = recorded_cell(record, ref)
    # Kernels round differently for different batch shapes and compile modes; rendering the
    # cell in a batch of the recorded size (every slot the same cell), compiled as recorded,
    # reproduces it exactly on the same kind of device.
    batch = max(1, min(int(record.get("batch_size") or 1), 64))
    mode = (record.get("compile") or {}).get("unet", EAGER)
    renderer = renderer or Renderer(compile_mode=mode)
    rendered = renderer.render(model, [cell], pad_to=batch)[0]
    stored = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)
    again = np.asarray(rendered.image.convert("RGB"), dtype=np.int64)
    used = rendered.compile.get("unet", EAGER)
    if stored.shape != again.shape:
        return Comparison(cell.id, 255, 0.0, used)
    diff = stored - again
    mse = float((diff**2).mean())
    return Comparison(cell.id, int(np.abs(diff).max()), math.inf if mse == 0 else 10 * math.log10(255**2 / mse), used)
