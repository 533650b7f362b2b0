"""`builtin:*` models: real StableDiffusionPipelines with seeded random weights.

They exist so tests, demos and benchmarks run anywhere without downloading weights.
Weights come from NumPy's PCG64 (stable across versions and machines), not from
torch's initialisers, so `builtin:tiny` has the same bytes everywhere.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gridrender.scheduler.models import BUILTINS, config_dir
from gridrender.scheduler.tokens import byte_vocab

SEED = 20260101


def materialize(name: str, folder: Path) -> Path:
    """Write `builtin:<name>` as a diffusers folder (configs, tokenizer, weights)."""
    if name not in BUILTINS:
        raise KeyError(name)
    if (folder / "model_index.json").is_file() and (folder / ".complete").is_file():
        return folder
    pipe = build(name)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / ".complete").write_text(BUILTINS[name])
    return folder


def build(name: str):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.schedulers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    src = config_dir(name)
    rng = np.random.Generator(np.random.PCG64(SEED))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
    encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
    for module in (unet, vae, encoder):
        _fill(module, rng)
    tokenizer = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(src / "scheduler"))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def _fill(module: torch.nn.Module, rng: np.random.Generator) -> None:
    """Fan-in scaled uniform weights, zero biases, unit norms: finite, varied images."""
    for name, param in sorted(module.named_parameters()):
        if param.ndim >= 2:
            fan_in = int(np.prod(param.shape[1:]))
            bound = (1.0 / fan_in) ** 0.5 if "embedding" not in name else 0.02
            values = rng.uniform(-bound, bound, size=tuple(param.shape))
        elif name.endswith("weight"):
            values = np.ones(tuple(param.shape))
        else:
            values = rng.uniform(-0.01, 0.01, size=tuple(param.shape))
        param.copy_(torch.from_numpy(values.astype(np.float32)))
