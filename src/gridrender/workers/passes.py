"""The passes of one pipeline call: the first (txt2img or img2img), each hires fix's second, the decode.

Short batches run padded to the call's shape in every pass (copies of their last cell,
dropped after), so kernels round alike for every cell and a compiled UNet compiles once.
A cell whose latents or pixels are not finite fails alone; the rest of the call goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gridrender.scheduler import samplers
from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.grid import Cell
from gridrender.scheduler.hires import Hires
from gridrender.scheduler.prompts import encoder_text

from .clip import Encoded
from .components import vae_for
from .conditioning import Conditioning
from .decode import UNET_NAN, VAE_NAN, decode_latents, finite
from .denoise import Guided, Img2Img, a1111_sample, diffusers_sample
from .described import describe_a1111, describe_diffusers
from .noise import BatchNoise
from .pipelines import Loaded
from .twopass import encode, hires_target, latent_upscale, load_init_image, resize_image, truncate

Embeddings = dict[tuple[str, int], Encoded]


@dataclass(frozen=True)
class Call:
    """What every pass of one pipeline call uses: the resident pipeline, the texts' conditioning, the shape."""

    loaded: Loaded
    embeddings: Embeddings
    pad: int | None  # cells each pass runs (short batches padded with copies of their last cell), or None
    device: torch.device


@dataclass
class Passes:
    """Per cell of a call, as its passes go: final latents, what the record says of its sampling, its image;
    and the cells failed so far (index -> why), in the order they failed."""

    cells: list[Cell]
    first_passes: int  # distinct first passes run: cells that differ only in their hires fix share one
    latents: list[torch.Tensor | None]
    described: list[dict[str, Any]]
    failed: dict[int, str]
    images: list[Image.Image | None] = field(default_factory=list)


def denoise(call: Call, cells: list[Cell]) -> Passes:
    """The first pass (txt2img, or img2img from init images), once per distinct first pass; then hires."""
    firsts: dict[str, int] = {}
    rows = [firsts.setdefault(c.replace(hires=None).id if c.hires else c.id, len(firsts)) for c in cells]
    first_cells = list({row: c for row, c in zip(rows, cells, strict=True)}.values())
    latents, described = _first_pass(call, first_cells)
    # A cell whose latents are not finite fails alone (never decoded, never stored); the rest go on.
    bad_rows = {row for row in range(len(first_cells)) if not finite(latents[row])}
    failed = {i: UNET_NAN.format(stage="first pass") for i, row in enumerate(rows) if row in bad_rows}
    passes = Passes(cells, len(first_cells), [None] * len(cells), [described] * len(cells), failed)
    _hires_passes(call, passes, latents, rows)
    return passes


def _hires_passes(call: Call, passes: Passes, latents: torch.Tensor, rows: list[int]) -> None:
    """Each hires setting's second pass on its cells' first-pass latents (cell i's at `rows[i]`); the final
    latents of every cell."""
    groups: dict[Hires | None, list[int]] = {}
    for i, cell in enumerate(passes.cells):
        if i not in passes.failed:
            groups.setdefault(cell.hires, []).append(i)
    for setting, members in groups.items():
        group_latents = latents[[rows[i] for i in members]]
        if setting is not None:
            group_latents, hires_described = _hires_pass(call, [passes.cells[i] for i in members], group_latents, setting)
            for i in members:
                passes.described[i] = {**passes.described[i], "hires": hires_described}
        for k, i in enumerate(members):
            if setting is not None and not finite(group_latents[k]):
                passes.failed[i] = UNET_NAN.format(stage="hires pass")
            else:
                passes.latents[i] = group_latents[k]


def _conditioning(
    call: Call, cells: list[Cell], width: int, height: int, hires: Hires | None = None
) -> tuple[Conditioning, Conditioning]:
    """cond and uncond of a pass; SDXL's size conditioning is the pass's size (A1111's calculate_hr_conds)."""
    dtype, embeddings = call.loaded.pipe.unet.dtype, call.embeddings
    texts = [hires_text(c, hires) for c in cells]
    cond = Conditioning.of([embeddings[(t, c.clip_skip)] for t, c in zip(texts, cells, strict=True)], dtype, width, height)
    uncond = Conditioning.of(
        [embeddings[(c.negative_text, c.clip_skip)] for c in cells],
        dtype,
        width,
        height,
        zero=[c.negative_is_empty for c in cells],
    )
    return cond, uncond


