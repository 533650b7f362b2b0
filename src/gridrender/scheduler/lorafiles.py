"""A LoRA file's tensors matched to a model's layers as A1111 matches them, without torch.

A1111 reference (extensions-builtin/Lora): networks.py load_network and
convert_diffusers_name_to_compvis (a key's layer), network_lora.py / network_hada.py /
network_lokr.py / network_full.py (which keys make which module type, and the shape
of their update), network.py NetworkModule (alpha, scale, dora_scale, te/unet
multiplier). Keys are split at their first "." into the layer part and the weight
part (`lora_unet_down_blocks_0_attentions_0_proj_in` . `lora_down.weight`); the layer
part is converted to A1111's name for the layer and looked up in the model's table
(`layers.py`). What A1111 cannot match it lists as "didn't match keys" and skips; so
does gridrender, and `validate` prints them.

diffusers' kohya conversion (loaders/lora_conversion_utils.py) is not used: it maps keys
A1111 does not (a bigG attention with only some of q/k/v/out, SDXL's up_blocks.0
upsampler by its diffusers name), raises on keys it does not know where A1111 skips them, and
reads no LyCORIS module.

diffusers/PEFT files (`unet.<module>.lora_A.weight`, `text_encoder.…`, `text_encoder_2.…`)
name diffusers modules directly; A1111 does not read them, gridrender applies them
module by module with the same math (alpha from `.alpha` keys or the
`lora_adapter_metadata` diffusers writes, else 1).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .layers import TEXT, TEXT_2, UNET, Layer, LayerTable

SUPPORTED = ("lora", "hada", "lokr", "full")
# A1111's other module types: gridrender does not apply them (the LoRA is refused, never half-applied).
UNSUPPORTED = {"ia3": "IA3", "norm": "norm-layer", "glora": "GLoRA", "oft": "OFT"}
_PEFT = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+?)\."
    r"(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_magnitude_vector(?:\.weight)?|alpha)$"
)
_PEFT_PARTS = {
    "lora_A.weight": "lora_down.weight",
    "lora.down.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    "alpha": "alpha",
}
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


@dataclass(frozen=True)
class Module:
    """One layer's update in a LoRA file."""

    key: str  # A1111's name for it (its sd_key); for PEFT files, component.path
    layer: Layer  # the diffusers module it changes
    type: str  # lora | hada | lokr | full
    parts: Mapping[str, str]  # weight part ("lora_up.weight", "hada_w1_a", "alpha", ...) -> tensor name in the file
    dim: int | None  # the rank A1111 divides alpha by (None: scale 1 unless a `scale` key says)
    alpha: float | None = None  # PEFT files: lora_alpha from their metadata (an `alpha` tensor wins)

    @property
    def text_encoder(self) -> bool:
        """Whether A1111 scales it by the text-encoder multiplier ('transformer' in sd_key[:20])."""
        return self.layer.component != UNET

    @property
    def changes_bias(self) -> bool:
        """Whether A1111 adds the module's bias difference to the layer's bias.

        network_full.py passes `diff_b` on as ex_bias, which network_apply_weights adds
        (times the multiplier, without the scale) to the layer's bias. Through a fused
        OpenCLIP attention only the out projection's counts: its q, k and v
        calc_updown results are taken as `updown_q, _ = ...`, their ex_bias dropped.
        """
        if self.type != "full" or "diff_b" not in self.parts:
            return False
        return self.layer.attention is None or self.layer.path.endswith(".out_proj")


