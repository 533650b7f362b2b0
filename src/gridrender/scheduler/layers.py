"""The layers a LoRA can change, named as A1111 names them, computed from a model's configs.

A1111 names every module of the model it loaded by its original (LDM/SGM) path with
dots replaced by underscores (extensions-builtin/Lora/networks.py,
assign_network_names_to_compvis_modules): the UNet's modules under `diffusion_model_`
(`diffusion_model_input_blocks_1_1_proj_in`), SD 1.x's CLIP under `transformer_`,
SDXL's two encoders under `0_transformer_` (CLIP-L) and `1_model_` (OpenCLIP bigG:
`1_model_transformer_resblocks_N_attn` is one fused MultiheadAttention). gridrender
loads diffusers modules instead, so this table gives, for each such name, the
diffusers module it is (`down_blocks.0.attentions.0.proj_in`), the component it lives
in and its weight's shape: everything the scheduler needs to tell whether a LoRA fits
a model without torch, and what the worker needs to merge it.

Text-encoder paths are relative to the text transformer (`encoder.layers.0.mlp.fc1`):
transformers >= 5 dropped CLIPTextModel's `.text_model` wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

UNET, TEXT, TEXT_2 = "unet", "text_encoder", "text_encoder_2"
Kind = Literal["linear", "conv", "attention", "norm"]


@dataclass(frozen=True)
class Layer:
    """One module a LoRA may change."""

    name: str  # A1111's network layer name (underscored original path)
    component: str  # UNET | TEXT | TEXT_2
    path: str  # the diffusers / transformers module path inside the component
    shape: tuple[int, ...]  # its weight's shape (an attention: one of its four projections; a norm: (channels,))
    kind: Kind
    original: str  # the original checkpoint's dotted path, under model.diffusion_model. / the encoder
    # OpenCLIP's projections: A1111 changes them only through their fused attention (its
    # forward never calls out_proj's), named here; q, k and v have no A1111 name of their own.
    attention: str | None = None
    listed: bool = True  # A1111 has a module of this name (its network_layer_mapping)
    bias: bool = True  # the module has a bias (a full-weight diff's `diff_b` changes it)


@dataclass(frozen=True)
class LayerTable:
    """A model's layers by A1111 name, and by (component, diffusers path)."""

    by_name: Mapping[str, Layer]
    by_path: Mapping[tuple[str, str], Layer]
    family: str  # "SD 1.x" | "SDXL"

    @classmethod
    def of(cls, layers: list[Layer], family: str) -> LayerTable:
        return cls({x.name: x for x in layers if x.listed}, {(x.component, x.path): x for x in layers}, family)


_FAMILY_BY_ENCODERS = {1: "SD 1.x", 2: "SDXL"}


def layer_table(unet: Mapping[str, Any], text_encoders: Sequence[Mapping[str, Any]]) -> LayerTable:
    """The table of a model from its UNet config and its text encoders' configs (one for SD 1.x, two for SDXL)."""
    layers = [_named(UNET, "diffusion_model", found) for found in _UNetLayers.of(unet).all()]
    family = _FAMILY_BY_ENCODERS.get(len(text_encoders))
    if family is None:
        raise ValueError(f"a model has one or two text encoders, not {len(text_encoders)}")
    clip_prefix = "transformer_text_model" if family == "SD 1.x" else "0_transformer_text_model"
    layers += [_named(TEXT, clip_prefix, (path, path, shape, kind)) for path, shape, kind in _clip(text_encoders[0])]
    if len(text_encoders) > 1:
        layers += list(_open_clip(text_encoders[1]))
    return LayerTable.of(layers, family)


# The UNet's attention projections q, k and v have no bias (diffusers' Attention, LDM's CrossAttention).
_BIASLESS = (".to_q", ".to_k", ".to_v")

_Module = tuple[str, str, tuple[int, ...], Kind]  # (original path, diffusers path, shape, kind)
_Found = Iterator[_Module]


def _named(component: str, prefix: str, module: _Module) -> Layer:
    original, path, shape, kind = module
    bias = not (component == UNET and path.endswith(_BIASLESS))
    return Layer(f"{prefix}_{original.replace('.', '_')}", component, path, shape, kind, original, bias=bias)


# -- UNet ---------------------------------------------------------------------------------


def _per_block(value: Any, blocks: int) -> list[int]:
    return [int(n) for n in value] if isinstance(value, list | tuple) else [int(value)] * blocks


