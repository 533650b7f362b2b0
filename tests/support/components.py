"""Tiny components for tests, built from builtin:tiny's architecture: a LoRA, a VAE, an embedding, a model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def _pipe(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def write_lora(path: Path, model_folder: Path, seed: int, rank: int = 4, kohya: bool = False, strength: float = 0.3) -> Path:
    """A LoRA on the UNet's attention and the text encoder's self-attention, random but strong."""
    pipe = _pipe(model_folder)
    rng = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for component, module, targets in (("unet", pipe.unet, UNET_TARGETS), ("text_encoder", pipe.text_encoder, TEXT_TARGETS)):
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.endswith(targets):
                down = torch.randn(rank, layer.in_features, generator=rng) * strength
                up = torch.randn(layer.out_features, rank, generator=rng) * strength
                if kohya:
                    prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
                    key = prefix + name.replace(".", "_")
                    state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
                    state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
                else:
                    state[f"{component}.{name}.lora_A.weight"], state[f"{component}.{name}.lora_B.weight"] = down, up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def write_vae(folder: Path, model_folder: Path, seed: int) -> Path:
    """Another AutoencoderKL of the model's shape, with its own weights, as a diffusers folder."""
    from diffusers import AutoencoderKL

    from gridrender.workers import builtin

    vae = AutoencoderKL.from_pretrained(model_folder, subfolder="vae")
    builtin._fill(vae, np.random.Generator(np.random.PCG64(seed)))
    vae.save_pretrained(folder)
    return folder


def write_embedding(path: Path, width: int, vectors: int, seed: int) -> Path:
    """A textual-inversion embedding in A1111's safetensors form ({"emb_params": (n, width)})."""
    rng = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(vectors, width, generator=rng) * 0.5}, str(path))
    return path


def write_model(folder: Path, model_folder: Path, seed: int) -> Path:
    """A second model: the tiny folder with its UNet perturbed (the same architecture, other weights)."""
    shutil.copytree(model_folder, folder, ignore=shutil.ignore_patterns(".complete"))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    rng = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=rng) for k, v in state.items()}, str(weights))
    return folder
