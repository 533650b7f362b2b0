"""SD 1.5 and SDXL on a GPU: images/s of a plain diffusers call against gridrender's worker path.

Run on a CUDA machine:  python bench/gpu.py [--models sd15,sdxl] [--steps 25] [--repeat 1] [--paths abc]
Nothing is downloaded: SD 1.5's and SDXL's architectures (src/gridrender/scheduler/modelconfigs/
sd15, sdxl) with random weights, which run at the speed trained ones do. fp16, CFG 7,
Euler a; SD 1.5 at 512x512 (batches 1, 8, 16), SDXL at 1024x1024 (batches 1, 4). In one
process, for each model and batch size:
  (a) a fresh, untouched diffusers pipeline called the way its docs show;
  (b) gridrender's worker path (A1111 prompt encoding, per-cell noise, k-diffusion
      sampler, PNG encoding and storage into a local folder), eager;
  (c) the same path compiled (torch.compile, default mode), after a warm-up that is
      timed and reported apart.
Each timed call renders one chunk (SD 1.5: 32 cells, SDXL: 8; `--chunk` overrides) in
batches of the given size, so a worker's fixed cost per chunk (presence checks, prompt
encoding, waiting for the last PNGs) counts as often as it does in a real job; (a)
renders as many images. Every line is printed as soon as its batch size ends (a run cut
short still reports): images/s, the share of the card's fp16 peak, ratios to (a), each
path's first-call seconds and peak GPU memory, and, after a model's first batch size,
how far compiled pixels are from eager ones on the same cells.
`--paths c` times the compiled path alone: run in a second process with the same
GRIDRENDER_CACHE_DIR, its warm-up is a restarted worker's (kernels from the cache).
`--tiny --device cpu` runs the same code on builtin:tiny / tiny-sdxl at 64x64 (a smoke test).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

NAMES = {"a": "diffusers", "b": "gridrender eager", "c": "gridrender compiled"}
PEAK_FP16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


@dataclass(frozen=True)
class Setup:
    """One model's benchmark: its architecture, image size, batch sizes and chunk."""

    config: str
    size: int
    batches: str
    chunk: int
    flop_per_image: float  # 25 steps with CFG, for the share of the card's peak


SETUPS = {
    "sd15": Setup("sd15", 512, "1,8,16", 32, 47e12),
    "sdxl": Setup("sdxl", 1024, "1,4", 8, 400e12),
}
TINY = {"sd15": "tiny", "sdxl": "tiny-sdxl"}


def peak(name: str) -> float | None:
    return next((v for k, v in PEAK_FP16.items() if k in name), None)


def build(config: str, device: Any, dtype: Any) -> Any:
    """An untouched StableDiffusion(XL)Pipeline of the shipped architecture, random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from gridrender.scheduler.models import config_dir

    src, vocab = config_dir(config), config_dir("clip")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
        encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
        encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(src / "text_encoder_2" / "config.json"))
            if (src / "text_encoder_2").is_dir()
            else None
        )
    scheduler = EulerAncestralDiscreteScheduler.from_config(EulerAncestralDiscreteScheduler.load_config(src / "scheduler"))
    files = {"vocab_file": str(vocab / "vocab.json"), "merges_file": str(vocab / "merges.txt"), "model_max_length": 77}
    tokenizer = CLIPTokenizer(**files)
    if encoder_2 is not None:
        pipe: Any = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoder,
            text_encoder_2=encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer(**files, pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(fn: Callable[[], None], repeat: int, sync: Callable[[], None]) -> float:
    """Seconds per call over `repeat` calls, after the caller's warm-up."""
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def pixel_gap(eager: list[Any], compiled: list[Any]) -> None:
    """How far compiled images are from eager ones of the same cells (same batch shape)."""
    diffs = [
        np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)) for x, y in zip(eager, compiled, strict=True)
    ]
    worst = max(int(d.max()) for d in diffs)
    changed = float(np.mean([(d > 0).mean() for d in diffs]))
    print(f"  compiled vs eager on the same {len(diffs)} cells: max {worst}/255, {changed:.2%} of values differ", flush=True)


