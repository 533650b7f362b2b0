"""A model's layers as A1111 names them, and LoRA keys matched to them, checked against upstream.

The truth for which LDM/SGM module is which diffusers module is diffusers' own
single-file converter (loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
convert_open_clip_checkpoint), which turns original checkpoints into diffusers ones:
a checkpoint is made whose every tensor names the table's LDM path, and the converter
must put it at the table's diffusers path. The truth for key names is kohya's: on SD 1.x
a `lora_unet_` key is the diffusers module path with "_" for "." (networks/lora.py), on
SDXL the SGM path; A1111's networks.py convert_diffusers_name_to_compvis and its
fallbacks decide which of them match (quirks included: conv_norm_out, SDXL's
add_embedding and up_blocks.0 upsampler have no A1111 name under their diffusers keys).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from gridrender.scheduler.layers import TEXT, TEXT_2, UNET, LayerTable, layer_table
from gridrender.scheduler.lorafiles import fit_lora
from gridrender.scheduler.loranames import a1111_layer

MODULES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)


def clip_config(layers: int = 2, width: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=514,
        bos_token_id=0,
        eos_token_id=1,
        projection_dim=width,
    )


@pytest.fixture(scope="module")
def sd1() -> tuple[Any, Any, LayerTable]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        sample_size=8,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text = CLIPTextModel(clip_config())
    return unet, text, layer_table(dict(unet.config), [text.config.to_dict()])


@pytest.fixture(scope="module")
def xl() -> tuple[Any, tuple[Any, Any], LayerTable]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        sample_size=8,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        cross_attention_dim=64,
    )
    clip_l, big_g = CLIPTextModel(clip_config(3)), CLIPTextModelWithProjection(clip_config(2))
    table = layer_table(dict(unet.config), [clip_l.config.to_dict(), big_g.config.to_dict()])
    return unet, (clip_l, big_g), table


def text_of(model: Any) -> torch.nn.Module:
    return getattr(model, "text_model", model)  # transformers >= 5 has no .text_model wrapper


def check_modules(root: torch.nn.Module, table: LayerTable, component: str) -> None:
    """Every module A1111 patches is in the table, with its weight's shape and whether it has a bias."""
    layers = {path: layer for (c, path), layer in table.by_path.items() if c == component and layer.kind != "attention"}
    modules = {name: m for name, m in root.named_modules() if isinstance(m, MODULES)}
    assert set(layers) == set(modules), set(layers) ^ set(modules)
    for path, module in modules.items():
        assert layers[path].shape == tuple(module.weight.shape), path
        assert layers[path].bias == (module.bias is not None), path


@pytest.mark.parametrize("model", ["sd1", "xl"])
def test_each_unet_layer_is_the_module_diffusers_converts_its_ldm_name_to(model, request):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet, _, table = request.getfixturevalue(model)
    layers = [layer for layer in table.by_path.values() if layer.component == UNET]
    checkpoint = {}
    for i, layer in enumerate(layers):  # each tensor says which table row it came from
        for tensor in ("weight", "bias"):
            checkpoint[f"model.diffusion_model.{layer.original}.{tensor}"] = torch.tensor([float(i)])
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    for i, layer in enumerate(layers):
        assert converted.get(f"{layer.path}.weight") == torch.tensor([float(i)]), (layer.original, layer.path)
    check_modules(unet, table, UNET)


def test_each_text_encoder_layer_is_the_module_its_a1111_name_means(sd1, xl):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    _, encoder, table = sd1
    check_modules(text_of(encoder), table, TEXT)
    assert all(
        layer.name == "transformer_text_model_" + layer.path.replace(".", "_")
        for (c, _), layer in table.by_path.items()
        if c == TEXT
    )
    _, (clip_l, big_g), table = xl
    check_modules(text_of(clip_l), table, TEXT)
    assert all(
        layer.name == "0_transformer_text_model_" + layer.path.replace(".", "_")
        for (c, _), layer in table.by_path.items()
        if c == TEXT
    )
    check_modules(text_of(big_g), table, TEXT_2)
    # bigG as A1111 has it (OpenCLIP: `1_model_` + the module path): one in_proj_weight for q, k and v
    openclip = [layer for (c, _), layer in table.by_path.items() if c == TEXT_2 and layer.listed]
    checkpoint, tags = {}, {}
    for i, layer in enumerate(openclip):
        assert layer.name == "1_model_" + layer.original.replace(".", "_")
        width = layer.shape[0]
        if layer.kind == "attention":
            tags.update({f"{layer.path}.{p}": float(i * 10 + k) for k, p in enumerate(("q_proj", "k_proj", "v_proj"))})
            checkpoint[f"m.{layer.original}.in_proj_weight"] = torch.cat(
                [torch.full((width, 1), float(i * 10 + k)) for k in range(3)]
            )
        else:
            tags[layer.path] = float(i * 10)
            checkpoint[f"m.{layer.original}.weight"] = torch.full((width, 1), float(i * 10))
    converted = convert_open_clip_checkpoint(big_g, checkpoint, prefix="m.")
    for path, tag in tags.items():
        assert torch.all(converted[f"text_model.{path}.weight"] == tag), path


def a1111_paths(table: LayerTable, keys: dict[str, str]) -> dict[str, str | None]:
    found = {}
    for key in keys:
        _, layer = a1111_layer(key, table)
        found[key] = layer.path if layer else None
    return found


