"""A rendered cell becomes a PNG (with A1111 infotext) and a JSON record, written once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from typing import Any

import torch
from PIL import PngImagePlugin

from gridrender.scheduler import infotext, layout
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.storage import Store

from .render import Rendered

_PNG_COMPRESS_LEVEL = 4  # zlib level: ~3x faster than 9 for a few % larger files


@cache
def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "gridrender": metadata.version("gridrender"),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def device_info(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"type": device.type, "name": name}


def encode_png(rendered: Rendered) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext.parameters(rendered.cell))
    buffer = io.BytesIO()
    rendered.image.save(buffer, format="PNG", pnginfo=info, compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def build_record(rendered: Rendered, model: ModelSpec, image_sha256: str, device: torch.device, job: str) -> dict[str, Any]:
    cell = rendered.cell
    return {
        "cell_id": cell.id,
        "params": cell.params(),
        **cell.rendered(),
        "clip_skip": cell.clip_skip,
        "clip_layer": rendered.clip_layer,
        "clip_layers": rendered.clip_layers,
        "text_encoders": rendered.encoders,  # each encoder's layer (SDXL: both), of how many, final LayerNorm or not
        "prompt_tokens": rendered.prompt_tokens,
        "texts": {"prompt": cell.text, "negative_prompt": cell.negative_text},  # as the text encoder read them
        "model": model.record(),
        "vae": cell.vae.record() if cell.vae else None,
        "loras": [{**use.lora.record(), "weight": use.te, "unet_weight": use.unet, "mention": use.mention} for use in cell.loras],
        "embeddings": [e.record() for e in cell.embeddings],
        "hires": cell.hires.to_dict() if cell.hires else None,  # resolved: what reproduce renders again
        "init_image": cell.init_image.to_dict() if cell.init_image else None,
        "sampler": rendered.sampler,
        # every source is computed on the CPU (GPU and NV by emulation), whatever the worker's device
        "generator": {"device": "cpu", "source": cell.rng, "seed": cell.seed, "eta_noise_seed_delta": cell.eta_noise_seed_delta},
        "versions": versions(),
        "device": device_info(device),
        "timings": {k: round(v, 6) for k, v in rendered.timings.items()},
        "batch_size": rendered.batch_size,
        "compile": rendered.compile,
        "vae_decode": rendered.decode,  # dtype; redone_in_float32: a NaN/inf decode was done again in float32
        "image": layout.cell_image(cell.id),
        "image_sha256": image_sha256,
        "job": job,
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save(store: Store, rendered: Rendered, model: ModelSpec, device: torch.device, job: str) -> bool:
    """Write the image, then the record (its presence marks the cell done). True if new."""
    start = time.perf_counter()
    png = encode_png(rendered)
    if not store.put_new(layout.cell_image(rendered.cell.id), png, "image/png"):
        # An earlier attempt stored the image but not its record: that image is the cell's.
        png = store.get(layout.cell_image(rendered.cell.id))
    rendered.timings["store"] = time.perf_counter() - start
    record = build_record(rendered, model, hashlib.sha256(png).hexdigest(), device, job)
    data = json.dumps(record, indent=1, ensure_ascii=False).encode()
    return store.put_new(layout.cell_record(rendered.cell.id), data, "application/json")
