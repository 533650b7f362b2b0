"""SD 1.5 on a GPU: images/s of a plain diffusers call against gridrender's worker path.

Run on a CUDA machine:  python bench/gpu.py [--steps 25] [--batches 8,1,16] [--repeat 3] [--paths abc]
Nothing is downloaded: SD 1.5's architecture (src/gridrender/scheduler/modelconfigs/sd15) with
random weights, which run at the speed trained ones do. 512x512, fp16, CFG 7,
Euler a. In one process, at each batch size:
  (a) a fresh, untouched diffusers pipeline called the way its docs show;
  (b) gridrender's worker path (A1111 prompt encoding, per-cell generators, k-diffusion
      sampler, PNG encoding and storage into a local folder), eager;
  (c) the same path compiled (torch.compile, default mode), after a warm-up that is
      timed and reported apart.
Each timed call renders one chunk as `submit` cuts it (32 cells by default, `--chunk`),
in batches of the given size: a worker's fixed cost per chunk (presence checks, prompt
encoding, waiting for the last PNGs) counts as often as it does in a real job.
Prints images/s, the share of the card's fp16 peak (47 TFLOP per image), ratios to
(a), and, after the first batch size, how far compiled pixels are from eager ones on
the same cells.
`--paths c` times the compiled path alone: run in a second process with the same
GRIDRENDER_CACHE_DIR, its warm-up is a restarted worker's (kernels from the cache).
`--tiny --device cpu` runs the same code on builtin:tiny at 64x64 (a smoke test).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

NAMES = {"a": "diffusers", "b": "gridrender eager", "c": "gridrender compiled"}
FLOP_PER_IMAGE = 47e12  # SD 1.5, 512x512, 25 steps with CFG
PEAK_FP16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def peak(name: str) -> float | None:
    return next((v for k, v in PEAK_FP16.items() if k in name), None)


def build(config: str, device, dtype):
    """An untouched StableDiffusionPipeline of the shipped architecture, random weights."""
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gridrender.scheduler.models import config_dir
    from gridrender.scheduler.tokens import byte_vocab

    src = config_dir(config)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
        encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
    scheduler = EulerAncestralDiscreteScheduler.from_config(EulerAncestralDiscreteScheduler.load_config(src / "scheduler"))
    tokenizer = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def timed(fn, repeat: int, sync) -> float:
    """Seconds per call over `repeat` calls, after the caller's warm-up."""
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def pixel_gap(eager: list, compiled: list) -> None:
    """How far compiled images are from eager ones of the same cells (same batch shape)."""
    diffs = [np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)) for x, y in zip(eager, compiled)]
    worst = max(int(d.max()) for d in diffs)
    changed = float(np.mean([(d > 0).mean() for d in diffs]))
    print(f"compiled vs eager on the same {len(diffs)} cells: max {worst}/255, {changed:.2%} of values differ", flush=True)


def main() -> None:
    import torch

    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.models import ModelSpec
    from gridrender.scheduler.settings import Settings
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import Writer, render_and_store
    from gridrender.workers.compiled import cache_stats
    from gridrender.workers.pipelines import PipelineCache, quiet_libraries
    from gridrender.workers.render import Renderer

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", default="8,1,16")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per batch size and path")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--paths", default="abc", help="which of (a), (b), (c) to time")
    parser.add_argument("--chunk", type=int, default=None,
                        help="cells per timed call (default: a chunk as `submit` cuts it, GRIDRENDER_CHUNK_CELLS)")
    parser.add_argument("--tiny", action="store_true", help="builtin:tiny's architecture at 64x64 (a smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (or --device cpu --tiny)")
    quiet_libraries()
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    dtype, dtype_name = (torch.float16, "float16") if cuda else (torch.float32, "float32")
    config, size = ("tiny", 64) if args.tiny else ("sd15", 512)
    limit = peak(name) if not args.tiny else None
    import diffusers

    print(f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}, {config} architecture "
          f"(random weights), {size}x{size}, {args.steps} steps, {dtype_name}, CFG 7, Euler a")
    # (a)'s modules stay untouched. cuDNN autotuning, which gridrender turns on, is a
    # process-wide flag: it speeds (a) up too, a stricter baseline.
    plain_pipe = build(config, device, dtype) if "a" in args.paths else None
    ours_pipe = build(config, device, dtype)
    model = ModelSpec(f"{config}-random", "builtin", f"{config}-random", "bench", None, 12)
    eager = Renderer(PipelineCache(device, compile_mode="eager"))
    eager.cache.put(model, dtype_name, ours_pipe)
    compiled = Renderer(PipelineCache(device, compile_mode=args.compile_mode))
    compiled.cache.put(model, dtype_name, ours_pipe)  # the same weights, compiled forward
    seeds = iter(range(10**9))

    def cells(batch: int):
        return [make_cell(model, prompt="a cow standing in a field", negative_prompt="lowres", clip_skip=1 + i % 2,
                          seed=next(seeds), sampler="Euler a", steps=args.steps, guidance=7.0, width=size, height=size,
                          dtype=dtype_name) for i in range(batch)]

    measured_pixels = False
    share = (lambda rate: f"{rate * FLOP_PER_IMAGE / limit:.0%} of peak") if limit else (lambda rate: "peak n/a")
    with tempfile.TemporaryDirectory() as tmp:
        store, writer = LocalStore(tmp), Writer()
        for batch in [int(b) for b in args.batches.split(",")]:
            # Each timed call renders one chunk, as a worker receives it, in batches of `batch`;
            # (a) renders as many images in as many pipeline calls.
            per_call = -(-max(args.chunk or Settings().chunk_cells, batch) // batch) * batch

            def plain(batch=batch, per_call=per_call):
                for _ in range(per_call // batch):
                    plain_pipe(prompt=["a cow standing in a field"] * batch, negative_prompt=["lowres"] * batch,
                               num_inference_steps=args.steps, guidance_scale=7.0, height=size, width=size,
                               generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)])

            def worker(renderer, batch=batch, per_call=per_call):
                result = render_and_store(renderer, writer, store, model, cells(per_call), batch, "bench")
                assert not result.failed, result.failed

            rates = {}
            if "a" in args.paths:
                plain(per_call=batch)  # warm-up: cuDNN autotuning, allocator
                rates["a"] = per_call / timed(plain, args.repeat, sync)
            if "b" in args.paths:
                worker(eager, per_call=batch)
                rates["b"] = per_call / timed(lambda: worker(eager), args.repeat, sync)
            warmup = 0.0
            if "c" in args.paths:
                start = time.perf_counter()
                worker(compiled, per_call=batch)  # one batch: compiles (or loads cached kernels) for this shape
                sync()
                warmup = time.perf_counter() - start
                rates["c"] = per_call / timed(lambda: worker(compiled), args.repeat, sync)
            base = rates.get("a")
            parts = [f"({k}) {NAMES[k]} {v:6.2f} img/s ({share(v)}" + (f", {v / base:.2f}x a)" if base and k != "a" else ")")
                     for k, v in rates.items()]
            if "c" in rates:
                parts.append(f"compile warm-up {warmup:.1f}s, inductor cache {cache_stats()}")
            print(f"batch {batch:>2}, {per_call} cells per call: " + " | ".join(parts), flush=True)
            if "b" in rates and "c" in rates and not measured_pixels:
                # Right after the first shape's timings, so a run cut short still reports it.
                same = cells(batch)
                pixel_gap(eager.render(model, same), compiled.render(model, same))
                measured_pixels = True
        writer.close()


if __name__ == "__main__":
    main()
