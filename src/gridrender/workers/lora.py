"""LoRAs merged into the weights as A1111 merges them, and the exact base weights put back.

Which tensors of a file change which layer is decided by `scheduler/lorafiles.py`
(A1111's key matching, torch-free, shared with `validate`). Here each matched module's
update is computed as A1111's extensions-builtin/Lora computes it (calc_updown of
network_lora.py, network_hada.py, network_lokr.py, network_full.py with lyco_helpers.py;
finalize_updown and apply_weight_decompose of network.py): the rebuilt ΔW, fitted to
the layer's shape, times its scale (`scale`, else alpha / rank, else 1), DoRA's
re-normalisation, then the multiplier (the text-encoder one for text-encoder layers).
Several LoRAs apply one after another in the order given, each to the weight the
previous left (network_apply_weights), so DoRA stacks as in A1111.

A full-weight module's `diff_b` is added to the layer's bias (A1111's ex_bias).
Everything is computed in float32 and cast to the layer's dtype once (A1111 computes in
the model's dtype, fp16 on most GPUs). A layer's base weight (and bias) is copied aside
the first time a LoRA changes it and copied back when a set no longer needs it: bit for
bit the base, so a resident pipeline never drifts, whatever sets came before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gridrender.scheduler.layers import LayerTable
from gridrender.scheduler.lorafiles import LoraFit, Module, fit_lora
from gridrender.scheduler.lorashapes import lora_parts
from gridrender.scheduler.weightfiles import safetensors_header

log = logging.getLogger(__name__)
Tensors = Mapping[str, torch.Tensor]


@dataclass
class Network:
    """A LoRA file read for one model: each matched module with its tensors (as stored, on the CPU)."""

    modules: list[tuple[Module, dict[str, torch.Tensor]]]
    fit: LoraFit


def load(path: Path, table: LayerTable) -> Network:
    """Read a LoRA file's tensors for the layers it changes in a model of this table."""
    from safetensors import safe_open

    shapes, metadata = safetensors_header(path)
    fit = fit_lora(shapes, metadata, table)
    problem = fit.problem(table.family)
    if problem:
        raise ValueError(problem)
    modules = []
    with safe_open(str(path), framework="pt") as f:
        for module in fit.modules:
            modules.append((module, {part: f.get_tensor(name) for part, name in module.parts.items()}))
    return Network(modules, fit)


def updown(module: Module, tensors: Tensors, orig: torch.Tensor) -> torch.Tensor:
    """The change one module makes to a layer whose weight is `orig`, before the multiplier (float32)."""
    orig = orig.float()
    device = orig.device
    t = {part: value.to(device=device, dtype=torch.float32) for part, value in tensors.items()}
    if module.type == "lora":
        delta, shape = _lora(t, orig)
    elif module.type == "hada":
        delta, shape = _hada(t)
    elif module.type == "lokr":
        delta, shape = _lokr(t, orig)
    elif module.type == "full":
        delta, shape = t["diff"], list(t["diff"].shape)
    else:
        raise ValueError(f"{module.key}: module type {module.type!r} is not applied")
    return _finalize(module, t, delta, orig, shape)


_LINEAR_DIMS = 2  # a Linear weight (out, in)
_CONV_DIMS = 4  # a Conv2d weight (out, in, kh, kw)


def _lora(t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """network_lora.py: up @ down (rebuild_conventional), or CP with lora_mid (rebuild_cp_decomposition)."""
    up_name, down_name = lora_parts(t)
    up, down = t[up_name], t[down_name]
    if orig.dim() == _LINEAR_DIMS:  # create_module: Linear layers take their weights flattened to 2-D
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    elif down.dim() == _LINEAR_DIMS:  # and a conv's 2-D lora_down is a 1x1 conv
        down = down.reshape(down.shape[0], -1, 1, 1)
    shape = [up.size(0), down.size(1)]
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"]
        delta = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1), down.reshape(down.size(0), -1))
        return delta, [*shape, *mid.shape[2:]]
    if down.dim() == _CONV_DIMS:
        shape += list(down.shape[2:])
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape), shape


def _make_weight_cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """lyco_helpers.make_weight_cp: a Tucker core contracted with its two factors."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _conventional(up: torch.Tensor, down: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """lyco_helpers.rebuild_conventional."""
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(list(shape))


def _hada(t: Tensors) -> tuple[torch.Tensor, list[int]]:
    """network_hada.py: the Hadamard product of two low-rank (or Tucker) products."""
    w1a, w1b, w2a, w2b = t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]
    shape = [w1a.size(0), w1b.size(1)]
    if "hada_t1" in t:
        shape = [w1a.size(1), w1b.size(1), *t["hada_t1"].shape[2:]]
        first = _make_weight_cp(t["hada_t1"], w1a, w1b)
    else:
        if w1b.dim() == _CONV_DIMS:
            shape += list(w1b.shape[2:])
        first = _conventional(w1a, w1b, shape)
    second = _make_weight_cp(t["hada_t2"], w2a, w2b) if "hada_t2" in t else _conventional(w2a, w2b, shape)
    return first * second, shape


def _lokr(t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """network_lokr.py: kron(w1, w2), each side whole, factored (a @ b) or Tucker (w2 only)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" not in t:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    else:
        w2 = _make_weight_cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    shape = list(orig.shape) if orig.dim() == _CONV_DIMS else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if w2.dim() == _CONV_DIMS:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2.contiguous()).reshape(shape), shape