@dataclass(frozen=True)
class _UNetLayers:
    """Every Linear, Conv2d, GroupNorm and LayerNorm of a UNet2DConditionModel (SD 1.x/2.x, SDXL), as the
    LDM UNet names it (A1111 patches all four: a LyCORIS file may change norms).

    The LDM UNet numbers its blocks flat: input_blocks.0 is conv_in, then per down
    block `layers` resnets (+ attentions) and a downsampler; output_blocks likewise
    with `layers + 1` per up block and the upsampler after the last resnet.
    """

    config: Mapping[str, Any]
    channels: list[int]  # per block, and the per-block settings below
    layers: list[int]
    depth: list[int]
    cross: list[int]
    linear_proj: bool
    scale_shift: bool
    temb: int  # the time embedding's width

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> _UNetLayers:
        channels = [int(c) for c in config["block_out_channels"]]
        blocks = len(channels)
        return cls(
            config,
            channels,
            layers=_per_block(config.get("layers_per_block", 2), blocks),
            depth=_per_block(config.get("transformer_layers_per_block", 1) or 1, blocks),
            cross=_per_block(config.get("cross_attention_dim", 768), blocks),
            linear_proj=bool(config.get("use_linear_projection", False)),
            scale_shift=config.get("resnet_time_scale_shift", "default") == "scale_shift",
            temb=int(config.get("time_embedding_dim") or 4 * channels[0]),
        )

    def all(self) -> _Found:
        yield from self.stem()
        yield from self.down()
        yield from self.mid()
        yield from self.up()
        c0 = self.channels[0]
        yield "out.0", "conv_norm_out", (c0,), "norm"
        yield "out.2", "conv_out", (int(self.config["out_channels"]), c0, 3, 3), "conv"

    def resnet(self, ldm: str, path: str, cin: int, cout: int) -> _Found:
        yield f"{ldm}.in_layers.0", f"{path}.norm1", (cin,), "norm"
        yield f"{ldm}.in_layers.2", f"{path}.conv1", (cout, cin, 3, 3), "conv"
        yield f"{ldm}.emb_layers.1", f"{path}.time_emb_proj", (2 * cout if self.scale_shift else cout, self.temb), "linear"
        yield f"{ldm}.out_layers.0", f"{path}.norm2", (cout,), "norm"
        yield f"{ldm}.out_layers.3", f"{path}.conv2", (cout, cout, 3, 3), "conv"
        if cin != cout:
            yield f"{ldm}.skip_connection", f"{path}.conv_shortcut", (cout, cin, 1, 1), "conv"

    def transformer(self, ldm: str, path: str, c: int, blocks_deep: int, context: int) -> _Found:
        proj: tuple[tuple[int, ...], Kind] = ((c, c), "linear") if self.linear_proj else ((c, c, 1, 1), "conv")
        yield f"{ldm}.norm", f"{path}.norm", (c,), "norm"
        yield f"{ldm}.proj_in", f"{path}.proj_in", *proj
        for k in range(blocks_deep):
            yield from self.transformer_block(f"{ldm}.transformer_blocks.{k}", f"{path}.transformer_blocks.{k}", c, context)
        yield f"{ldm}.proj_out", f"{path}.proj_out", *proj

    @staticmethod
    def transformer_block(ldm_block: str, block: str, c: int, context: int) -> _Found:
        for norm in ("norm1", "norm2", "norm3"):
            yield f"{ldm_block}.{norm}", f"{block}.{norm}", (c,), "norm"
        for attn, kv in (("attn1", c), ("attn2", context)):
            for name, width in (("to_q", c), ("to_k", kv), ("to_v", kv)):
                yield f"{ldm_block}.{attn}.{name}", f"{block}.{attn}.{name}", (c, width), "linear"
            yield f"{ldm_block}.{attn}.to_out.0", f"{block}.{attn}.to_out.0", (c, c), "linear"
        yield f"{ldm_block}.ff.net.0.proj", f"{block}.ff.net.0.proj", (8 * c, c), "linear"
        yield f"{ldm_block}.ff.net.2", f"{block}.ff.net.2", (c, 4 * c), "linear"

    def stem(self) -> _Found:
        """conv_in, the time embedding, and SDXL's size and pooled-text conditioning."""
        c0, temb = self.channels[0], self.temb
        yield "input_blocks.0.0", "conv_in", (c0, int(self.config["in_channels"]), 3, 3), "conv"
        yield "time_embed.0", "time_embedding.linear_1", (temb, c0), "linear"
        yield "time_embed.2", "time_embedding.linear_2", (temb, temb), "linear"
        if self.config.get("addition_embed_type") == "text_time":
            added = int(self.config["projection_class_embeddings_input_dim"])
            yield "label_emb.0.0", "add_embedding.linear_1", (temb, added), "linear"
            yield "label_emb.0.2", "add_embedding.linear_2", (temb, temb), "linear"

    def down(self) -> _Found:
        blocks = len(self.channels)
        index, out = 1, self.channels[0]
        for i, kind in enumerate(self.config["down_block_types"]):
            cin, out = out, self.channels[i]
            attends = _attends(kind, "Down")
            for j in range(self.layers[i]):
                yield from self.resnet(f"input_blocks.{index}.0", f"down_blocks.{i}.resnets.{j}", cin if j == 0 else out, out)
                if attends:
                    yield from self.transformer(
                        f"input_blocks.{index}.1", f"down_blocks.{i}.attentions.{j}", out, self.depth[i], self.cross[i]
                    )
                index += 1
            if i < blocks - 1:
                yield f"input_blocks.{index}.0.op", f"down_blocks.{i}.downsamplers.0.conv", (out, out, 3, 3), "conv"
                index += 1

    def mid(self) -> _Found:
        mid = self.channels[-1]
        mid_type = self.config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        if mid_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"UNet mid block {mid_type!r} is not one gridrender knows the layers of")
        yield from self.resnet("middle_block.0", "mid_block.resnets.0", mid, mid)
        yield from self.transformer("middle_block.1", "mid_block.attentions.0", mid, self.depth[-1], self.cross[-1])
        yield from self.resnet("middle_block.2", "mid_block.resnets.1", mid, mid)

    def up(self) -> _Found:
        blocks = len(self.channels)
        channels, layers, depth, cross = self.channels[::-1], self.layers[::-1], self.depth[::-1], self.cross[::-1]
        index, out = 0, channels[0]
        for i, kind in enumerate(self.config["up_block_types"]):
            previous, out = out, channels[i]
            below = channels[min(i + 1, blocks - 1)]
            attends = _attends(kind, "Up")
            count = layers[i] + 1
            for j in range(count):
                skip = below if j == count - 1 else out
                cin = (previous if j == 0 else out) + skip
                yield from self.resnet(f"output_blocks.{index}.0", f"up_blocks.{i}.resnets.{j}", cin, out)
                if attends:
                    yield from self.transformer(
                        f"output_blocks.{index}.1", f"up_blocks.{i}.attentions.{j}", out, depth[i], cross[i]
                    )
                if j == count - 1 and i < blocks - 1:
                    yield (
                        f"output_blocks.{index}.{2 if attends else 1}.conv",
                        f"up_blocks.{i}.upsamplers.0.conv",
                        (out, out, 3, 3),
                        "conv",
                    )
                index += 1


