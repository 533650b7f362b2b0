"""Rendering a batch of cells that share one pipeline call.

Every cell gets its own CPU generator seeded with its seed: its starting noise and
every later draw (ancestral samplers), or its Brownian tree (SDE samplers), are the
same alone or in a batch, on any device. SD 1.x and SDXL share every step; what
differs is the conditioning (`conditioning.Conditioning`) and, for v-prediction
models, the denoiser.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from gridrender.scheduler import samplers
from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.grid import Cell, make_cell
from gridrender.scheduler.models import ModelSpec

from .clip import Encoded
from .components import embedding_vectors, fp32_vae, use_loras, vae_for
from .conditioning import Conditioning
from .denoise import Guided, a1111_sample, diffusers_sample
from .pipelines import Loaded, PipelineCache

log = logging.getLogger(__name__)
Embeddings = dict[tuple[str, int], Encoded]
LARGE_IMAGE = 1024 * 1024  # pixels above which the VAE decodes in tiles


@dataclass
class Rendered:
    cell: Cell
    image: Image.Image
    clip_layer: int
    clip_layers: int
    sampler: dict  # what the record says about the sampler: family, function or class, config, sigmas
    prompt_tokens: dict  # {"prompt": {"tokens": n, "chunks": k}, "negative_prompt": {...}}
    timings: dict = field(default_factory=dict)
    batch_size: int = 1  # cells in the pipeline call that rendered it (padding included)
    compile: dict = field(default_factory=dict)  # the mode the UNet and VAE decoder ran in
    encoders: list[dict] = field(default_factory=list)  # per text encoder: the layer used, of how many, normed
    decode: dict = field(default_factory=dict)  # the VAE's dtype, and whether a NaN/inf decode was redone in fp32


class Renderer:
    """Renders batches on one device, keeping pipelines and prompt encoders resident."""

    def __init__(self, cache: PipelineCache | None = None, compile_mode: str | None = None):
        self.cache = cache or PipelineCache(compile_mode=compile_mode)

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def encoder_passes(self) -> int:
        return sum(loaded.encoder.passes for loaded in self.cache.loaded.values())

    @torch.inference_mode()
    def encode(self, model: ModelSpec, cells: list[Cell]) -> Embeddings:
        """Conditioning for every (text, clip skip) the cells need, from one encoder pass.

        Call it once per chunk: every distinct prompt and negative prompt is encoded
        once, and that pass yields every CLIP skip the chunk uses.
        """
        loaded = self.cache.get(model, cells[0].dtype)
        encoder = loaded.encoder
        for cell in cells:
            if not 1 <= cell.clip_skip <= encoder.layers:  # SDXL: the smaller encoder's layers
                raise RenderError(f"clip_skip {cell.clip_skip} is outside 1..{encoder.layers} for {model.source}")
        use_loras(loaded.pipe, loaded.extras, cells[0].loras)  # merged before encoding: LoRAs change the text encoders too
        used = {e.name: e for c in cells for e in c.embeddings}
        vectors = {name: embedding_vectors(loaded.extras, e) for name, e in used.items()}
        texts = [t for c in cells for t in (c.text, c.negative_text)]
        return encoder.encode(texts, {c.clip_skip for c in cells}, vectors)

    def warm_up(self, model: ModelSpec, dtype: str, width: int, height: int, batch: int) -> float:
        """Render one throwaway batch at this shape: compiles (or loads compiled kernels) before real work."""
        start = time.perf_counter()
        cells = [make_cell(model, prompt="", negative_prompt="", clip_skip=1, seed=seed, sampler="Euler", steps=1,
                           guidance=7.0, width=width, height=height, dtype=dtype) for seed in range(batch)]
        self.render(model, cells, pad_to=batch)
        seconds = time.perf_counter() - start
        log.info("warm-up at %dx%d, batch %d: %.1fs (%s)", width, height, batch, seconds,
                 self.cache.get(model, dtype).compile_state())
        return seconds

    def batches(self, cells: list[Cell], batch_size: int, embeddings: Embeddings) -> list[list[Cell]]:
        """Groups that one call renders: same call parameters and conditioning lengths, in order.

        A cell is never padded to another cell's prompt length (A1111 would change
        its image for it), and samplers that draw noise per call render one cell each.
        """
        groups: dict[tuple, list[Cell]] = {}
        for cell in cells:
            lengths = (embeddings[(cell.text, cell.clip_skip)].chunks,
                       embeddings[(cell.negative_text, cell.clip_skip)].chunks)
            groups.setdefault((cell.call_key(), lengths), []).append(cell)
        out: list[list[Cell]] = []
        for group in groups.values():
            size = batch_size if samplers.lookup(group[0].sampler).batch_invariant else 1
            out.extend(group[i : i + size] for i in range(0, len(group), size))
        return out

    @torch.inference_mode()
    def render(self, model: ModelSpec, cells: list[Cell], embeddings: Embeddings | None = None,
               pad_to: int | None = None) -> list[Rendered]:
        """Render cells that share call parameters and prompt lengths in one call.

        `embeddings` from `encode` (for a whole chunk) saves the encoder pass here.
        A short batch is padded to `pad_to` cells (copies of its last cell, whose images
        are dropped): every call of a job has one shape, so kernels round alike for every
        cell whatever its batch holds, and a compiled UNet compiles once.
        """
        first = cells[0]
        if any(c.call_key() != first.call_key() for c in cells):
            raise RenderError("a batch must share model, sampler, schedule, steps, guidance, size and dtype")
        timings: dict[str, float] = {}

        # 1. The resident pipeline for this model and dtype; a static shape when compiled.
        loads_before = self.cache.loads
        loaded = self.cache.get(model, first.dtype)
        timings["load"] = loaded.load_seconds if self.cache.loads > loads_before else 0.0
        real = len(cells)
        if pad_to and real < pad_to and samplers.lookup(first.sampler).batch_invariant:
            cells = cells + [cells[-1]] * (pad_to - real)

        # 2. Conditioning, unless the chunk's single encoder pass already made it.
        start = time.perf_counter()
        needed = {(t, c.clip_skip) for c in cells for t in (c.text, c.negative_text)}
        if embeddings is None or not needed <= embeddings.keys():
            embeddings = self.encode(model, cells)
        use_loras(loaded.pipe, loaded.extras, first.loras)
        unet_dtype = loaded.pipe.unet.dtype
        size = (first.width, first.height)
        cond = Conditioning.of([embeddings[(c.text, c.clip_skip)] for c in cells], unet_dtype, *size)
        uncond = Conditioning.of([embeddings[(c.negative_text, c.clip_skip)] for c in cells], unet_dtype, *size,
                                 zero=[c.negative_is_empty for c in cells])
        timings["encode"] = time.perf_counter() - start

        # 3. One CPU generator per cell: the seed fixes the noise, whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(c.seed) for c in cells]
        latent_shape = _latent_shape(loaded, first)

        # 4. Denoise.
        start = time.perf_counter()
        sampler = samplers.lookup(first.sampler)
        if sampler.family == "a1111":
            latents, described = self._a1111(loaded, first, cond, uncond, generators, latent_shape, [c.seed for c in cells])
        else:
            latents, described = self._diffusers(loaded, first, cond, uncond, generators, latent_shape, unet_dtype)
        _sync(self.device)
        timings["denoise"] = time.perf_counter() - start

        # 5. Decode to pixels, rounded the way the sampler family's reference does.
        start = time.perf_counter()
        images, decoded = _decode(loaded, latents, first.vae, truncate=sampler.family == "a1111")
        timings["decode"] = time.perf_counter() - start

        per_cell = {k: v / real for k, v in timings.items()}
        compile_state = loaded.compile_state()
        rendered = []
        for cell, image in zip(cells[:real], images):
            encoders = loaded.encoder.describe(cell.clip_skip)
            rendered.append(Rendered(cell, image, encoders[0]["layer"], encoders[0]["layers"], described,
                                     _token_counts(embeddings, cell), dict(per_cell), len(cells), compile_state,
                                     encoders, decoded))
        return rendered

    def _a1111(self, loaded: Loaded, first: Cell, cond: Conditioning, uncond: Conditioning, generators, shape,
               seeds) -> tuple[torch.Tensor, dict]:
        if loaded.sigmas is None:
            raise RenderError(f"{first.sampler!r} needs a model with a standard (linear or scaled-linear) noise "
                              f"schedule; use a diffusers scheduler class for {loaded.model.source}")
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        guided = Guided(loaded.unet, cond, uncond, uncond_first=False)
        latents, sigmas = a1111_sample(guided, loaded.sigmas, first.sampler, first.schedule, first.steps,
                                       first.guidance, noise, generators, seeds, loaded.v_prediction)
        sampler = samplers.lookup(first.sampler)
        denoiser = "CompVisVDenoiser" if loaded.v_prediction else "CompVisDenoiser"
        described = {"family": "a1111", "name": first.sampler, "schedule": first.schedule,
                     "class": f"k-diffusion:{sampler.function}", "semantics": sampler.semantics,
                     "config": {"discard_penultimate_sigma": sampler.discard_penultimate_sigma, "noise": sampler.noise,
                                "eta": 1.0 if sampler.noise != "none" else 0.0, "s_noise": 1.0, **sampler.options,
                                "rng": "cpu", "denoiser": f"k-diffusion:{denoiser}",
                                "zero_terminal_snr": loaded.model.zero_terminal_snr},
                     "sigmas": [round(float(s), 6) for s in sigmas.cpu()]}
        return latents, described

    def _diffusers(self, loaded: Loaded, first: Cell, cond: Conditioning, uncond: Conditioning, generators, shape,
                   dtype) -> tuple[torch.Tensor, dict]:
        import diffusers

        cls = getattr(diffusers, first.sampler)
        extra = {"noise_sampler_seed": first.seed} if first.sampler == "DPMSolverSDEScheduler" else {}
        scheduler = cls.from_config(loaded.scheduler_config, **extra)
        noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(self.device)
        guided = Guided(loaded.unet, cond, uncond, uncond_first=True)
        latents = diffusers_sample(guided, scheduler, first.steps, first.guidance, noise, generators)
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        return latents, {"family": "diffusers", "name": first.sampler, "schedule": first.schedule,
                         "class": type(scheduler).__name__, "semantics": samplers.DIFFUSERS_SEMANTICS, "config": config}


def _latent_shape(loaded: Loaded, cell: Cell) -> tuple[int, int, int]:
    pipe = loaded.pipe
    factor = pipe.vae_scale_factor
    if cell.width % factor or cell.height % factor:
        raise RenderError(f"{cell.width}x{cell.height} is not a multiple of the VAE's scale factor {factor}")
    return (pipe.unet.config.in_channels, cell.height // factor, cell.width // factor)


def _decode(loaded: Loaded, latents: torch.Tensor, component, truncate: bool) -> tuple[list[Image.Image], dict]:
    """VAE decode (the model's own or the cell's); A1111 truncates to uint8 (astype), diffusers rounds.

    A decode with NaN or inf (a VAE overflowing in fp16) is done again in float32, as
    A1111's "auto VAE precision" does: never a black or NaN image under a cell id. NaN/inf
    latents (the UNet overflowed) or a float32 decode that still is not finite fail the
    cells, as A1111's test_for_nans(batch, "unet") / (sample, "vae") raise.
    """
    if not bool(torch.isfinite(latents).all()):
        raise RenderError("the UNet produced NaN/inf latents (it overflowed in this dtype); "
                          "render with `dtype: float32` or `bfloat16`")
    pipe = loaded.pipe
    vae = vae_for(pipe, loaded.extras, component, loaded.vae_config_folder)
    decode = loaded.decode if vae is pipe.vae else vae.decode
    _size_vae(vae, latents.shape[-1] * latents.shape[-2] * pipe.vae_scale_factor**2, latents.shape[0])
    cast = latents.to(vae.dtype)  # A1111 and diffusers cast to the VAE's dtype, then scale
    scaled = cast * (1.0 / vae.config.scaling_factor) if truncate else cast / vae.config.scaling_factor
    decoded = decode(scaled, return_dict=False)[0]
    described = {"dtype": str(vae.dtype).removeprefix("torch."), "redone_in_float32": False}
    if not bool(torch.isfinite(decoded).all()):
        log.warning("the VAE decoded NaN/inf in %s; decoding again in float32", described["dtype"])
        vae = fp32_vae(loaded.extras, vae, component)
        _size_vae(vae, latents.shape[-1] * latents.shape[-2] * pipe.vae_scale_factor**2, latents.shape[0])
        latents32 = latents.float()
        again = latents32 * (1.0 / vae.config.scaling_factor) if truncate else latents32 / vae.config.scaling_factor
        decoded = vae.decode(again, return_dict=False)[0]
        described = {"dtype": "float32", "redone_in_float32": True}
        if not bool(torch.isfinite(decoded).all()):
            raise RenderError("the VAE decoded NaN/inf even in float32")
    if truncate:
        pixels = torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0)
        arrays = (255.0 * np.moveaxis(pixels.cpu().numpy(), 1, 3)).astype(np.uint8)
        return [Image.fromarray(a) for a in arrays], described
    return pipe.image_processor.postprocess(decoded, output_type="pil"), described


def _size_vae(vae, pixels: int, batch: int) -> None:
    """Tile and slice the VAE only when an image is large: it costs time on small ones."""
    large = pixels > LARGE_IMAGE
    (vae.enable_tiling if large else vae.disable_tiling)()
    (vae.enable_slicing if large or batch > 8 else vae.disable_slicing)()


def _token_counts(embeddings: Embeddings, cell: Cell) -> dict:
    out = {}
    for name, text in (("prompt", cell.text), ("negative_prompt", cell.negative_text)):
        encoded = embeddings[(text, cell.clip_skip)]
        out[name] = {"tokens": encoded.tokens, "chunks": encoded.chunks}
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
