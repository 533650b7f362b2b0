"""VAEs, LoRAs and embeddings on a resident pipeline: loaded once, switched between batches.

The base pipeline never reloads. A LoRA file is read once; switching hooks its
low-rank updates into the UNet and text encoder forward (`workers/lora.py`), never
into the weights, so a batch after a switch renders what a fresh process would.
Alternate VAEs are kept beside the model's own. Every file is found on this machine
(at its path, or under GRIDRENDER_LORA_DIR / GRIDRENDER_MODEL_DIR) and must hash to
the submitted sha256.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gridrender.scheduler.components import Component
from gridrender.scheduler.errors import ModelError
from gridrender.scheduler.models import file_sha256, folder_sha256
from gridrender.scheduler.settings import Settings

from . import lora
from .clip import EMBEDDING_KEYS

log = logging.getLogger(__name__)


def local_file(component: Component, settings: Settings | None = None) -> Path:
    """The component on this machine; a file that hashes differently is an error, never used."""
    settings = settings or Settings()
    path = Path(component.location)
    if not path.exists():
        base = settings.lora_dir if component.kind == "lora" else settings.model_dir
        candidate = Path(base).expanduser() / Path(component.location).name if base else None
        if candidate is None or not candidate.exists():
            raise ModelError(f"{component.kind} {component.source!r} is not on this worker ({component.location})")
        path = candidate
    digest = folder_sha256(path) if path.is_dir() else file_sha256(path)
    if component.sha256 and digest != component.sha256:
        raise ModelError(f"{component.kind} {component.source!r} on this worker ({path}) is not the submitted one: "
                         f"sha256 {digest} != {component.sha256}")
    return path


@dataclass
class Extras:
    """What a resident pipeline carries beside its own weights."""

    loras: dict[str, dict] = field(default_factory=dict)  # LoRA sha256 -> its per-layer updates
    hooks: lora.Hooks = field(default_factory=lora.Hooks)
    active: tuple = ()  # ((sha256, weight), ...) hooked in now
    vaes: dict[str, Any] = field(default_factory=dict)  # VAE identity -> AutoencoderKL
    vectors: dict[str, Any] = field(default_factory=dict)  # embedding sha256 -> (n, width), or SDXL's per encoder
    fp32_vaes: dict[str, Any] = field(default_factory=dict)  # float32 copies for decodes that overflowed


def use_loras(pipe: Any, extras: Extras, loras: tuple) -> None:
    """Apply exactly these (LoRA, weight) pairs to the UNet and the text encoder; () for none."""
    key = tuple((c.sha256, w) for c, w in loras)
    if key == extras.active:
        return
    for component, _ in loras:
        if component.sha256 not in extras.loras:
            try:
                extras.loras[component.sha256] = lora.load(local_file(component), pipe.unet, pipe.text_encoder)
            except ValueError as exc:
                raise ModelError(f"LoRA {component.name!r} does not fit the model: {exc}") from None
            log.info("LoRA %s loaded (%d layers)", component.name, len(extras.loras[component.sha256]))
    extras.hooks.apply({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                       [(extras.loras[c.sha256], w) for c, w in loras])
    extras.active = key


def vae_for(pipe: Any, extras: Extras, component: Component | None, config_folder: Callable[[], Path],
            keep: int = 2) -> Any:
    """The AutoencoderKL to decode with: the model's own, or a VAE loaded once and kept.

    `config_folder` gives the model's VAE config, which a single-file VAE is loaded with.
    """
    if component is None:
        return pipe.vae
    key = str(component.identity())
    if key not in extras.vaes:
        from diffusers import AutoencoderKL

        dtype = pipe.unet.dtype
        own_config = True  # a single file's config is the model's VAE config, not the file's own say
        if component.sha256 is None:  # a hub VAE, pinned to its resolved commit
            vae = AutoencoderKL.from_pretrained(component.location, revision=component.revision, torch_dtype=dtype)
        else:
            path = local_file(component)
            if path.is_dir():
                vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
            else:
                vae = AutoencoderKL.from_single_file(str(path), config=str(config_folder()), torch_dtype=dtype,
                                                     local_files_only=True)
                own_config = False
        # A folder's force_upcast is the VAE's own word (the fp16-fix VAE says false). A single file
        # says nothing: it decodes in the model's dtype, as in A1111, and a NaN/inf decode is redone in fp32.
        upcast_vae(vae, xl=is_xl(pipe) and own_config)
        while len(extras.vaes) >= keep:
            extras.vaes.pop(next(iter(extras.vaes)))
        extras.vaes[key] = vae.to(pipe.vae.device)
        log.info("VAE %s loaded (%s)", component.name, vae.dtype)
    return extras.vaes[key]


def is_xl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def upcast_vae(vae: Any, xl: bool) -> None:
    """An SDXL VAE whose config says `force_upcast` (SDXL's overflows in fp16) decodes in float32.

    Only StableDiffusionXLPipeline reads force_upcast; StableDiffusionPipeline never does, and
    AutoencoderKL defaults it to True, so every SD 1.x VAE config would "say" it. SD 1.x decodes
    in the model's dtype, as diffusers and A1111 (fp16 unless --no-half-vae) do.
    """
    if xl and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)


def fp32_vae(extras: Extras, vae: Any, component: Component | None) -> Any:
    """A float32 copy of `vae`, made once, for decodes that overflowed in half precision."""
    if vae.dtype == torch.float32:
        return vae
    key = str(component.identity()) if component else "model"
    if key not in extras.fp32_vaes:
        import copy

        extras.fp32_vaes[key] = copy.deepcopy(vae).to(torch.float32)
    return extras.fp32_vaes[key]


def embedding_vectors(extras: Extras, component: Component) -> Any:
    """An embedding's vectors, (n, width), from A1111's .safetensors/.pt/.bin formats.

    An SDXL embedding holds one tensor per encoder, `clip_l` and `clip_g`: then a dict of both.
    """
    key = component.sha256 or component.location
    if key not in extras.vectors:
        path = local_file(component)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in EMBEDDING_KEYS):
            extras.vectors[key] = {k: data[k].reshape(-1, data[k].shape[-1]).float() for k in EMBEDDING_KEYS}
            return extras.vectors[key]
        tensor = _the_tensor(data)
        if tensor is None:
            raise ModelError(f"embedding {component.name!r} ({path}) holds no embedding vectors")
        extras.vectors[key] = tensor.reshape(-1, tensor.shape[-1]).float()
    return extras.vectors[key]


def _the_tensor(data: Any) -> torch.Tensor | None:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, dict):
        if "string_to_param" in data:  # A1111's .pt
            return _the_tensor(next(iter(data["string_to_param"].values())))
        if "emb_params" in data:
            return data["emb_params"]
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    return None