def _attends(block_type: str, direction: str) -> bool:
    if block_type == f"CrossAttn{direction}Block2D":
        return True
    if block_type == f"{direction}Block2D":
        return False
    raise ValueError(f"UNet block {block_type!r} is not one gridrender knows the layers of")


# -- text encoders ------------------------------------------------------------------------


def _clip(config: Mapping[str, Any]) -> Iterator[tuple[str, tuple[int, ...], Kind]]:
    """A transformers CLIPTextModel('s text transformer): path under text_model., shape, kind."""
    width, mlp = int(config["hidden_size"]), int(config["intermediate_size"])
    for n in range(int(config["num_hidden_layers"])):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"encoder.layers.{n}.self_attn.{name}", (width, width), "linear"
        yield f"encoder.layers.{n}.mlp.fc1", (mlp, width), "linear"
        yield f"encoder.layers.{n}.mlp.fc2", (width, mlp), "linear"
        yield f"encoder.layers.{n}.layer_norm1", (width,), "norm"
        yield f"encoder.layers.{n}.layer_norm2", (width,), "norm"
    yield "final_layer_norm", (width,), "norm"


def _open_clip(config: Mapping[str, Any]) -> Iterator[Layer]:
    """SDXL's second encoder as A1111 has it: OpenCLIP's resblocks, each with one fused MultiheadAttention.

    diffusers loads it as CLIPTextModelWithProjection with separate q/k/v/out
    projections; A1111's `..._attn` is all four of them at once.
    """
    width, mlp = int(config["hidden_size"]), int(config["intermediate_size"])
    square = (width, width)
    for n in range(int(config["num_hidden_layers"])):
        name, original, path = f"1_model_transformer_resblocks_{n}", f"transformer.resblocks.{n}", f"encoder.layers.{n}"
        attention = f"{name}_attn"
        yield Layer(attention, TEXT_2, f"{path}.self_attn", square, "attention", f"{original}.attn")
        for projection in ("q_proj", "k_proj", "v_proj"):
            yield Layer(
                f"{attention}_{projection}",
                TEXT_2,
                f"{path}.self_attn.{projection}",
                square,
                "linear",
                f"{original}.attn.in_proj_weight",
                attention=attention,
                listed=False,
            )
        yield Layer(
            f"{attention}_out_proj",
            TEXT_2,
            f"{path}.self_attn.out_proj",
            square,
            "linear",
            f"{original}.attn.out_proj",
            attention=attention,
        )
        yield Layer(f"{name}_mlp_c_fc", TEXT_2, f"{path}.mlp.fc1", (mlp, width), "linear", f"{original}.mlp.c_fc")
        yield Layer(f"{name}_mlp_c_proj", TEXT_2, f"{path}.mlp.fc2", (width, mlp), "linear", f"{original}.mlp.c_proj")
        for ln, norm in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            yield Layer(f"{name}_{ln}", TEXT_2, f"{path}.{norm}", (width,), "norm", f"{original}.{ln}")
    yield Layer("1_model_ln_final", TEXT_2, "final_layer_norm", (width,), "norm", "ln_final")