@dataclass(frozen=True)
class LoraFit:
    """How a LoRA file fits a model: what applies, what A1111 would not match, what it leaves alone."""

    modules: tuple[Module, ...]
    unmatched: Mapping[str, str]  # tensor name -> the layer name A1111 looked for
    skipped: tuple[str, ...] = ()  # layers that matched but are left alone, and why
    keys: int = 0  # tensors in the file
    unsupported: Mapping[str, str] = field(default_factory=dict)  # A1111 key -> the module type we do not apply
    family: tuple[str, str] | None = None  # the model family the file was trained for, and how we know

    def problem(self, family: str) -> str | None:
        """Why the file cannot be used with a model of this family at all, or None.

        A file of the other family is refused even where some of its layers would fit:
        A1111 would apply an SDXL LoRA's CLIP-L layers to SD 1.x's CLIP and fail on the rest.
        """
        if self.family and self.family[0] != family:
            return f"it is an {self.family[0]} LoRA ({self.family[1]}); the model is {family}"
        if self.unsupported:
            key, kind = next(iter(self.unsupported.items()))
            return (
                f"it holds {kind} modules ({len(self.unsupported)} layers, e.g. {key}), which gridrender "
                "does not apply (LoRA, LoCon, LoHa, LoKr, full-weight diffs and DoRA are applied)"
            )
        if self.modules:
            return None
        if self.skipped:
            return f"no layer of it can be applied: {self.skipped[0]}"
        return f"none of its {self.keys} keys names a layer of this {family} model{_family_hint(self.unmatched)}"

    def didnt_match(self, limit: int = 8) -> str:
        """A1111's debug line for keys it skips, shortened."""
        names = list(self.unmatched)
        more = f", … ({len(names)} keys)" if len(names) > limit else ""
        return "didn't match keys: " + ", ".join(names[:limit]) + more


def fit_lora(shapes: Mapping[str, list[int]], metadata: Mapping[str, str], table: LayerTable) -> LoraFit:
    """Match a LoRA file's tensors (name -> shape) to the model's layers as A1111 does."""
    groups: dict[str, dict[str, str]] = {}
    layers: dict[str, Layer] = {}
    unmatched: dict[str, str] = {}
    peft = any(_PEFT.match(name) for name in shapes)
    is_sd2 = any("model_transformer_resblocks" in name for name in table.by_name)  # as networks.py decides it
    for name in shapes:
        if peft:
            match = _PEFT.match(name)
            if match is None:
                unmatched[name] = name
                continue
            component, path, part = match.groups()
            key = f"{component}.{path}"
            layer = table.by_path.get((component, path.removeprefix("text_model.")))
            part = _PEFT_PARTS[part]
        else:
            base, _, part = name.partition(".")
            key, layer = a1111_layer(base, table, is_sd2)
        if layer is None:
            unmatched[name] = key
            continue
        groups.setdefault(key, {})[part] = name
        layers[key] = layer
    modules: list[Module] = []
    skipped: list[str] = []
    unsupported: dict[str, str] = {}
    alphas = _peft_alphas(metadata) if peft else {}
    for key, parts in groups.items():
        kind = module_type(set(parts))
        if kind is None or kind in UNSUPPORTED:
            unsupported[key] = UNSUPPORTED.get(kind or "", "unknown (keys " + ", ".join(sorted(parts)) + ")")
            continue
        layer = layers[key]
        if layer.kind == "norm" and kind != "full":  # LyCORIS's norm modules, or low-rank ones A1111 cannot build
            unsupported[key] = UNSUPPORTED["norm"]
            continue
        shape = {part: shapes[tensor] for part, tensor in parts.items()}
        problem = _misfit(kind, shape, layer)
        if problem:
            skipped.append(f"{key}: {problem}")
            continue
        alpha = _alpha_for(alphas, key) if peft else None
        modules.append(Module(key, layer, kind, dict(parts), _dim(kind, shape), alpha))
    if not peft:
        modules, partial = _whole_attentions(modules)
        skipped += partial
    return LoraFit(tuple(modules), unmatched, tuple(skipped), len(shapes), unsupported, lora_family(shapes, metadata))