@pytest.mark.parametrize("model", ["sd1", "xl"])
def test_kohya_keys_in_either_naming_reach_the_module_they_name(model, request):
    """kohya's SD 1.x keys name diffusers modules, its SDXL keys SGM modules; A1111 reads both on both."""
    _, _, table = request.getfixturevalue(model)
    unet = [layer for layer in table.by_path.values() if layer.component == UNET]
    sgm = {"lora_unet_" + layer.original.replace(".", "_"): layer.path for layer in unet}
    assert a1111_paths(table, sgm) == sgm  # "SDXL loras seem to already have correct compvis keys"
    diffusers = {"lora_unet_" + layer.path.replace(".", "_"): layer.path for layer in unet}
    found = a1111_paths(table, diffusers)
    # convert_diffusers_name_to_compvis has no rule for these, and "diffusion_model_<diffusers name>" is no module
    unmatched = {"conv_norm_out", "add_embedding.linear_1", "add_embedding.linear_2"}
    if model == "xl":  # up_blocks.0 attends on SDXL: its upsampler is output_blocks.2.2, A1111 looks for 2.1
        unmatched.add("up_blocks.0.upsamplers.0.conv")
    assert {diffusers[k] for k, v in found.items() if v is None} == unmatched & set(diffusers.values())
    assert all(v == diffusers[k] for k, v in found.items() if v is not None)


def test_norm_layers_take_full_diffs_and_refuse_other_modules(sd1):
    """A1111 patches GroupNorm and LayerNorm too: LyCORIS's norm modules (w_norm, b_norm) and low-rank
    modules on a norm are refused, never silently dropped; a full diff applies to weight and bias."""
    _, _, table = sd1
    norm = "lora_unet_down_blocks_0_resnets_0_norm1"  # A1111: diffusion_model_input_blocks_1_0_in_layers_0
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 32, 1, 1],
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": [32, 4, 1, 1],
    }
    fit = fit_lora({**lora, f"{norm}.w_norm": [32], f"{norm}.b_norm": [32]}, {}, table)
    assert fit.problem("SD 1.x") and "norm-layer" in fit.problem("SD 1.x") and not fit.unmatched
    fit = fit_lora({**lora, f"{norm}.lora_down.weight": [4, 32], f"{norm}.lora_up.weight": [32, 4]}, {}, table)
    assert fit.problem("SD 1.x") and "norm-layer" in fit.problem("SD 1.x")
    full = {f"{norm}.diff": [32], f"{norm}.diff_b": [32], "lora_te_text_model_encoder_layers_1_layer_norm2.diff": [32]}
    fit = fit_lora({**lora, **full}, {}, table)
    assert fit.problem("SD 1.x") is None and not fit.unmatched and not fit.skipped
    applied = {m.layer.path: m.changes_bias for m in fit.modules}
    assert applied == {
        "down_blocks.0.attentions.0.proj_in": False,
        "down_blocks.0.resnets.0.norm1": True,
        "encoder.layers.1.layer_norm2": False,
    }


def test_a_bias_diff_for_a_layer_without_bias_is_skipped_with_a_note(sd1):
    _, _, table = sd1
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    fit = fit_lora({f"{to_q}.diff": [32, 32], f"{to_q}.diff_b": [32]}, {}, table)
    assert not fit.modules and "bias it does not have" in fit.skipped[0]


@pytest.mark.parametrize(
    "parts",
    [
        {"hada_w1_a": [32, 4], "hada_w1_b": [3, 32], "hada_w2_a": [32, 4], "hada_w2_b": [4, 32]},
        {"hada_w1_a": [4, 32], "hada_w1_b": [4, 32], "hada_t1": [4, 3, 1, 1], "hada_w2_a": [32, 4], "hada_w2_b": [4, 32]},
        {"lokr_w1_a": [4, 2], "lokr_w1_b": [3, 4], "lokr_w2": [8, 8]},
        {"lokr_w1": [4, 4], "lokr_t2": [2, 2, 1, 1], "lokr_w2_a": [3, 8], "lokr_w2_b": [2, 8]},
        {"lora_down.weight": [4, 32, 1, 1], "lora_mid.weight": [4, 3, 1, 1], "lora_up.weight": [32, 4, 1, 1]},
    ],
)
def test_factors_that_do_not_multiply_skip_the_layer_as_a1111s_runtime_error_does(parts, sd1):
    """network_apply_weights catches the RuntimeError of calc_updown and skips the layer: validate says so."""
    _, _, table = sd1
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 32x32 1x1 conv
    fit = fit_lora({f"{key}.{part}": shape for part, shape in parts.items()}, {}, table)
    assert not fit.modules and len(fit.skipped) == 1 and "diffusion_model_input_blocks_1_1_proj_in" in fit.skipped[0]


def test_peft_alpha_patterns_match_module_names_as_peft_does(sd1):
    """peft.utils.other.get_pattern_key: re.match(rf"(.*\\.)?({key})$", module name); else lora_alpha."""
    import json

    _, _, table = sd1
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    shapes = {
        f"unet.{block}.attn1.{p}.{ab}": shape
        for p in ("to_q", "to_k", "to_v")
        for ab, shape in (("lora_A.weight", [4, 32]), ("lora_B.weight", [32, 4]))
    }
    config = {"unet.lora_alpha": 2, "unet.r": 4, "unet.alpha_pattern": {"attn1.to_q|attn1.to_k": 8}}
    fit = fit_lora(shapes, {"lora_adapter_metadata": json.dumps(config)}, table)
    assert {m.layer.path.rsplit(".", 1)[1]: m.alpha for m in fit.modules} == {"to_q": 8.0, "to_k": 8.0, "to_v": 2.0}
