"""Rendering a batch of cells that share one pipeline call.

Every cell gets its own generator of its random-number source (`noise.ImageNoise`,
A1111's ImageRNG) seeded with its seed: its starting noise and every later draw
(ancestral samplers), or its Brownian tree (SDE samplers), are the same alone or in
a batch, on any device. SD 1.x and SDXL share every step; what differs is the
conditioning (`conditioning.Conditioning`, at each pass's size) and, for v-prediction
models, the denoiser.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from gridrender.scheduler import samplers
from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.grid import Cell, make_cell
from gridrender.scheduler.hires import Hires
from gridrender.scheduler.models import ModelSpec
from gridrender.scheduler.prompts import encoder_text

from .clip import Encoded
from .components import embedding_vectors, use_loras, vae_for
from .conditioning import Conditioning
from .decode import UNET_NAN, VAE_NAN, decode_latents, finite
from .denoise import Guided, Img2Img, a1111_sample, diffusers_sample
from .described import describe_a1111, describe_diffusers, token_counts
from .noise import BatchNoise
from .pipelines import Loaded, PipelineCache
from .twopass import encode, hires_target, latent_upscale, load_init_image, resize_image, truncate

log = logging.getLogger(__name__)
Embeddings = dict[tuple[str, int], Encoded]


@dataclass
class Rendered:
    cell: Cell
    image: Image.Image
    clip_layer: int
    clip_layers: int
    sampler: dict[str, Any]  # what the record says about the sampler: family, function or class, config, sigmas
    prompt_tokens: dict[str, dict[str, int]]  # {"prompt": {"tokens": n, "chunks": k}, "negative_prompt": {...}}
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1  # cells in the pipeline call that rendered it (padding included)
    compile: dict[str, str] = field(default_factory=dict)  # the mode the UNet and VAE decoder ran in
    encoders: list[dict[str, Any]] = field(default_factory=list)  # per text encoder: the layer used, of how many, normed
    decode: dict[str, Any] = field(default_factory=dict)  # the VAE's dtype, and whether a NaN/inf decode was redone in fp32


class CellsFailed(RenderError):
    """Some cells of a batch produced NaN/inf (A1111's "A tensor with all NaNs was produced"): they fail,
    never stored; `rendered` holds the batch's other cells, which land as usual."""

    def __init__(self, failed: dict[str, str], rendered: list[Rendered]):
        super().__init__(next(iter(failed.values())))
        self.failed = failed  # cell id -> why
        self.rendered = rendered


@dataclass(frozen=True)
class _Call:
    """What every pass of one pipeline call uses: the resident pipeline, the texts' conditioning, the shape."""

    loaded: Loaded
    embeddings: Embeddings
    pad: int | None  # cells each pass runs (short batches padded with copies of their last cell), or None


@dataclass
class _Passes:
    """Per cell of a call, as its passes go: final latents, what the record says of its sampling, its image;
    and the cells failed so far (index -> why), in the order they failed."""

    cells: list[Cell]
    first_passes: int  # distinct first passes run: cells that differ only in their hires fix share one
    latents: list[torch.Tensor | None]
    described: list[dict[str, Any]]
    failed: dict[int, str]
    images: list[Image.Image | None] = field(default_factory=list)


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
        texts = [t for c in cells for t in cell_texts(c)]
        return encoder.encode(texts, {c.clip_skip for c in cells}, vectors)

    def warm_up(self, model: ModelSpec, dtype: str, width: int, height: int, batch: int) -> float:
        """Render one throwaway batch at this shape: compiles (or loads compiled kernels) before real work."""
        start = time.perf_counter()
        cells = [
            make_cell(
                model,
                prompt="",
                negative_prompt="",
                clip_skip=1,
                seed=seed,
                sampler="Euler",
                steps=1,
                guidance=7.0,
                width=width,
                height=height,
                dtype=dtype,
            )
            for seed in range(batch)
        ]
        self.render(model, cells, pad_to=batch)
        seconds = time.perf_counter() - start
        log.info(
            "warm-up at %dx%d, batch %d: %.1fs (%s)", width, height, batch, seconds, self.cache.get(model, dtype).compile_state()
        )
        return seconds

    def batches(self, cells: list[Cell], batch_size: int, embeddings: Embeddings) -> list[list[Cell]]:
        """Groups that one call renders: same call parameters and conditioning lengths, in order.

        A cell is never padded to another cell's prompt length (A1111 would change
        its image for it), and samplers that draw noise per call render one cell each.
        """
        groups: dict[tuple[Any, ...], list[Cell]] = {}
        for cell in cells:
            lengths = tuple(embeddings[(text, cell.clip_skip)].chunks for text in cell_texts(cell))
            groups.setdefault((cell.call_key(), lengths), []).append(cell)
        out: list[list[Cell]] = []
        for group in groups.values():
            size = batch_size if samplers.lookup(group[0].sampler).batch_invariant else 1
            out.extend(group[i : i + size] for i in range(0, len(group), size))
        return out

    @torch.inference_mode()
    def render(
        self, model: ModelSpec, cells: list[Cell], embeddings: Embeddings | None = None, pad_to: int | None = None
    ) -> list[Rendered]:
        """Render cells that share call parameters and prompt lengths in one call.

        `embeddings` from `encode` (for a whole chunk) saves the encoder pass here.
        A short batch is padded to `pad_to` cells (copies of its last cell, whose images
        are dropped): every call of a job has one shape, so kernels round alike for every
        cell whatever its batch holds, and a compiled UNet compiles once. Cells that
        differ only in their hires fix share one first pass.
        """
        first = cells[0]
        sampler = _call_sampler(cells)
        timings: dict[str, float] = {}

        # 1. The resident pipeline for this model and dtype; a static shape when compiled.
        loads_before = self.cache.loads
        loaded = self.cache.get(model, first.dtype)
        timings["load"] = loaded.load_seconds if self.cache.loads > loads_before else 0.0

        # 2. Conditioning, unless the chunk's single encoder pass already made it.
        start = time.perf_counter()
        needed = {(t, c.clip_skip) for c in cells for t in cell_texts(c)}
        if embeddings is None or not needed <= embeddings.keys():
            embeddings = self.encode(model, cells)
        use_loras(loaded.pipe, loaded.extras, first.loras)
        timings["encode"] = time.perf_counter() - start
        call = _Call(loaded, embeddings, pad_to if sampler.batch_invariant else None)

        # 3-4. The first passes, then each hires setting's second pass.
        start = time.perf_counter()
        passes = self._denoise(call, cells)
        _sync(self.device)
        timings["denoise"] = time.perf_counter() - start

        # 5. Decode to pixels, rounded the way the sampler family's reference does.
        start = time.perf_counter()
        decode_described = _decode(call, passes, truncate=sampler.family == "a1111")
        timings["decode"] = time.perf_counter() - start

        rendered = _rendered(call, passes, timings, decode_described)
        if passes.failed:
            log.error(
                "%d of %d cells produced NaN/inf and fail: %s", len(passes.failed), len(cells), next(iter(passes.failed.values()))
            )
            raise CellsFailed({cells[i].id: why for i, why in sorted(passes.failed.items())}, rendered)
        return rendered

    def _denoise(self, call: _Call, cells: list[Cell]) -> _Passes:
        """The first pass (txt2img, or img2img from init images), once per distinct first pass; then hires."""
        firsts: dict[str, int] = {}
        rows = [firsts.setdefault(c.replace(hires=None).id if c.hires else c.id, len(firsts)) for c in cells]
        first_cells = list({row: c for row, c in zip(rows, cells, strict=True)}.values())
        latents, described = self._first_pass(call, first_cells)
        # A cell whose latents are not finite fails alone (never decoded, never stored); the rest go on.
        bad_rows = {row for row in range(len(first_cells)) if not finite(latents[row])}
        failed = {i: UNET_NAN.format(stage="first pass") for i, row in enumerate(rows) if row in bad_rows}
        passes = _Passes(cells, len(first_cells), [None] * len(cells), [described] * len(cells), failed)
        self._hires_passes(call, passes, latents, rows)
        return passes

    def _hires_passes(self, call: _Call, passes: _Passes, latents: torch.Tensor, rows: list[int]) -> None:
        """Each hires setting's second pass on its cells' first-pass latents (cell i's at `rows[i]`); the final
        latents of every cell."""
        groups: dict[Hires | None, list[int]] = {}
        for i, cell in enumerate(passes.cells):
            if i not in passes.failed:
                groups.setdefault(cell.hires, []).append(i)
        for setting, members in groups.items():
            group_latents = latents[[rows[i] for i in members]]
            if setting is not None:
                group_latents, hires_described = self._hires_pass(
                    call, [passes.cells[i] for i in members], group_latents, setting
                )
                for i in members:
                    passes.described[i] = {**passes.described[i], "hires": hires_described}
            for k, i in enumerate(members):
                if setting is not None and not finite(group_latents[k]):
                    passes.failed[i] = UNET_NAN.format(stage="hires pass")
                else:
                    passes.latents[i] = group_latents[k]

    @staticmethod
    def _conditioning(
        call: _Call, cells: list[Cell], width: int, height: int, hires: Hires | None = None
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

    def _first_pass(self, call: _Call, cells: list[Cell]) -> tuple[torch.Tensor, dict[str, Any]]:
        """(latents of `cells`, what the record says): txt2img, or img2img from the cells' init images."""
        loaded, pad_to, real = call.loaded, call.pad, len(cells)
        if pad_to and real < pad_to:
            cells = cells + [cells[-1]] * (pad_to - real)
        first = cells[0]
        cond, uncond = self._conditioning(call, cells, first.width, first.height)
        shape = _latent_shape(loaded, first)
        seeds = [c.seed for c in cells]
        # One generator per cell, of the cell's source: the seed fixes the noise, whatever the batch.
        noise = BatchNoise(first.rng, seeds, first.eta_noise_seed_delta, shape, self.device)
        if samplers.lookup(first.sampler).family != "a1111":
            latents, described = self._diffusers(loaded, cells, cond, uncond, noise)
            return latents[:real], described
        start = None
        if first.init_image is not None:  # img2img: "Just resize" to the size, then the VAE's posterior
            images = [resize_image(load_init_image(c.init_image), c.width, c.height) for c in cells]
            vae = vae_for(loaded.pipe, loaded.extras, first.vae, loaded.vae_config_folder)
            start = Img2Img(encode(vae, images, seeds, self.device), float(first.denoise))
        latents, described = self._a1111(loaded, cells, Guided(loaded.unet, cond, uncond, uncond_first=False), noise, start)
        if start is not None:
            described["denoise"] = first.denoise
        return latents[:real], described

    def _hires_pass(
        self, call: _Call, cells: list[Cell], latents: torch.Tensor, hires: Hires
    ) -> tuple[torch.Tensor, dict[str, Any]]:
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
            upscaled = [resize_image(im, width, height, hires, self.device) for im in pixels if im is not None]
            samples = encode(vae, upscaled, seeds, self.device)
        samples = truncate(samples, cut_x, cut_y)
        cond, uncond = self._conditioning(call, cells, width, height, hires)
        noise = BatchNoise(first.rng, seeds, first.eta_noise_seed_delta, tuple(samples.shape[1:]), self.device)
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

    @staticmethod
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
        self, loaded: Loaded, cells: list[Cell], cond: Conditioning, uncond: Conditioning, noise: BatchNoise
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        import diffusers

        first, dtype = cells[0], loaded.pipe.unet.dtype
        cls = getattr(diffusers, first.sampler)
        extra = {"noise_sampler_seed": first.seed} if first.sampler == "DPMSolverSDEScheduler" else {}
        scheduler = cls.from_config(loaded.scheduler_config, **extra)
        initial = noise.next().to(dtype) if first.rng != "CPU" else None
        # the scheduler's own step noise takes torch generators: the cells' CPU generators
        generators = [torch.Generator("cpu").manual_seed(c.seed) for c in cells]
        if initial is None:  # CPU: prepare_latents' draw, in the UNet's dtype, as diffusers makes it
            initial = torch.cat([torch.randn((1, *noise.images[0].shape), generator=g, dtype=dtype) for g in generators]).to(
                self.device
            )
        guided = Guided(loaded.unet, cond, uncond, uncond_first=True)
        latents = diffusers_sample(guided, scheduler, first.steps, first.guidance, initial, generators)
        return latents, describe_diffusers(first, scheduler)


def _call_sampler(cells: list[Cell]) -> samplers.Sampler:
    """The sampler of a batch that one pipeline call can render; RenderError for any other batch."""
    first = cells[0]
    if any(c.call_key() != first.call_key() for c in cells):
        raise RenderError("a batch must share model, sampler, schedule, steps, guidance, size and dtype")
    sampler = samplers.lookup(first.sampler)
    if sampler.family != "a1111" and any(c.hires or c.init_image for c in cells):
        raise RenderError("hires fix and img2img run A1111's samplers; use an A1111 sampler name")
    return sampler


def _decode(call: _Call, passes: _Passes, truncate: bool) -> dict[str, Any]:
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


def _rendered(call: _Call, passes: _Passes, timings: dict[str, float], decode_described: dict[str, Any]) -> list[Rendered]:
    """The cells that did not fail, with what their records say."""
    cells = passes.cells
    per_cell = {k: v / len(cells) for k, v in timings.items()}
    compile_state = call.loaded.compile_state()
    rendered = []
    for i, (cell, image, cell_described) in enumerate(zip(cells, passes.images, passes.described, strict=True)):
        if i in passes.failed or image is None:
            continue
        encoders = call.loaded.encoder.describe(cell.clip_skip)
        rendered.append(
            Rendered(
                cell,
                image,
                encoders[0]["layer"],
                encoders[0]["layers"],
                cell_described,
                token_counts(call.embeddings, cell),
                dict(per_cell),
                max(call.pad or 0, passes.first_passes),
                compile_state,
                encoders,
                decode_described,
            )
        )
    return rendered


def cell_texts(cell: Cell) -> tuple[str, ...]:
    """Every text a cell's passes encode: its prompt and negative prompt, and its hires prompt."""
    texts = (cell.text, cell.negative_text)
    return (*texts, hires_text(cell, cell.hires)) if cell.hires and cell.hires.prompt is not None else texts


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
