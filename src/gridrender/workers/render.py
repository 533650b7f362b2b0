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
from gridrender.scheduler.models import ModelSpec

from .components import embedding_vectors, use_loras
from .described import token_counts
from .passes import Call, Embeddings, Passes, decode, denoise, hires_text
from .pipelines import PipelineCache

log = logging.getLogger(__name__)


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
        call = Call(loaded, embeddings, pad_to if sampler.batch_invariant else None, self.device)

        # 3-4. The first passes, then each hires setting's second pass.
        start = time.perf_counter()
        passes = denoise(call, cells)
        _sync(self.device)
        timings["denoise"] = time.perf_counter() - start

        # 5. Decode to pixels, rounded the way the sampler family's reference does.
        start = time.perf_counter()
        decode_described = decode(call, passes, truncate=sampler.family == "a1111")
        timings["decode"] = time.perf_counter() - start

        rendered = _rendered(call, passes, timings, decode_described)
        if passes.failed:
            log.error(
                "%d of %d cells produced NaN/inf and fail: %s", len(passes.failed), len(cells), next(iter(passes.failed.values()))
            )
            raise CellsFailed({cells[i].id: why for i, why in sorted(passes.failed.items())}, rendered)
        return rendered


def _call_sampler(cells: list[Cell]) -> samplers.Sampler:
    """The sampler of a batch that one pipeline call can render; RenderError for any other batch."""
    first = cells[0]
    if any(c.call_key() != first.call_key() for c in cells):
        raise RenderError("a batch must share model, sampler, schedule, steps, guidance, size and dtype")
    sampler = samplers.lookup(first.sampler)
    if sampler.family != "a1111" and any(c.hires or c.init_image for c in cells):
        raise RenderError("hires fix and img2img run A1111's samplers; use an A1111 sampler name")
    return sampler


def _rendered(call: Call, passes: Passes, timings: dict[str, float], decode_described: dict[str, Any]) -> list[Rendered]:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