def _finalize(module: Module, t: Tensors, delta: torch.Tensor, orig: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """network.py finalize_updown (without the multiplier): fit the shape, scale, DoRA."""
    if len(shape) == _CONV_DIMS:
        delta = delta.reshape(list(shape))
    if orig.numel() == delta.numel():
        delta = delta.reshape(orig.shape)
    delta = delta * _scale(module, t)
    if "dora_scale" in t:
        delta = _a1111_dora(delta, orig, t["dora_scale"])
    elif "magnitude" in t:
        delta = _peft_dora(delta, orig, t["magnitude"])
    return delta


def _scale(module: Module, t: Tensors) -> float:
    """NetworkModule.calc_scale: `scale` if the file has one, else alpha / rank, else 1."""
    if "scale" in t:
        return float(t["scale"].item())
    alpha = float(t["alpha"].item()) if "alpha" in t else module.alpha
    if module.dim is not None and alpha is not None:
        return alpha / module.dim
    return 1.0


def _a1111_dora(delta: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """network.py apply_weight_decompose: W' = (W + ΔW) · dora_scale / ‖W + ΔW‖ per input column."""
    merged = delta + orig
    dims = orig.dim() - 1
    norm = (
        merged.transpose(0, 1)
        .reshape(merged.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(merged.shape[1], *[1] * dims)
        .transpose(0, 1)
    )
    updated: torch.Tensor = merged * (dora_scale / norm) - orig
    return updated


def _peft_dora(delta: torch.Tensor, orig: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA (lora_magnitude_vector): the same re-normalisation per output row, as PEFT trains it."""
    merged = delta + orig
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (orig.dim() - 1))
    updated: torch.Tensor = merged * (magnitude.reshape(norm.shape) / norm) - orig
    return updated


Applied = tuple[Network, float, float]  # (network, text-encoder multiplier, UNet multiplier)
Where = tuple[str, str, str]  # (component, layer path, "weight" | "bias")


_Update = tuple[Module, dict[str, torch.Tensor], float]  # a module, its tensors, its multiplier


def _updates(networks: Sequence[Applied]) -> dict[Where, list[_Update]]:
    """Each tensor the networks change, with the modules that change it in the order they apply."""
    wanted: dict[Where, list[_Update]] = {}
    for network, te, unet in networks:
        for module, tensors in network.modules:
            multiplier = te if module.text_encoder else unet
            if multiplier == 0.0:
                continue
            component, path = module.layer.component, module.layer.path
            wanted.setdefault((component, path, "weight"), []).append((module, tensors, multiplier))
            if module.changes_bias:
                wanted.setdefault((component, path, "bias"), []).append((module, tensors, multiplier))
    return wanted


@dataclass
class Merged:
    """The LoRA set merged into a pipeline's layers now, and their base tensors to go back to."""

    backups: dict[Where, torch.Tensor] = field(default_factory=dict)  # a layer's base weight or bias
    changed: set[Where] = field(default_factory=set)  # tensors that differ from their base now

    def apply(self, roots: Mapping[str, torch.nn.Module], networks: Sequence[Applied]) -> int:
        """Make the layers hold base + these networks (none: the base, bit for bit). Returns tensors written.

        A weight takes each module's update in turn (network_apply_weights: DoRA sees the
        weight the previous LoRA left); a bias takes each full-weight module's `diff_b`
        times the multiplier, unscaled (finalize_updown's ex_bias).
        """
        wanted = _updates(networks)
        written = 0
        touched: set[Where] = set()
        try:
            with torch.no_grad():
                for where in self.changed - wanted.keys():
                    self._tensor(roots, where).copy_(self.backups[where])
                    written += 1
                for where, items in wanted.items():
                    tensor = self._tensor(roots, where)
                    if where not in self.backups:  # the first change to this tensor: keep its base
                        self.backups[where] = tensor.detach().clone()
                    merged = self.backups[where].float()
                    for module, tensors, multiplier in items:
                        if where[2] == "weight":
                            merged = merged + multiplier * updown(module, tensors, merged)
                        else:
                            merged = merged + multiplier * tensors["diff_b"].to(merged).reshape(merged.shape)
                    touched.add(where)
                    tensor.copy_(merged.to(tensor.dtype))
                    written += 1
        except BaseException:
            self.restore(roots, touched)  # never a half-merged set left for the next chunk
            raise
        self.changed = set(wanted)
        return written

    def restore(self, roots: Mapping[str, torch.nn.Module], also: set[Where] | None = None) -> None:
        """Put every tensor this set (and `also`) changed back to its base, bit for bit."""
        with torch.no_grad():
            for where in self.changed | (also or set()):
                self._tensor(roots, where).copy_(self.backups[where])
        self.changed = set()

    @staticmethod
    def _tensor(roots: Mapping[str, torch.nn.Module], where: Where) -> torch.Tensor:
        component, path, name = where
        tensor = getattr(roots[component].get_submodule(path), name)
        assert isinstance(tensor, torch.Tensor), f"{component}.{path} has no {name}"
        return tensor
