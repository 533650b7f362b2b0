"""The pieces of A1111's second passes: upscaling, image resizing and VAE encoding.

A1111 reference: modules/processing.py (sample_hr_pass, StableDiffusionProcessingImg2Img.init),
modules/images.py (resize_image, mode 0 "Just resize"), modules/upscaler.py (Upscaler.upscale,
UpscalerLanczos/Nearest), modules/upscaler_utils.py (ESRGAN models through spandrel),
modules/sd_samplers_common.py (images_tensor_to_samples), LDM's DiagonalGaussianDistribution.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image

from gridrender.scheduler.components import Component, read_image_source
from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.hires import Hires, InitImage, image_sha256

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST
# A1111's "ESRGAN_tile" and "ESRGAN_tile_overlap" defaults (shared_options.py): its ESRGAN upscaler
# (esrgan_model.esrgan_upscale) runs the model on 192 px tiles overlapping by 8, then blends them.
ESRGAN_TILE = 192
ESRGAN_TILE_OVERLAP = 8


def latent_upscale(latents: torch.Tensor, mode: str, antialias: bool, width: int, height: int) -> torch.Tensor:
    """A "Latent" upscaler: interpolate the first pass's latents to (height // 8, width // 8)."""
    return torch.nn.functional.interpolate(latents, size=(height // 8, width // 8), mode=mode, antialias=antialias)


def truncate(latents: torch.Tensor, x: int, y: int) -> torch.Tensor:
    """What sample_hr_pass cuts off when `resize` fixes both sides (A1111's truncate_x/y)."""
    return latents[:, :, y // 2 : latents.shape[2] - (y + 1) // 2, x // 2 : latents.shape[3] - (x + 1) // 2]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded images in [-1, 1] to uint8 as A1111 does it: clamp((x + 1) / 2), * 255, truncated."""
    clamped = torch.clamp((pixels.float() + 1.0) / 2.0, min=0.0, max=1.0)
    arrays = (255.0 * np.moveaxis(clamped.cpu().numpy(), 1, 3)).astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def resize_image(
    image: Image.Image, width: int, height: int, hires: Hires | None = None, device: torch.device | None = None
) -> Image.Image:
    """images.resize_image(0, ...): "Just resize", through the hires fix's upscaler when the image grows."""
    upscaler, model = (hires.upscaler, hires.model) if hires is not None else ("None", None)
    if upscaler == "None" and model is None:
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = _upscale(image, scale, upscaler, model, device)
    if image.width != width or image.height != height:
        image = image.resize((width, height), resample=LANCZOS)
    return image


def _upscale(
    image: Image.Image, scale: float, upscaler: str, model: Component | None, device: torch.device | None
) -> Image.Image:
    """Upscaler.upscale: up to three passes of the upscaler until the size is reached, then LANCZOS to it."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for _ in range(3):
        if image.width >= dest_w and image.height >= dest_h and scale != 1:
            break
        shape = (image.width, image.height)
        if model is not None:
            image = esrgan_upscale(model, image, device)
        else:
            resample = NEAREST if upscaler == "Nearest" else LANCZOS
            image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
        if shape == (image.width, image.height):
            break
    if image.width != dest_w or image.height != dest_h:
        image = image.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
    return image


@cache  # keyed by the file's sha256 too: a file replaced at the same location loads anew
def _upscaler_model(location: str, _sha256: str, device: str) -> Any:
    try:
        import spandrel
    except ImportError:
        raise RenderError("ESRGAN-family upscalers need the `spandrel` package: pip install 'gridrender[esrgan]'") from None
    # modelloader.load_spandrel_model for ESRGAN files: on the device, float32 (no prefer_half), eval mode
    return spandrel.ModelLoader(device=torch.device(device)).load_from_file(location).eval()


def esrgan_upscale(model: Component, image: Image.Image, device: torch.device | None = None) -> Image.Image:
    """One pass of an ESRGAN-family model (spandrel) as A1111's ESRGAN upscaler runs it: in tiles."""
    descriptor = _upscaler_model(model.location, model.sha256 or "", str(device or torch.device("cpu")))
    return upscale_in_tiles(lambda tile: _model_on_patch(descriptor, tile, device), image, ESRGAN_TILE, ESRGAN_TILE_OVERLAP)


def _model_on_patch(
    model: Callable[[torch.Tensor], torch.Tensor], image: Image.Image, device: torch.device | None
) -> Image.Image:
    """upscaler_utils.upscale_pil_patch: RGB to BGR in [0, 1], the model, clamped, rounded, back to RGB."""
    array = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)) / 255
    tensor = torch.from_numpy(array).unsqueeze(0).float().to(device or torch.device("cpu"))
    with torch.inference_mode():
        out = model(tensor)[0].float().cpu().clamp_(0, 1).numpy()
    arr = (255.0 * np.moveaxis(out, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def upscale_in_tiles(patch: Callable[[Image.Image], Image.Image], image: Image.Image, tile: int, overlap: int) -> Image.Image:
    """upscaler_utils.upscale_with_model: cut the image as images.split_grid does, upscale each tile,
    and put them together as images.combine_grid does (linear masks across each overlap).

    The tiles keep A1111's placement exactly, an image smaller than a tile included: its one
    tile is cropped at a negative offset (black beyond the image) and the model sees that border.
    """
    rows = _tile_starts(image.height, tile, overlap)
    cols = _tile_starts(image.width, tile, overlap)
    upscaled = [[patch(image.crop((x, y, x + tile, y + tile))) for x in cols] for y in rows]
    factor = upscaled[0][0].width // tile
    big_tile, big_overlap = tile * factor, overlap * factor
    width, height = image.width * factor, image.height * factor
    across = _ramp(big_overlap, big_tile, vertical=False)
    down = _ramp(big_overlap, width, vertical=True)
    out = Image.new("RGB", (width, height))
    for y, row_tiles in zip(rows, upscaled, strict=True):
        strip = Image.new("RGB", (width, big_tile))
        for x, piece in zip(cols, row_tiles, strict=True):
            if x == 0:
                strip.paste(piece, (0, 0))
                continue
            strip.paste(piece.crop((0, 0, big_overlap, big_tile)), (x * factor, 0), mask=across)
            strip.paste(piece.crop((big_overlap, 0, big_tile, big_tile)), (x * factor + big_overlap, 0))
        if y == 0:
            out.paste(strip, (0, 0))
            continue
        out.paste(strip.crop((0, 0, width, big_overlap)), (0, y * factor), mask=down)
        out.paste(strip.crop((0, big_overlap, width, big_tile)), (0, y * factor + big_overlap))
    return out


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """images.split_grid's tile offsets along one side: evenly spread, the last one flush with the end."""
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [size - tile if int(i * step) + tile >= size else int(i * step) for i in range(count)]


def _ramp(overlap: int, length: int, vertical: bool) -> Image.Image:
    """combine_grid's blend mask: 0 .. 255 * (overlap - 1) / overlap across the overlap, truncated to uint8."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    mask = np.repeat(ramp[:, None], length, axis=1) if vertical else np.repeat(ramp[None, :], length, axis=0)
    return Image.fromarray(mask, "L")


def encode(vae: Any, images: list[Image.Image], seeds: list[int], device: torch.device) -> torch.Tensor:
    """images_tensor_to_samples: [0, 1] -> [-1, 1] -> the VAE's posterior, sampled, times the scale factor.

    The posterior's sample (LDM's DiagonalGaussianDistribution.sample) draws from torch's
    global CPU generator, which A1111 has just seeded with the image's seed in a hires pass
    (rng.randn -> manual_seed); each image draws from its own generator seeded so.
    """
    arrays = np.stack([np.moveaxis(np.asarray(im.convert("RGB")).astype(np.float32) / 255.0, 2, 0) for im in images])
    pixels = torch.from_numpy(arrays).to(device, dtype=vae.dtype) * 2 - 1
    vae.disable_tiling()
    dist = vae.encode(pixels).latent_dist
    noise = torch.cat(
        [torch.randn((1, *dist.mean.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
    ).to(device=dist.mean.device, dtype=dist.mean.dtype)
    latents = dist.mean + dist.std * noise
    scaled: torch.Tensor = (latents * vae.config.scaling_factor).float()  # the VAE's outputs type as Any
    return scaled


def load_init_image(init: InitImage) -> Image.Image:
    """The init image, checked against its recorded sha256, flattened to RGB on white (images.flatten)."""
    data = read_image_source(init.location)
    if image_sha256(data) != init.sha256:
        raise RenderError(f"init image {init.source!r} changed since the job was planned (sha256 differs)")
    image: Image.Image = Image.open(io.BytesIO(data))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def hires_target(hires: Hires, width: int, height: int) -> tuple[int, int, int, int]:
    target = hires.target(width, height)
    return target.width, target.height, target.truncate_x, target.truncate_y
