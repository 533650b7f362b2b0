"""Latents to pixels: the VAE decode, and the checks that keep NaN/inf out of storage.

A1111 raises "A tensor with all NaNs was produced" (devices.test_for_nans) for NaN
latents and for a decode still NaN in float32; a content-addressed store must never
keep such an image under a cell id, so those cells fail, alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

from gridrender.scheduler.components import Component
from gridrender.scheduler.errors import RenderError

from .components import fp32_vae, vae_for
from .pipelines import Loaded
from .twopass import to_pil

log = logging.getLogger(__name__)
LARGE_IMAGE = 1024 * 1024  # pixels above which the VAE decodes in tiles (diffusers classes only)
SLICED_BATCH = 8  # images in a batch above which the VAE decodes them one at a time
UNET_NAN = (
    'the UNet produced NaN/inf latents ({stage}; A1111: "A tensor with all NaNs was produced"), e.g. '
    "an emphasis weight or a conditioning that divides by zero, or a UNet overflowing in this dtype; "
    "nothing is stored for this cell"
)
VAE_NAN = "the VAE decoded NaN/inf even in float32; nothing is stored for this cell"


def decode_latents(
    loaded: Loaded, latents: torch.Tensor, component: Component | None, truncate: bool
) -> tuple[list[Image.Image | None], dict[str, Any]]:
    """VAE decode (the model's own or the cell's); A1111 truncates to uint8 (astype), diffusers rounds.

    A1111's samplers decode whole (no tiles). A decode with NaN or inf (a VAE overflowing
    in fp16) is done again in float32, as A1111's "auto VAE precision" does: never a black
    or NaN image under a cell id. An image still not finite in float32 is None: its cell
    fails, as A1111's test_for_nans(sample, "vae") raises. Latents must be finite (the
    caller fails the cells whose latents are not, as test_for_nans(batch, "unet")).
    """
    if not finite(latents):
        raise RenderError(UNET_NAN.format(stage="before decoding"))
    pipe = loaded.pipe
    vae = vae_for(pipe, loaded.extras, component, loaded.vae_config_folder)
    decode = loaded.decode if vae is pipe.vae else vae.decode
    pixels_each = latents.shape[-1] * latents.shape[-2] * pipe.vae_scale_factor**2
    _size_vae(vae, pixels_each, latents.shape[0], tile=not truncate)
    cast = latents.to(vae.dtype)  # A1111 and diffusers cast to the VAE's dtype, then scale
    scaled = cast * (1.0 / vae.config.scaling_factor) if truncate else cast / vae.config.scaling_factor
    decoded = decode(scaled, return_dict=False)[0]
    described: dict[str, Any] = {"dtype": str(vae.dtype).removeprefix("torch."), "redone_in_float32": False}
    if not finite(decoded):
        log.warning("the VAE decoded NaN/inf in %s; decoding again in float32", described["dtype"])
        vae = fp32_vae(loaded.extras, vae, component)
        _size_vae(vae, pixels_each, latents.shape[0], tile=not truncate)
        latents32 = latents.float()
        again = latents32 * (1.0 / vae.config.scaling_factor) if truncate else latents32 / vae.config.scaling_factor
        decoded = vae.decode(again, return_dict=False)[0]
        described = {"dtype": "float32", "redone_in_float32": True}
    each_finite = [finite(image) for image in decoded]
    if not all(each_finite):  # those cells fail; the others' pixels are fine
        decoded = torch.where(
            torch.tensor(each_finite, device=decoded.device)[:, None, None, None], decoded, torch.zeros_like(decoded)
        )
    images = to_pil(decoded) if truncate else pipe.image_processor.postprocess(decoded, output_type="pil")
    return [image if ok else None for image, ok in zip(images, each_finite, strict=True)], described


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _size_vae(vae: Any, pixels: int, batch: int, tile: bool) -> None:
    """Tile and slice the VAE only when an image is large: it costs time on small ones.

    A1111's samplers decode whole (A1111's decode_first_stage): `tile` is off for them.
    """
    large = pixels > LARGE_IMAGE
    (vae.enable_tiling if large and tile else vae.disable_tiling)()
    (vae.enable_slicing if large or batch > SLICED_BATCH else vae.disable_slicing)()