def lora_family(names: Iterable[str], metadata: Mapping[str, str]) -> tuple[str, str] | None:
    """The family a LoRA was trained for, where its metadata (kohya's, as network.py detect_version reads it)
    or its keys (only SDXL has a second text encoder; lora_te_ is SD 1.x/2.x naming) tell."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "SDXL", f"ss_base_model_version {version}"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2"):
        return "SD 2.x", "ss_v2" if metadata.get("ss_v2") == "True" else f"ss_base_model_version {version}"
    if version.startswith("sd_v1"):
        return "SD 1.x", f"ss_base_model_version {version}"
    names = list(names)
    if any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names):
        return "SDXL", "it has keys for a second text encoder"
    if any(n.startswith("lora_te_") for n in names):
        return "SD 1.x", "its text-encoder keys are lora_te_"
    return None


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


# networks.py's module types, in the order it tries them, each with the weight parts it needs.
_MODULE_TYPES: tuple[tuple[str, Callable[[set[str]], bool]], ...] = (
    ("lora", lambda p: {"lora_up.weight", "lora_down.weight"} <= p or {"lora_A.weight", "lora_B.weight"} <= p),
    ("hada", lambda p: {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= p),
    ("ia3", lambda p: "weight" in p),
    (
        "lokr",
        lambda p: ("lokr_w1" in p or {"lokr_w1_a", "lokr_w1_b"} <= p) and ("lokr_w2" in p or {"lokr_w2_a", "lokr_w2_b"} <= p),
    ),
    ("full", lambda p: "diff" in p),
    ("norm", lambda p: {"w_norm", "b_norm"} <= p),
    ("glora", lambda p: {"a1.weight", "a2.weight", "b1.weight", "b2.weight"} <= p),
    ("oft", lambda p: "oft_blocks" in p or "oft_diag" in p),
)


def module_type(parts: set[str]) -> str | None:
    """The A1111 module type that accepts these weight parts (networks.py tries them in this order)."""
    return next((kind for kind, accepts in _MODULE_TYPES if accepts(parts)), None)


def lora_parts(parts: Mapping[str, object]) -> tuple[str, str]:
    """The (up, down) part names of a LoRA module: kohya's lora_up/lora_down or lora_B/lora_A."""
    if "lora_up.weight" in parts:
        return "lora_up.weight", "lora_down.weight"
    return "lora_B.weight", "lora_A.weight"


def _dim(kind: str, shape: Mapping[str, list[int]]) -> int | None:
    """The rank A1111 divides alpha by: lora_down's rows, hada_w1_b's, lokr's w1_b / w2_b (w2_b wins)."""
    if kind == "lora":
        return shape[lora_parts(shape)[1]][0]
    if kind == "hada":
        return shape["hada_w1_b"][0]
    if kind == "lokr":
        dim = shape["lokr_w1_b"][0] if "lokr_w1_b" in shape else None
        return shape["lokr_w2_b"][0] if "lokr_w2_b" in shape else dim
    return None


_MATRIX_DIMS = 2  # a Linear weight, or a matrix factor
_CONV_DIMS = 4  # a Conv2d weight (out, in, kh, kw), or a Tucker core


def delta_shape(kind: str, shape: Mapping[str, list[int]], layer: Layer) -> list[int] | str:
    """The shape of A1111's update before it is fitted to the layer, or why A1111 fails on it.

    A1111 catches the RuntimeError of factors that do not multiply and skips the layer;
    so does gridrender, at `validate`.
    """
    if kind == "lora":
        return _lora_delta(shape, conv=len(layer.shape) == _CONV_DIMS)
    if kind == "hada":
        return _hada_delta(shape)
    if kind == "lokr":
        return _lokr_delta(shape)
    return list(shape["diff"])


def _lora_delta(shape: Mapping[str, list[int]], conv: bool) -> list[int] | str:
    up, down = (shape[p] for p in lora_parts(shape))
    if "lora_mid.weight" in shape:  # rebuild_cp_decomposition: einsum('n m k l, i n, m j -> i j k l')
        mid = shape["lora_mid.weight"]
        if len(mid) != _CONV_DIMS or mid[0] != math.prod(up[1:]) or mid[1] != down[0]:
            return f"lora_mid {mid} does not join lora_up {up} and lora_down {down}"
        return [up[0], math.prod(down[1:]), *mid[2:]]
    if math.prod(up[1:]) != down[0]:
        return f"lora_up has rank {math.prod(up[1:])}, lora_down {down[0]}"
    if conv and len(down) == _CONV_DIMS:
        return [up[0], *down[1:]]
    return [up[0], math.prod(down[1:])]


