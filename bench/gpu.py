"""SD 1.5 on a GPU: images/s and share of the card's FLOP limit, diffusers vs gridrender.

Run by hand on a CUDA machine:  python bench/gpu.py [--steps 25] [--batches 1,4,8]
Nothing is downloaded: the pipeline is SD 1.5's architecture (configs shipped in
scheduler/modelconfigs/sd15) with random weights, which run at the same speed as
trained ones. 512x512, fp16, CFG on. (a) a plain diffusers call per batch, images
kept as PIL; (b) gridrender's worker path (own prompt encoding, per-cell
generators, background PNG encoding and storage into a local folder).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FLOP_PER_IMAGE = 47e12  # SD 1.5, 512x512, 25 steps with CFG (the figure issue 4 works with)
PEAK_FP16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def peak(name: str) -> float | None:
    return next((v for k, v in PEAK_FP16.items() if k in name), None)


def build(device, dtype):
    import torch
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gridrender.scheduler.models import config_dir
    from gridrender.workers.builtin import tokenizer_vocab

    src = config_dir("sd15")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
        encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
    scheduler = EulerAncestralDiscreteScheduler.from_config(EulerAncestralDiscreteScheduler.load_config(src / "scheduler"))
    tokenizer = CLIPTokenizer(vocab=tokenizer_vocab(), merges=[], model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


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
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per batch size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    quiet_libraries()
    device, name = torch.device("cuda"), torch.cuda.get_device_name(0)
    pipe = build(device, torch.float16)
    pipe.set_progress_bar_config(disable=True)
    model = ModelSpec("sd15-random", "builtin", "sd15-random", "bench", None, 12)
    cache = PipelineCache(device)
    cache.put(model, "float16", pipe)
    renderer = Renderer(cache)
    print(f"{name}, torch {torch.__version__}, SD 1.5 architecture (random weights), 512x512, {args.steps} steps, fp16")
    limit = peak(name)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = ["a cow standing in a field"] * batch

        def plain():
            pipe(prompt=prompts, negative_prompt=["lowres"] * batch, num_inference_steps=args.steps,
                 generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)]).images

        plain()  # warm up (cuDNN autotuning, allocator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeat):
            plain()
        torch.cuda.synchronize()
        a = batch * args.repeat / (time.perf_counter() - start)

        with tempfile.TemporaryDirectory() as tmp:
            store, writer = LocalStore(tmp), Writer()
            seed = iter(range(10**6))

            def ours():
                cells = [make_cell(model, prompt=prompts[0], negative_prompt="lowres", clip_skip=1 + i % 2, seed=next(seed),
                                   sampler="Euler a", steps=args.steps, guidance=7.0, width=512, height=512, dtype="float16")
                         for i in range(batch)]
                result = render_and_store(renderer, writer, store, model, cells, batch, "bench")
                assert not result.failed, result.failed

            ours()
            start = time.perf_counter()
            for _ in range(args.repeat):
                ours()
            torch.cuda.synchronize()
            b = batch * args.repeat / (time.perf_counter() - start)
            writer.close()
        share = lambda rate: f"{rate * FLOP_PER_IMAGE / limit:.0%} of peak" if limit else "peak unknown"
        print(f"batch {batch}: diffusers {a:.2f} img/s ({share(a)}), gridrender {b:.2f} img/s ({share(b)}), ratio {b / a:.3f}")


if __name__ == "__main__":
    main()
