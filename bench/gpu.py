"""SD 1.5 on a GPU: images/s of a plain diffusers call against gridrender's worker path.

Run on a CUDA machine:  python bench/gpu.py [--steps 25] [--batches 1,8,16] [--repeat 3]
Nothing is downloaded: SD 1.5's architecture (scheduler/modelconfigs/sd15) with
random weights, which run at the speed trained ones do. 512x512, fp16, CFG 7,
Euler a. In one process, at each batch size:
  (a) a fresh, untouched diffusers pipeline called the way its docs show;
  (b) gridrender's worker path (A1111 prompt encoding, per-cell generators, k-diffusion
      sampler, PNG encoding and storage into a local folder), eager;
  (c) the same path compiled (torch.compile, default mode), after a warm-up that is
      timed and reported apart.
Prints images/s, the share of the card's fp16 peak (47 TFLOP per image), ratios to
(a), and how far compiled pixels are from eager ones on the same cells.
`--tiny --device cpu` runs the same code on builtin:tiny at 64x64 (a smoke test).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def main() -> None:
    import torch

    from gridrender.scheduler.grid import make_cell
    from gridrender.scheduler.models import ModelSpec
    from gridrender.scheduler.storage import LocalStore
    from gridrender.workers.chunk import Writer, render_and_store
    from gridrender.workers.pipelines import PipelineCache, quiet_libraries
    from gridrender.workers.render import Renderer

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per batch size and path")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--device", default="cuda")
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
    plain_pipe = build(config, device, dtype)  # (a) stays untouched: nothing gridrender sets reaches it first
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

    share = (lambda rate: f"{rate * FLOP_PER_IMAGE / limit:.0%} of peak") if limit else (lambda rate: "peak n/a")
    with tempfile.TemporaryDirectory() as tmp:
        store, writer = LocalStore(tmp), Writer()
        for batch in [int(b) for b in args.batches.split(",")]:
            def plain(batch=batch):
                return plain_pipe(prompt=["a cow standing in a field"] * batch, negative_prompt=["lowres"] * batch,
                                  num_inference_steps=args.steps, guidance_scale=7.0, height=size, width=size,
                                  generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)]).images

            def worker(renderer, batch=batch):
                result = render_and_store(renderer, writer, store, model, cells(batch), batch, "bench")
                assert not result.failed, result.failed

            plain()  # warm-up: cuDNN autotuning, allocator
            a = batch / timed(plain, args.repeat, sync)
            worker(eager)
            b = batch / timed(lambda: worker(eager), args.repeat, sync)
            start = time.perf_counter()
            worker(compiled)  # compiles (or loads cached kernels) for this shape
            sync()
            warmup = time.perf_counter() - start
            c = batch / timed(lambda: worker(compiled), args.repeat, sync)
            print(f"batch {batch:>2}: (a) diffusers {a:6.2f} img/s ({share(a)}) | (b) gridrender eager {b:6.2f} "
                  f"({b / a:.2f}x a) | (c) compiled {c:6.2f} ({c / a:.2f}x a, {share(c)}; warm-up {warmup:.0f}s)")
        writer.close()
    same = cells(max(int(b) for b in args.batches.split(",")))
    diffs = [np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int))
             for x, y in zip(eager.render(model, same), compiled.render(model, same))]
    worst = max(int(d.max()) for d in diffs)
    changed = float(np.mean([(d > 0).mean() for d in diffs]))
    print(f"compiled vs eager on the same {len(same)} cells: max {worst}/255, {changed:.2%} of values differ")


if __name__ == "__main__":
    main()