def _hada_delta(shape: Mapping[str, list[int]]) -> list[int] | str:
    first = _hada_factor(shape, "1")
    if isinstance(first, str):
        return first
    out = first if "hada_t1" in shape else [*first[:1], shape["hada_w1_b"][1], *shape["hada_w1_b"][2:]]
    second = _hada_factor(shape, "2")
    if isinstance(second, str):
        return second
    if math.prod(second) != math.prod(out):
        return f"its two Hadamard factors have {math.prod(out)} and {math.prod(second)} elements"
    return out


def _lokr_delta(shape: Mapping[str, list[int]]) -> list[int] | str:
    w1 = shape["lokr_w1"] if "lokr_w1" in shape else _product(shape["lokr_w1_a"], shape["lokr_w1_b"], "lokr_w1")
    w2: list[int] | str
    if "lokr_w2" in shape:
        w2 = shape["lokr_w2"]
    elif "lokr_t2" in shape:
        w2 = _tucker(shape["lokr_t2"], shape["lokr_w2_a"], shape["lokr_w2_b"], "lokr_t2")
    elif len(shape["lokr_w2_b"]) == _MATRIX_DIMS:
        w2 = _product(shape["lokr_w2_a"], shape["lokr_w2_b"], "lokr_w2")
    else:  # network_lokr.py multiplies w2_a @ w2_b, which a 4-D w2_b does not survive
        return "A1111 cannot multiply LoKr's lokr_w2_a by a 4-D lokr_w2_b and skips the layer"
    if isinstance(w1, str):
        return w1
    if isinstance(w2, str):
        return w2
    if len(w1) != _MATRIX_DIMS:
        return f"lokr_w1 {w1} is not a matrix"
    return [w1[0] * w2[0], w1[1] * w2[1], *w2[2:]]


def _product(a: list[int], b: list[int], name: str) -> list[int] | str:
    """The shape of a @ b (2-D factors), or why they do not multiply."""
    if len(a) != _MATRIX_DIMS or len(b) != _MATRIX_DIMS or a[1] != b[0]:
        return f"{name}_a {a} and {name}_b {b} do not multiply"
    return [a[0], b[1]]


def _tucker(t: list[int], wa: list[int], wb: list[int], name: str) -> list[int] | str:
    """lyco_helpers.make_weight_cp: einsum('i j k l, j r -> i r k l') with wb, then ('i j k l, i r -> r j k l')
    with wa: the shape [wa's columns, wb's columns, k, l]."""
    if len(t) != _CONV_DIMS or len(wa) != _MATRIX_DIMS or len(wb) != _MATRIX_DIMS or t[1] != wb[0] or t[0] != wa[0]:
        return f"{name} {t} does not join its factors {wa} and {wb}"
    return [wa[1], wb[1], *t[2:]]


def _hada_factor(shape: Mapping[str, list[int]], n: str) -> list[int] | str:
    """One Hadamard factor of network_hada.py: Tucker (hada_tN) or w_a @ w_b (rebuild_conventional, flattened)."""
    wa, wb = shape[f"hada_w{n}_a"], shape[f"hada_w{n}_b"]
    if f"hada_t{n}" in shape:
        return _tucker(shape[f"hada_t{n}"], wa, wb, f"hada_t{n}")
    if math.prod(wa[1:]) != wb[0]:
        return f"hada_w{n}_a {wa} and hada_w{n}_b {wb} do not multiply"
    return [wa[0], math.prod(wb[1:])]


def _misfit(kind: str, shape: Mapping[str, list[int]], layer: Layer) -> str | None:
    out = delta_shape(kind, shape, layer)
    if isinstance(out, str):
        return out
    if math.prod(out) != math.prod(layer.shape):
        return f"its update has shape {out}, the model's layer {list(layer.shape)}"
    return _dora_misfit(shape, layer) or _bias_misfit(shape, layer) or _magnitude_misfit(shape, layer)


