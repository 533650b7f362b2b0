"""LoRA files as trainers write them, built in tests: kohya LoRA/LoCon, LyCORIS LoHa/LoKr, DoRA, PEFT.

Key names and tensor layouts follow the trainers, not gridrender:
- kohya sd-scripts (networks/lora.py): `lora_unet_` + the diffusers UNet path with "_"
  for "." on SD 1.x, the SGM UNet's path on SDXL (`lora_unet_input_blocks_4_1_…`);
  `lora_te_text_model_…` (SDXL: `lora_te1_`, `lora_te2_`); `.lora_down.weight` (rank, in
  [, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]), `.alpha`; DoRA's `.dora_scale`
  (1, in[, 1, 1]), the norm of each input column.
- LyCORIS (lycoris/modules/loha.py, lokr.py): `hada_w1_a` (out, r) / `hada_w1_b` (r, in·k·k),
  Tucker `hada_t1` (r, r, k, k) with `hada_w1_a` (r, out) / `hada_w1_b` (r, in); `lokr_w1`
  (a, c) or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` (b, d[, k, k]) or `lokr_w2_a` (b, r) /
  `lokr_w2_b` (r, d), Tucker `lokr_t2` (r, r, k, k) with `lokr_w2_a` (r, b) / `lokr_w2_b` (r, d).
- LyCORIS full: `diff` (the weight's difference), `diff_b` (the bias's, where the layer has one).
- diffusers/PEFT: `unet.<path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r), alpha in
  the `lora_adapter_metadata` diffusers writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

Parts = dict[str, torch.Tensor]


def _randn(rng: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=rng) * scale


def lora(shape: tuple[int, ...], rank: int, rng: torch.Generator, alpha: float | None = None) -> Parts:
    """kohya LoRA on a Linear, or LoCon on a conv (3x3 down, 1x1 up)."""
    out, cin, *kernel = shape
    parts = {
        "lora_down.weight": _randn(rng, rank, cin, *kernel),
        "lora_up.weight": _randn(rng, out, rank, *([1, 1] if kernel else [])),
    }
    if alpha is not None:
        parts["alpha"] = torch.tensor(alpha)
    return parts


def locon_tucker(shape: tuple[int, ...], rank: int, rng: torch.Generator, alpha: float) -> Parts:
    """LoCon with a CP/Tucker middle (lora_mid): 1x1 down, k x k mid, 1x1 up."""
    out, cin, kh, kw = shape
    return {
        "lora_down.weight": _randn(rng, rank, cin, 1, 1),
        "lora_mid.weight": _randn(rng, rank, rank, kh, kw),
        "lora_up.weight": _randn(rng, out, rank, 1, 1),
        "alpha": torch.tensor(alpha),
    }


def dora(shape: tuple[int, ...], base: torch.Tensor, rank: int, rng: torch.Generator, alpha: float) -> Parts:
    """kohya DoRA: a LoRA plus dora_scale, the trained magnitude of each input column."""
    parts = lora(shape, rank, rng, alpha)
    column_norm = base.float().transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1)
    magnitude = column_norm * (1 + 0.2 * torch.rand(base.shape[1], generator=rng))
    parts["dora_scale"] = magnitude.reshape(1, base.shape[1], *[1] * (base.dim() - 2))
    return parts


def loha(shape: tuple[int, ...], rank: int, rng: torch.Generator, alpha: float, tucker: bool = False) -> Parts:
    out, cin, *kernel = shape
    if tucker:
        return {
            "hada_t1": _randn(rng, rank, rank, *kernel),
            "hada_w1_a": _randn(rng, rank, out),
            "hada_w1_b": _randn(rng, rank, cin),
            "hada_t2": _randn(rng, rank, rank, *kernel),
            "hada_w2_a": _randn(rng, rank, out),
            "hada_w2_b": _randn(rng, rank, cin),
            "alpha": torch.tensor(alpha),
        }
    flat = cin * (kernel[0] * kernel[1] if kernel else 1)
    return {
        "hada_w1_a": _randn(rng, out, rank),
        "hada_w1_b": _randn(rng, rank, flat),
        "hada_w2_a": _randn(rng, out, rank),
        "hada_w2_b": _randn(rng, rank, flat),
        "alpha": torch.tensor(alpha),
    }


def lokr(shape: tuple[int, ...], a: int, c: int, rank: int, rng: torch.Generator, alpha: float, form: str) -> Parts:
    """LoKr with out = a*b, in = c*d. form: "w2_factored" (w1 whole, w2 = w2_a @ w2_b), "w1_factored"
    (w1 = w1_a @ w1_b, w2 whole), "tucker" (w2 from lokr_t2), "whole" (w1 and w2 whole)."""
    out, cin, *kernel = shape
    b, d = out // a, cin // c
    parts: Parts = {"alpha": torch.tensor(alpha)}
    if form == "w1_factored":
        parts |= {"lokr_w1_a": _randn(rng, a, rank), "lokr_w1_b": _randn(rng, rank, c)}
    else:
        parts["lokr_w1"] = _randn(rng, a, c)
    if form == "w2_factored":
        parts |= {"lokr_w2_a": _randn(rng, b, rank), "lokr_w2_b": _randn(rng, rank, d)}
    elif form == "tucker":
        parts |= {
            "lokr_t2": _randn(rng, rank, rank, *kernel),
            "lokr_w2_a": _randn(rng, rank, b),
            "lokr_w2_b": _randn(rng, rank, d),
        }
    else:
        parts["lokr_w2"] = _randn(rng, b, d, *kernel)
    return parts


def full(shape: tuple[int, ...], rng: torch.Generator, bias: bool = True) -> Parts:
    """LyCORIS's full module (lycoris/modules/full.py custom_state_dict): `diff`, and `diff_b` where the layer
    has a bias."""
    parts = {"diff": _randn(rng, *shape, scale=0.05)}
    if bias:
        parts["diff_b"] = _randn(rng, shape[0], scale=0.05)
    return parts


def kohya_unet_sd1(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def kohya_te_sd1(path: str) -> str:
    return "lora_te_text_model_" + path.replace(".", "_")


def write(path: Path, layers: dict[str, Parts], metadata: dict[str, str] | None = None) -> Path:
    """A file of `<layer key>.<part>` tensors (kohya/LyCORIS) or the given full names (PEFT)."""
    state = {f"{key}.{part}": value.contiguous() for key, parts in layers.items() for part, value in parts.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def kohya_to_peft(
    layers: dict[str, Parts], names: dict[str, tuple[str, str]], alpha: float, rank: int
) -> tuple[dict[str, Parts], dict[str, str]]:
    """The same LoRA in diffusers/PEFT layout: `names` maps a kohya key to (component, diffusers path)."""
    peft: dict[str, Parts] = {}
    for key, parts in layers.items():
        component, path = names[key]
        peft[f"{component}.{path}"] = {"lora_A.weight": parts["lora_down.weight"], "lora_B.weight": parts["lora_up.weight"]}
        if "magnitude" in parts:  # DoRA as PEFT saves it: the magnitude of each output row
            peft[f"{component}.{path}"]["lora_magnitude_vector"] = parts["magnitude"]
    components = {component for component, _ in names.values()}
    config = {f"{c}.{k}": v for c in components for k, v in (("lora_alpha", alpha), ("r", rank))}
    return peft, {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
