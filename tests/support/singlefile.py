"""Write a diffusers SD 1.x or SDXL folder as one original-layout .safetensors checkpoint.

The inverse of diffusers' single-file loader (LDM's UNet and VAE names, SD 1.x's
`cond_stage_model.transformer.`, SDXL's `conditioner.embedders.0.transformer.` CLIP-L and
`conditioner.embedders.1.model.` OpenCLIP layout with fused in_proj and a transposed
text_projection), for any UNet of the folder's config: enough to test
`from_single_file` on a file we made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SD1_UNET = {
    "block_out_channels": [1, 1, 1, 1],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}


def _unet_map(config: dict | None = None) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) of every UNet block, from the UNet's config (LDM's openaimodel layout)."""
    config = config or SD1_UNET
    blocks, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL's pooled + size conditioning
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
    ]
    for i in range(blocks):
        down_attn = config["down_block_types"][i].startswith("CrossAttn")
        up_attn = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per):
            pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                pairs.append((f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(per + 1) * i + per}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
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


def convert_unet(state: dict, config: dict | None = None) -> dict:
    out = {}
    pairs = sorted(_unet_map(config), key=lambda p: -len(p[1]))  # longest prefix first
    for key, value in state.items():
        new = key
        if "resnets" in new:
            for sd, hf in _RESNET:
                new = new.replace(hf, sd)
        for sd, hf in pairs:
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
                out["first_stage_model." + new] = value.reshape(*value.shape, 1, 1)
                continue
        out["first_stage_model." + new] = value
    return out


def convert_text_encoder(state: dict, prefix: str = "cond_stage_model.transformer.text_model.") -> dict:
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items()}


def convert_open_clip(state: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """A CLIPTextModelWithProjection as OpenCLIP (and so SDXL's checkpoints) lay it out."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T,
    }
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for i in sorted(layers):
        hf, ldm = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{ldm}attn.in_proj_{kind}"] = torch.cat([state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[f"{ldm}attn.out_proj.{kind}"] = state[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{ldm}ln_1.{kind}"] = state[f"{hf}layer_norm1.{kind}"]
            out[f"{ldm}ln_2.{kind}"] = state[f"{hf}layer_norm2.{kind}"]
            out[f"{ldm}mlp.c_fc.{kind}"] = state[f"{hf}mlp.fc1.{kind}"]
            out[f"{ldm}mlp.c_proj.{kind}"] = state[f"{hf}mlp.fc2.{kind}"]
    return out


def write_single_file_vae(vae_folder: Path, target: Path) -> Path:
    """A standalone VAE in the original (LDM) layout, as VAE files for A1111 are shared."""
    state = convert_vae(load_file(Path(vae_folder) / "diffusion_pytorch_model.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}, str(target))
    return target


def write_single_file(folder: Path, target: Path, extra: dict | None = None) -> Path:
    """The folder's weights in one file; `extra` adds tensors (NoobAI's `v_pred` / `ztsnr` markers)."""
    folder = Path(folder)
    state = {}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    state.update(convert_unet(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_config))
    state.update(convert_vae(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")))
    if (folder / "text_encoder_2").is_dir():  # SDXL
        state.update(
            convert_text_encoder(
                load_file(folder / "text_encoder" / "model.safetensors"), "conditioner.embedders.0.transformer.text_model."
            )
        )
        state.update(convert_open_clip(load_file(folder / "text_encoder_2" / "model.safetensors")))
    else:
        state.update(convert_text_encoder(load_file(folder / "text_encoder" / "model.safetensors")))
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


if __name__ == "__main__":  # pragma: no cover
    import sys

    write_single_file(Path(sys.argv[1]), Path(sys.argv[2]))
    torch.manual_seed(0)