def _dora_misfit(shape: Mapping[str, list[int]], layer: Layer) -> str | None:
    if "dora_scale" not in shape:
        return None
    if len(layer.shape) < _MATRIX_DIMS:
        return "DoRA's column norms need a 2-D or 4-D weight"
    norm = [1, layer.shape[1], *[1] * (len(layer.shape) - 2)]
    if _broadcast(list(layer.shape), shape["dora_scale"], norm) != list(layer.shape):
        return f"its dora_scale {shape['dora_scale']} does not fit the layer {list(layer.shape)}"
    return None


def _bias_misfit(shape: Mapping[str, list[int]], layer: Layer) -> str | None:
    if "diff_b" not in shape:
        return None
    if not layer.bias:  # LyCORIS writes diff_b only for layers with a bias
        return "its diff_b would give the layer a bias it does not have"
    if math.prod(shape["diff_b"]) != layer.shape[0]:
        return f"its diff_b {shape['diff_b']} does not fit the layer's bias [{layer.shape[0]}]"
    return None


def _magnitude_misfit(shape: Mapping[str, list[int]], layer: Layer) -> str | None:
    if "magnitude" in shape and math.prod(shape["magnitude"]) != layer.shape[0]:
        return f"its lora_magnitude_vector {shape['magnitude']} does not fit the layer {list(layer.shape)}"
    return None


def _broadcast(*shapes: list[int]) -> list[int] | None:
    """torch's broadcast of shapes, or None where it fails."""
    size = max(len(s) for s in shapes)
    out = []
    for dims in zip(*([1] * (size - len(s)) + list(s) for s in shapes), strict=True):
        wide = {d for d in dims if d != 1}
        if len(wide) > 1:
            return None
        out.append(wide.pop() if wide else 1)
    return out


def _whole_attentions(modules: list[Module]) -> tuple[list[Module], list[str]]:
    """A1111 changes an OpenCLIP attention only when a LoRA has all of q, k, v and out for it.

    networks.py network_apply_weights: the MultiheadAttention takes module_q, _k, _v and
    _out together or not at all, and its forward never calls out_proj's own.
    """
    present: dict[str, set[str]] = {}
    for module in modules:
        if module.layer.attention:
            present.setdefault(module.layer.attention, set()).add(module.layer.path.rsplit(".", 1)[1])
    partial = {name for name, found in present.items() if found != {"q_proj", "k_proj", "v_proj", "out_proj"}}
    kept = [m for m in modules if m.layer.attention not in partial]
    return kept, [
        f"{name}: A1111 leaves this attention alone unless the LoRA has q, k, v and out for it "
        f"(it has {', '.join(sorted(present[name]))})"
        for name in sorted(partial)
    ]


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, tuple[float, dict[str, float]]]:
    """component -> (lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata`."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "") or "{}")
    except ValueError:
        return {}
    out = {}
    for component in (UNET, TEXT, TEXT_2):
        alpha = config.get(f"{component}.lora_alpha")
        if isinstance(alpha, int | float):
            pattern = config.get(f"{component}.alpha_pattern") or {}
            out[component] = (float(alpha), {str(k): float(v) for k, v in pattern.items()})
    return out


def _alpha_for(alphas: Mapping[str, tuple[float, dict[str, float]]], key: str) -> float | None:
    component, _, path = key.partition(".")
    if component not in alphas:
        return None
    alpha, pattern = alphas[component]
    for suffix, value in pattern.items():  # PEFT matches alpha_pattern keys as module-name suffixes
        if re.fullmatch(rf"(.*\.)?({suffix})", path):  # peft.utils.other.get_pattern_key
            return value
    return alpha


def _family_hint(unmatched: Mapping[str, str]) -> str:
    names = list(unmatched)
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "input_blocks" in n for n in names):
        return " (it is an SDXL LoRA)"
    if any(n.startswith(("lora_te_", "lora_unet_", "unet.", "text_encoder.")) for n in names):
        return " (its layers are another model's)"
    return " (it does not look like a LoRA)"
