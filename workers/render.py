"""Rendering a batch of cells that share one pipeline call.

Every cell gets its own CPU generator seeded with its seed, so its starting noise
(and, for ancestral samplers, every noise draw) is the same alone or in a batch,
on any device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from gridrender.scheduler.errors import RenderError
from gridrender.scheduler.grid import Cell
from gridrender.scheduler.models import ModelSpec

from .clip import PromptEncoder, clip_layer_for
from .pipelines import Loaded, PipelineCache
from .samplers import describe, make_scheduler


@dataclass
class Rendered:
    cell: Cell
    image: Image.Image
    clip_layer: int
    clip_layers: int
    sampler: dict
    timings: dict = field(default_factory=dict)
    batch_size: int = 1  # cells in the pipeline call that rendered it


class Renderer:
    """Renders batches on one device, keeping pipelines and prompt encoders resident."""

    def __init__(self, cache: PipelineCache | None = None):
        self.cache = cache or PipelineCache()
        self._encoders: dict[int, PromptEncoder] = {}
        self._base_configs: dict[int, dict] = {}

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def encoder_passes(self) -> int:
        return sum(e.passes for e in self._encoders.values())

    def encoder_texts(self) -> int:
        return sum(e.texts for e in self._encoders.values())

    @torch.inference_mode()
    def encode(self, model: ModelSpec, cells: list[Cell]) -> dict[tuple[str, int], torch.Tensor]:
        """Embeddings for every (text, clip skip) the cells need, from one encoder pass.

        Call it once per chunk: every distinct prompt and negative prompt is encoded
        once, and that pass yields every CLIP skip the chunk uses.
        """
        loaded = self.cache.get(model, cells[0].dtype)
        encoder = self._encoder(loaded)
        for cell in cells:
            if not 1 <= cell.clip_skip <= encoder.layers:
                raise RenderError(f"clip_skip {cell.clip_skip} is outside 1..{encoder.layers} for {model.source}")
        texts = list(dict.fromkeys(t for c in cells for t in (c.prompt, c.negative_prompt)))
        skips = {c.clip_skip for c in cells}
        by_skip = encoder.encode(texts, skips)
        return {(text, skip): by_skip[skip][i] for i, text in enumerate(texts) for skip in skips}

    def _encoder(self, loaded: Loaded) -> PromptEncoder:
        key = id(loaded.pipe)
        if key not in self._encoders:
            self._encoders[key] = PromptEncoder(loaded.pipe.tokenizer, loaded.pipe.text_encoder)
            # Every sampler is built on the model's own scheduler config, never on the last one set.
            self._base_configs[key] = dict(loaded.pipe.scheduler.config)
        return self._encoders[key]

    @torch.inference_mode()
    def render(self, model: ModelSpec, cells: list[Cell], embeddings: dict | None = None) -> list[Rendered]:
        """Render cells that share call parameters in one pipeline call.

        `embeddings` from `encode` (for a whole chunk) saves the encoder pass here.
        """
        first = cells[0]
        if any(c.call_key() != first.call_key() for c in cells):
            raise RenderError("a batch must share sampler, steps, guidance, size and dtype")
        timings: dict[str, float] = {}

        # 1. The resident pipeline for this model and dtype.
        loads_before = self.cache.loads
        loaded = self.cache.get(model, first.dtype)
        pipe = loaded.pipe
        timings["load"] = loaded.load_seconds if self.cache.loads > loads_before else 0.0
        encoder = self._encoder(loaded)

        # 2. The sampler, built on the model's own scheduler config; VAE tiling for large images.
        pipe.scheduler = make_scheduler(first.sampler, self._base_configs[id(pipe)])
        _size_vae(pipe, first.width * first.height, len(cells))

        # 3. Text embeddings, unless the chunk's single encoder pass already made them.
        start = time.perf_counter()
        needed = {(t, c.clip_skip) for c in cells for t in (c.prompt, c.negative_prompt)}
        if embeddings is None or not needed <= embeddings.keys():
            embeddings = self.encode(model, cells)
        positive = torch.stack([embeddings[(c.prompt, c.clip_skip)] for c in cells])
        negative = torch.stack([embeddings[(c.negative_prompt, c.clip_skip)] for c in cells])
        timings["encode"] = time.perf_counter() - start

        # 4. One CPU generator per cell: the seed fixes the noise, whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(c.seed) for c in cells]

        # 5. Denoise.
        start = time.perf_counter()
        latents = pipe(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            width=first.width,
            height=first.height,
            generator=generators,
            output_type="latent",
        ).images
        _sync(self.device)
        timings["denoise"] = time.perf_counter() - start

        # 6. Decode to pixels.
        start = time.perf_counter()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
        timings["decode"] = time.perf_counter() - start

        sampler = {"name": first.sampler, **describe(pipe.scheduler)}
        per_cell = {k: v / len(cells) for k, v in timings.items()}
        return [
            Rendered(cell, image, clip_layer_for(cell.clip_skip, encoder.layers), encoder.layers, sampler, dict(per_cell), len(cells))
            for cell, image in zip(cells, images)
        ]


LARGE_IMAGE = 1024 * 1024  # pixels above which the VAE decodes in tiles


def _size_vae(pipe, pixels: int, batch: int) -> None:
    """Tile and slice the VAE only when an image is large: it costs time on small ones."""
    large = pixels > LARGE_IMAGE
    (pipe.vae.enable_tiling if large else pipe.vae.disable_tiling)()
    (pipe.vae.enable_slicing if large or batch > 8 else pipe.vae.disable_slicing)()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
