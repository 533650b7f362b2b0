"""`gridrender reproduce RECORD`: render a cell again from its record alone."""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gridrender.scheduler import models
from gridrender.scheduler.errors import InputError, StorageError
from gridrender.scheduler.grid import PARAM_KEYS, make_cell
from gridrender.scheduler.s3 import S3Store

from .render import Renderer

TOLERANCE = 1  # out of 255: what batching and kernel choice may move a pixel


@dataclass
class Comparison:
    cell_id: str
    max_diff: int  # 0..255
    psnr: float  # dB; inf when identical

    @property
    def ok(self) -> bool:
        return self.max_diff <= TOLERANCE


def _read(ref: str) -> tuple[bytes, bytes]:
    """The record and the image stored beside it."""
    if ref.startswith("s3://"):
        bucket, _, key = ref[5:].partition("/")
        store = S3Store(bucket)
        return store.get(key), store.get(key.removesuffix(".json") + ".png")
    path = Path(ref)
    try:
        return path.read_bytes(), path.with_suffix(".png").read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {exc.filename}: {exc.strerror}") from None


def reproduce(ref: str, renderer: Renderer | None = None) -> Comparison:
    raw, png = _read(ref)
    try:
        record = json.loads(raw)
        params = {k: record["params"][k] for k in PARAM_KEYS}
        recorded_model = record["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{ref} is not a gridrender cell record ({exc})") from None
    model = models.resolve(params.pop("model"), recorded_model.get("revision") if recorded_model.get("kind") == "hub" else None)
    identity = {k: recorded_model.get(k) for k in model.identity()}
    if identity != model.identity():
        raise InputError(f"the model found now is not the recorded one: {model.identity()} != {identity}")
    cell = make_cell(model, **params)
    if cell.id != record["cell_id"]:
        raise InputError(f"record {record['cell_id']} does not match its own parameters (they hash to {cell.id})")
    # Kernels round differently for different batch shapes; rendering the cell in a batch
    # of the recorded size (every slot the same cell, same seed) reproduces it exactly.
    batch = max(1, min(int(record.get("batch_size") or 1), 64))
    rendered = (renderer or Renderer()).render(model, [cell] * batch)[0]
    stored = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int64)
    again = np.asarray(rendered.image.convert("RGB"), dtype=np.int64)
    if stored.shape != again.shape:
        return Comparison(cell.id, 255, 0.0)
    diff = stored - again
    mse = float((diff**2).mean())
    return Comparison(cell.id, int(np.abs(diff).max()), math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
