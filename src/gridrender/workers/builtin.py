"""`builtin:*` models: real StableDiffusion(XL)Pipelines with seeded random weights.

`builtin:tiny` is an SD 1.x pipeline; `builtin:tiny-sdxl` an SDXL one (two text
encoders of different widths and depths, a UNet with SDXL's size conditioning).

They exist so tests, demos and benchmarks run anywhere without downloading weights.
Weights come from NumPy's PCG64 (stable across versions and machines), not from
torch's initialisers, so `builtin:tiny` has the same bytes everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def build(name: str, seed: int = SEED) -> Any:
    """The pipeline of `builtin:<name>`; another `seed` gives other weights of the same shapes."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = config_dir(name)
    rng = np.random.Generator(np.random.PCG64(seed))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src / "vae"))
    encoder = CLIPTextModel(CLIPTextConfig.from_json_file(src / "text_encoder" / "config.json"))
    for module in (unet, vae, encoder):
        _fill(module, rng)
    tokenizer = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77)
    scheduler_config = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    if (src / "text_encoder_2").is_dir():
        encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(src / "text_encoder_2" / "config.json"))
        _fill(encoder_2, rng)
        tokenizer_2 = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=77, pad_token="!")
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoder,
            text_encoder_2=encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
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
        if param.ndim > 1:  # a matrix or a conv kernel
            fan_in = int(np.prod(param.shape[1:]))
            bound = (1.0 / fan_in) ** 0.5 if "embedding" not in name else 0.02
            values = rng.uniform(-bound, bound, size=tuple(param.shape))
        elif name.endswith("weight"):
            values = np.ones(tuple(param.shape))
        else:
            values = rng.uniform(-0.01, 0.01, size=tuple(param.shape))
        param.copy_(torch.from_numpy(values.astype(np.float32)))
