"""kohya's LoRA key names to A1111's layer names, as A1111 converts them (without torch).

A1111 reference: extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis and
the fallbacks of load_network (fused OpenCLIP q/k/v, SGM-named SDXL keys, compvis-named
SD 1.x text keys). The result is looked up in the model's layer table (`layers.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .layers import Layer, LayerTable

_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")  # networks.py re_x_proj
_DIGITS = re.compile(r"\d+")
_RESNET_SUFFIX = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_layer(base: str, table: LayerTable, is_sd2: bool = False) -> tuple[str, Layer | None]:
    """The layer a key's layer part names, and the name A1111 uses for it (networks.py load_network)."""
    names = table.by_name
    key = convert_diffusers_name_to_compvis(base, is_sd2)
    layer = names.get(key)
    if layer is None and (match := _X_PROJ.match(key)):
        fused = names.get(match.group(1))  # OpenCLIP's MultiheadAttention: its q/k/v share in_proj_weight
        if fused is not None and fused.kind == "attention":
            layer = table.by_path.get((fused.component, f"{fused.path}.{match.group(2)}"))
    if layer is None and "lora_unet" in base:  # SGM-named SDXL keys: lora_unet_input_blocks_…
        key = base.replace("lora_unet", "diffusion_model")
        layer = names.get(key)
    elif layer is None and "lora_te1_text_model" in base:
        key = base.replace("lora_te1_text_model", "0_transformer_text_model")
        layer = names.get(key)
        if layer is None:  # "some SD1 Loras also have correct compvis keys"
            key = base.replace("lora_te1_text_model", "transformer_text_model")
            layer = names.get(key)
    return key, layer


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
    """networks.py's function of that name: kohya's diffusers-style names to A1111's layer names.

    Kept literal, quirks included (it numbers blocks for two resnets per block, and maps
    an SDXL up_blocks.0 upsampler to a name SDXL does not have), so that what matches
    is what A1111 matches: its patterns, tried in its order.
    """
    for pattern, convert in _DIFFUSERS_TO_COMPVIS:
        match = pattern.match(key)
        if match:
            return convert([int(x) if _DIGITS.match(x) else x for x in match.groups()], is_sd2)
    return key


_Groups = list[int | str]


def _sd1_or_sd2_text(m: _Groups, is_sd2: bool) -> str:
    rest = str(m[1])
    if not is_sd2:
        return f"transformer_text_model_encoder_layers_{m[0]}_{rest}"
    if "mlp_fc1" in rest:
        return f"model_transformer_resblocks_{m[0]}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"model_transformer_resblocks_{m[0]}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"model_transformer_resblocks_{m[0]}_{rest.replace('self_attn', 'attn')}"


def _sdxl_open_clip(m: _Groups, _is_sd2: bool) -> str:
    rest = str(m[1])
    if "mlp_fc1" in rest:
        return f"1_model_transformer_resblocks_{m[0]}_{rest.replace('mlp_fc1', 'mlp_c_fc')}"
    if "mlp_fc2" in rest:
        return f"1_model_transformer_resblocks_{m[0]}_{rest.replace('mlp_fc2', 'mlp_c_proj')}"
    return f"1_model_transformer_resblocks_{m[0]}_{rest.replace('self_attn', 'attn')}"


_DIFFUSERS_TO_COMPVIS: tuple[tuple[re.Pattern[str], Callable[[_Groups, bool], str]], ...] = (
    (re.compile(r"lora_unet_conv_in(.*)"), lambda m, _: f"diffusion_model_input_blocks_0_0{m[0]}"),
    (re.compile(r"lora_unet_conv_out(.*)"), lambda m, _: f"diffusion_model_out_2{m[0]}"),
    (
        re.compile(r"lora_unet_time_embedding_linear_(\d+)(.*)"),
        lambda m, _: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}",
    ),
    (
        re.compile(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: (
            f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_"
            f"{_suffix(m[1], m[3])}"
        ),
    ),
    (
        re.compile(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{_suffix(m[0], m[2])}",
    ),
    (
        re.compile(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
        lambda m, _: (
            f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{_suffix(m[1], m[3])}"
        ),
    ),
    (
        re.compile(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"),
        lambda m, _: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op",
    ),
    (
        re.compile(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"),
        lambda m, _: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv",
    ),
    (re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"), _sd1_or_sd2_text),
    (re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"), _sdxl_open_clip),
)


def _suffix(block: int | str, rest: int | str) -> str:
    return _RESNET_SUFFIX.get(str(rest), str(rest)) if block == "resnets" else str(rest)
