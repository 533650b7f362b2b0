"""The shape of A1111's update for a LoRA module, and whether it fits its layer (without torch).

A1111 reference: extensions-builtin/Lora/network_lora.py, network_hada.py, network_lokr.py,
network_full.py (each type's update and its shape), network.py (finalize_updown: reshaping
to the layer, dora_scale, bias). A module whose update would not fit its layer is one
A1111 fails on; gridrender refuses the file instead of applying part of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .layers import Layer


def lora_parts(parts: Mapping[str, object]) -> tuple[str, str]:
    """The (up, down) part names of a LoRA module: kohya's lora_up/lora_down or lora_B/lora_A."""
    if "lora_up.weight" in parts:
        return "lora_up.weight", "lora_down.weight"
    return "lora_B.weight", "lora_A.weight"


def rank(kind: str, shape: Mapping[str, list[int]]) -> int | None:
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


def misfit(kind: str, shape: Mapping[str, list[int]], layer: Layer) -> str | None:
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
