"""Write a diffusers SD 1.x folder as one original-layout .safetensors checkpoint.

The inverse of diffusers' single-file loader, for SD 1.x's block structure (4 UNet
and VAE blocks of 2 layers): enough to test `from_single_file` on a file we made.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _unet_map() -> list[tuple[str, str]]:
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ]
    for i in range(4):
        for j in range(2):
            pairs.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < 3:
                pairs.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            pairs.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            pairs.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def convert_unet(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        if "resnets" in new:
            for sd, hf in _RESNET:
                new = new.replace(hf, sd)
        for sd, hf in _unet_map():
            if new.startswith(hf):
                new = sd + new[len(hf) :]
                break
        out["model.diffusion_model." + new] = value
    return out


def _vae_map() -> list[tuple[str, str]]:
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            pairs.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        pairs.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    return pairs


_VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]


def convert_vae(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in _vae_map():
            new = new.replace(hf, sd)
        if "attn_1" in new:
            for sd, hf in _VAE_ATTN:
                new = new.replace(hf, sd)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + new] = value
    return out


def convert_text_encoder(state: dict) -> dict:
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def write_single_file_vae(vae_folder: Path, target: Path) -> Path:
    """A standalone VAE in the original (LDM) layout, as VAE files for A1111 are shared."""
    state = convert_vae(load_file(Path(vae_folder) / "diffusion_pytorch_model.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}, str(target))
    return target


def write_single_file(folder: Path, target: Path) -> Path:
    folder = Path(folder)
    state = {}
    state.update(convert_unet(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")))
    state.update(convert_vae(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")))
    state.update(convert_text_encoder(load_file(folder / "text_encoder" / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


if __name__ == "__main__":  # pragma: no cover
    import sys

    write_single_file(Path(sys.argv[1]), Path(sys.argv[2]))
    torch.manual_seed(0)