def _first_pass(call: Call, cells: list[Cell]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(latents of `cells`, what the record says): txt2img, or img2img from the cells' init images."""
    loaded, pad_to, real = call.loaded, call.pad, len(cells)
    if pad_to and real < pad_to:
        cells = cells + [cells[-1]] * (pad_to - real)
    first = cells[0]
    cond, uncond = _conditioning(call, cells, first.width, first.height)
    shape = _latent_shape(loaded, first)
    seeds = [c.seed for c in cells]
    # One generator per cell, of the cell's source: the seed fixes the noise, whatever the batch.
    noise = BatchNoise(first.rng, seeds, first.eta_noise_seed_delta, shape, call.device)
    if samplers.lookup(first.sampler).family != "a1111":
        latents, described = _diffusers(call, cells, cond, uncond, noise)
        return latents[:real], described
    start = None
    if first.init_image is not None:  # img2img: "Just resize" to the size, then the VAE's posterior
        images = [resize_image(load_init_image(c.init_image), c.width, c.height) for c in cells]
        vae = vae_for(loaded.pipe, loaded.extras, first.vae, loaded.vae_config_folder)
        start = Img2Img(encode(vae, images, seeds, call.device), float(first.denoise))
    latents, described = _a1111(loaded, cells, Guided(loaded.unet, cond, uncond, uncond_first=False), noise, start)
    if start is not None:
        described["denoise"] = first.denoise
    return latents[:real], described


def _hires_pass(call: Call, cells: list[Cell], latents: torch.Tensor, hires: Hires) -> tuple[torch.Tensor, dict[str, Any]]:
    """A1111's sample_hr_pass: upscale, fresh noise at the new size, img2img with the hires settings."""
    loaded, pad_to, real = call.loaded, call.pad, len(cells)
    if pad_to and real < pad_to:  # every step of the pass runs the call's shape
        cells = cells + [cells[-1]] * (pad_to - real)
        latents = torch.cat([latents, latents[-1:].expand(pad_to - real, *latents.shape[1:])])
    first = cells[0]
    width, height, cut_x, cut_y = hires_target(hires, first.width, first.height)
    vae = vae_for(loaded.pipe, loaded.extras, first.vae, loaded.vae_config_folder)
    seeds = [c.seed for c in cells]
    if hires.latent_mode is not None:
        mode, antialias = hires.latent_mode
        samples = latent_upscale(latents, mode, antialias, width, height)
    else:  # decode, upscale the pixels, encode again
        pixels, _ = decode_latents(loaded, latents, first.vae, truncate=True)
        if any(im is None for im in pixels):  # the cell fails as its hires latents do: made NaN here
            raise RenderError(VAE_NAN + " (decoding the first pass for the hires upscaler)")
        upscaled = [resize_image(im, width, height, hires, call.device) for im in pixels if im is not None]
        samples = encode(vae, upscaled, seeds, call.device)
    samples = truncate(samples, cut_x, cut_y)
    cond, uncond = _conditioning(call, cells, width, height, hires)
    noise = BatchNoise(first.rng, seeds, first.eta_noise_seed_delta, tuple(samples.shape[1:]), call.device)
    sampler, schedule = hires.sampler or first.sampler, hires.schedule or first.schedule
    assert loaded.sigmas is not None  # the first pass checked it
    guided = Guided(loaded.unet, cond, uncond, uncond_first=False)
    out, sigmas = a1111_sample(
        guided,
        loaded.sigmas,
        sampler,
        schedule,
        first.steps,
        first.guidance,
        noise,
        seeds,
        Img2Img(samples, hires.denoise, hires.steps or first.steps),
        loaded.v_prediction,
    )
    described = describe_a1111(loaded, first, sampler, schedule, sigmas)
    described.update(upscaler=hires.upscaler, target=[width, height], denoise=hires.denoise, steps=hires.steps or first.steps)
    return out[:real], described


def _a1111(
    loaded: Loaded, cells: list[Cell], guided: Guided, noise: BatchNoise, start: Img2Img | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    first = cells[0]
    if loaded.sigmas is None:
        raise RenderError(
            f"{first.sampler!r} needs a model with a standard (linear or scaled-linear) noise "
            f"schedule; use a diffusers scheduler class for {loaded.model.source}"
        )
    latents, sigmas = a1111_sample(
        guided,
        loaded.sigmas,
        first.sampler,
        first.schedule,
        first.steps,
        first.guidance,
        noise,
        [c.seed for c in cells],
        start,
        loaded.v_prediction,
    )
    return latents, describe_a1111(loaded, first, first.sampler, first.schedule, sigmas)


def _diffusers(
    call: Call, cells: list[Cell], cond: Conditioning, uncond: Conditioning, noise: BatchNoise
) -> tuple[torch.Tensor, dict[str, Any]]:
    import diffusers

    loaded = call.loaded

    first, dtype = cells[0], loaded.pipe.unet.dtype
    cls = getattr(diffusers, first.sampler)
    extra = {"noise_sampler_seed": first.seed} if first.sampler == "DPMSolverSDEScheduler" else {}
    scheduler = cls.from_config(loaded.scheduler_config, **extra)
    initial = noise.next().to(dtype) if first.rng != "CPU" else None
    # the scheduler's own step noise takes torch generators: the cells' CPU generators
    generators = [torch.Generator("cpu").manual_seed(c.seed) for c in cells]
    if initial is None:  # CPU: prepare_latents' draw, in the UNet's dtype, as diffusers makes it
        initial = torch.cat([torch.randn((1, *noise.images[0].shape), generator=g, dtype=dtype) for g in generators]).to(
            call.device
        )
    guided = Guided(loaded.unet, cond, uncond, uncond_first=True)
    latents = diffusers_sample(guided, scheduler, first.steps, first.guidance, initial, generators)
    return latents, describe_diffusers(first, scheduler)


def decode(call: Call, passes: Passes, truncate: bool) -> dict[str, Any]:
    """Every cell's image (None where it failed); what the record says of the decode."""
    passes.images = [None] * len(passes.cells)
    decode_described: dict[str, Any] = {}
    for members in _same_shape(passes.latents):
        stacked = torch.stack([_present(passes.latents[i]) for i in members])
        if call.pad and len(members) < call.pad:  # the VAE decodes the call's shape too: padded, copies dropped
            stacked = torch.cat([stacked, stacked[-1:].expand(call.pad - len(members), *stacked.shape[1:])])
        decoded, decode_described = decode_latents(call.loaded, stacked, passes.cells[0].vae, truncate=truncate)
        for i, image in zip(members, decoded[: len(members)], strict=True):
            if image is None:
                passes.failed[i] = VAE_NAN
            passes.images[i] = image
    return decode_described


def hires_text(cell: Cell, hires: Hires | None) -> str:
    """The prompt a pass encodes: the hires prompt (Prompt S/R applied) in a hires pass that has one."""
    if hires is None or hires.prompt is None:
        return cell.text
    return encoder_text(hires.prompt, cell.prompt_sr)


def _present(x: torch.Tensor | None) -> torch.Tensor:
    assert x is not None
    return x


def _same_shape(latents: list[torch.Tensor | None]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(latents):
        if x is None:  # a cell that failed before decoding
            continue
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _latent_shape(loaded: Loaded, cell: Cell) -> tuple[int, int, int]:
    pipe = loaded.pipe
    factor = pipe.vae_scale_factor
    if cell.width % factor or cell.height % factor:
        raise RenderError(f"{cell.width}x{cell.height} is not a multiple of the VAE's scale factor {factor}")
    return (pipe.unet.config.in_channels, cell.height // factor, cell.width // factor)