class Memory:
    """Peak GPU memory of what runs inside, in GiB (nothing on a CPU)."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak = cuda, 0.0

    def __enter__(self) -> Memory:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *_: object) -> None:
        if self.cuda:
            import torch

            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**30)


@dataclass
class _Run:
    """What the timed batch sizes of one model share: its pipelines, renderers, store and measures."""

    args: argparse.Namespace
    cuda: bool
    size: int
    chunk: int  # cells per timed call, at least (a worker's chunk)
    model: Any
    plain_pipe: Any  # (a): diffusers' own pipeline, untouched
    eager: Any  # (b) and (c): gridrender's renderers
    compiled: Any
    writer: Any
    store: Any
    cells: Callable[[int], list[Any]]
    sync: Callable[[], None]
    share: Callable[[float], str]  # an images-per-second rate as a share of the card's peak
    measured_pixels: bool = False


def bench_model(key: str, args: argparse.Namespace, device: Any, cuda: bool, name: str) -> None:
    import torch

    from gridrender.scheduler import families
    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.models import ModelSpec
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import Writer
    from gridrender.workers.pipelines import PipelineCache
    from gridrender.workers.render import Renderer

    setup = SETUPS[key]
    config, size = (TINY[key], 64) if args.tiny else (setup.config, setup.size)
    dtype, dtype_name = (torch.float16, "float16") if cuda else (torch.float32, "float32")
    limit = None if args.tiny else peak(name)
    print(
        f"== {config} architecture (random weights), {size}x{size}, {args.steps} steps, {dtype_name}, CFG 7, Euler a", flush=True
    )
    # (a)'s modules stay untouched. cuDNN autotuning, which gridrender turns on, is a
    # process-wide flag: it speeds (a) up too, a stricter baseline.
    plain_pipe = build(config, device, dtype) if "a" in args.paths else None
    ours_pipe = build(config, device, dtype)
    xl = hasattr(ours_pipe, "text_encoder_2")
    layers = ours_pipe.text_encoder.config.num_hidden_layers
    model = ModelSpec(
        f"{config}-random",
        "builtin",
        f"{config}-random",
        "bench",
        None,
        layers,
        family=families.SDXL if xl else families.SD1,
        clip_layers_2=ours_pipe.text_encoder_2.config.num_hidden_layers if xl else None,
    )
    eager = Renderer(PipelineCache(device, compile_mode="eager"))
    eager.cache.put(model, dtype_name, ours_pipe)
    compiled = Renderer(PipelineCache(device, compile_mode=args.compile_mode))
    compiled.cache.put(model, dtype_name, ours_pipe)  # the same weights, compiled forward
    seeds = iter(range(10**9))

    def cells(batch: int) -> list[Any]:
        return [
            make_cell(
                model,
                prompt="a cow standing in a field",
                negative_prompt="lowres",
                clip_skip=1 + i % 2,
                seed=next(seeds),
                sampler="Euler a",
                steps=args.steps,
                guidance=7.0,
                width=size,
                height=size,
                dtype=dtype_name,
            )
            for i in range(batch)
        ]

    def share(rate: float) -> str:
        return f"{rate * setup.flop_per_image / limit:.0%} of peak" if limit else "peak n/a"

    batches = args.batches.get(key, setup.batches)
    with tempfile.TemporaryDirectory() as tmp:
        run = _Run(
            args,
            cuda,
            size,
            args.chunk or setup.chunk,
            model,
            plain_pipe,
            eager,
            compiled,
            Writer(),
            LocalStore(tmp),
            cells,
            torch.cuda.synchronize if cuda else (lambda: None),
            share,
        )
        for batch in [int(b) for b in batches.split(",")]:
            _bench_batch(run, batch)
        run.writer.close()


def _bench_batch(run: _Run, batch: int) -> None:
    """Each timed call renders one chunk, as a worker receives it, in batches of `batch`;
    (a) renders as many images in as many pipeline calls."""
    import torch

    from gridrender.workers.chunk import ChunkJob, render_and_store
    from gridrender.workers.compiled import cache_stats

    args = run.args
    per_call = -(-max(run.chunk, batch) // batch) * batch

    def plain(batch: int = batch, per_call: int = per_call) -> None:
        for _ in range(per_call // batch):
            run.plain_pipe(
                prompt=["a cow standing in a field"] * batch,
                negative_prompt=["lowres"] * batch,
                num_inference_steps=args.steps,
                guidance_scale=7.0,
                height=run.size,
                width=run.size,
                generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)],
            )

    def worker(renderer: Any, batch: int = batch, per_call: int = per_call) -> None:
        result = render_and_store(renderer, run.writer, run.store, ChunkJob("bench", run.model, run.cells(per_call), batch))
        assert not result.failed, result.failed

    rates: dict[str, float] = {}
    first: dict[str, float] = {}
    memory = {k: Memory(run.cuda) for k in "abc"}
    for path, call in (("a", plain), ("b", lambda **kw: worker(run.eager, **kw)), ("c", lambda **kw: worker(run.compiled, **kw))):
        if path not in args.paths:
            continue
        with memory[path]:
            start = time.perf_counter()
            call(per_call=batch)  # first call: cuDNN autotuning, allocator; (c) compiles or loads kernels
            run.sync()
            first[path] = time.perf_counter() - start
            rates[path] = per_call / timed(call, args.repeat, run.sync)
    base = rates.get("a")
    print(f"batch {batch:>2}, {per_call} cells per call:", flush=True)
    for k, v in rates.items():
        ratio = f", {v / base:.2f}x (a)" if base and k != "a" else ""
        print(
            f"  ({k}) {NAMES[k]:<20} {v:7.2f} img/s ({run.share(v)}{ratio}); first call {first[k]:.1f}s; "
            f"peak {memory[k].peak:.1f} GiB",
            flush=True,
        )
    if "c" in rates:
        print(f"  inductor cache {cache_stats()}", flush=True)
    if "b" in rates and "c" in rates and not run.measured_pixels:
        # Right after the first shape's timings, so a run cut short still reports it.
        same = run.cells(batch)
        pixel_gap(run.eager.render(run.model, same), run.compiled.render(run.model, same))
        run.measured_pixels = True


def main() -> None:
    import diffusers
    import torch

    from gridrender.workers.pipelines import quiet_libraries

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", default="", help="per model, e.g. 'sd15=8,1;sdxl=4' (default: 1,8,16 and 1,4)")
    parser.add_argument("--repeat", type=int, default=1, help="timed calls per batch size and path")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--paths", default="abc", help="which of (a), (b), (c) to time")
    parser.add_argument("--chunk", type=int, default=None, help="cells per timed call (default: 32 SD 1.5, 8 SDXL)")
    parser.add_argument("--tiny", action="store_true", help="the builtin tiny architectures at 64x64 (a smoke test)")
    args = parser.parse_args()
    args.batches = dict(part.split("=", 1) for part in args.batches.split(";") if part)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (or --device cpu --tiny)")
    quiet_libraries()
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}", flush=True)
    for key in args.models.split(","):
        bench_model(key, args, device, cuda, name)
        gc.collect()  # the model's pipelines went with bench_model's frame; free their memory before the next
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
