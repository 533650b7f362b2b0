"""LoRA as A1111 applies it: out += weight * (alpha / rank) * up(down(x)), per layer.

Reads diffusers/PEFT keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>...`)
and kohya/A1111 keys (`lora_unet_<module_with_underscores>.lora_down.weight`,
`lora_te_...`, `.alpha`). The update is added in the forward pass by hooks, never
merged into the weights: removing the hooks restores the base model bit for bit, so
what a batch renders does not depend on which LoRAs came before it. (diffusers' PEFT
path needs a newer PEFT than transformers 5 accepts for text encoders; A1111 LoRAs
touch the text encoder too.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_PEFT = re.compile(r"^(unet|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_KOHYA = re.compile(r"^lora_(unet|te)_(.+)\.(lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^lora_(unet|te)_(.+)\.alpha$")


@dataclass
class Update:
    """One layer's low-rank update."""

    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None

    @property
    def scale(self) -> float:
        rank = self.down.shape[0]
        return (self.alpha / rank) if self.alpha else 1.0


def _index(module: torch.nn.Module) -> dict[str, str]:
    """Module names by every spelling LoRA files use: dotted, underscored, with or without text_model."""
    names = {}
    for name, _ in module.named_modules():
        for spelling in (name, f"text_model.{name}"):
            names[spelling] = name
            names[spelling.replace(".", "_")] = name
    return names


def parse(state: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[tuple[str, str], Update]:
    """(component, module name) -> its update, from a LoRA file's tensors."""
    indexes = {"unet": _index(unet), "text_encoder": _index(text_encoder)}
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        if match := _PEFT.match(key):
            component, path, kind = match.groups()
            role = "down" if kind in ("lora_A", "lora.down") else "up"
        elif match := _KOHYA.match(key):
            component, path, kind = match.groups()
            component, role = ("unet" if component == "unet" else "text_encoder"), kind.removeprefix("lora_")
        elif match := _KOHYA_ALPHA.match(key):
            component, path = match.groups()
            component, role = ("unet" if component == "unet" else "text_encoder"), "alpha"
        else:
            continue
        name = indexes[component].get(path)
        if name is None:
            raise ValueError(f"{key}: no layer {path!r} in the model's {component}")
        parts.setdefault((component, name), {})[role] = tensor
    updates = {}
    for where, found in parts.items():
        if "down" not in found or "up" not in found:
            raise ValueError(f"{where[1]}: the LoRA has a {'down' if 'down' in found else 'up'} projection only")
        alpha = float(found["alpha"]) if "alpha" in found else None
        updates[where] = Update(found["down"].float(), found["up"].float(), alpha)
    return updates


def load(path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[tuple[str, str], Update]:
    from safetensors.torch import load_file

    return parse(load_file(str(path)), unet, text_encoder)


class Hooks:
    """The updates of a set of (LoRA, weight) pairs, hooked into the modules' forward."""

    def __init__(self) -> None:
        self.handles: list = []

    def clear(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def apply(self, modules: dict[str, torch.nn.Module], loras: list[tuple[dict, float]]) -> None:
        """Replace the hooks by those of `loras`: [(updates of one file, weight), ...]."""
        self.clear()
        per_layer: dict[tuple[str, str], list[tuple[Update, float]]] = {}
        for updates, weight in loras:
            for where, update in updates.items():
                per_layer.setdefault(where, []).append((update, weight))
        for (component, name), items in per_layer.items():
            layer = modules[component].get_submodule(name)
            self.handles.append(layer.register_forward_hook(_hook(layer, items)))


def _hook(layer: torch.nn.Module, items: list[tuple[Update, float]]):
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]  # Linear and Conv2d have one
    device, dtype = weight.device, weight.dtype
    terms = [(u.down.to(device, dtype), u.up.to(device, dtype), weight * u.scale) for u, weight in items]
    conv = isinstance(layer, torch.nn.Conv2d)

    def hook(module, args, output):
        x = args[0]
        for down, up, scale in terms:
            if conv:
                low = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                output = output + scale * F.conv2d(low, up)
            else:
                output = output + scale * F.linear(F.linear(x, down), up)
        return output

    return hook
