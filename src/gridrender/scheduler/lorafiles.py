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
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .layers import TEXT, TEXT_2, UNET, Layer, LayerTable
from .loranames import a1111_layer
from .lorashapes import misfit, rank

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
        problem = misfit(kind, shape, layer)
        if problem:
            skipped.append(f"{key}: {problem}")
            continue
        alpha = _alpha_for(alphas, key) if peft else None
        modules.append(Module(key, layer, kind, dict(parts), rank(kind, shape), alpha))
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
