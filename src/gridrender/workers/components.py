"""VAEs, LoRAs and embeddings on a resident pipeline: loaded once, switched between chunks.

The base pipeline never reloads. A LoRA file is read once while it is among the last
few used (its tensors as stored, on the CPU); switching merges the
set's updates into the UNet's and text encoders' weights (`workers/lora.py`), once
per chunk, and puts the base weights back bit for bit when a set no longer needs
them, so a chunk after a switch renders what a fresh process would. Alternate VAEs
are kept beside the model's own. Every file is found on this machine (at its path,
or under GRIDRENDER_LORA_DIR / GRIDRENDER_MODEL_DIR) and must hash to the submitted
sha256.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gridrender.scheduler.components import Component, LoraUse
from gridrender.scheduler.errors import ModelError
from gridrender.scheduler.layers import TEXT, TEXT_2, UNET, LayerTable, layer_table
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.weightfiles import file_sha256, folder_sha256

from . import lora
from .clip import EMBEDDING_KEYS, text_transformer

log = logging.getLogger(__name__)
KEEP_LORAS = 8  # LoRA files kept read beyond the set merged now (a weight axis switches among a few)


def read_checked(component: Component, read: Callable[[Path], Any]) -> Any:
    """`read(path)` of the component's file, its hash checked before and after (it may change meanwhile)."""
    value = read(local_file(component))
    local_file(component)
    return value


def local_file(component: Component, settings: Settings | None = None) -> Path:
    """The component on this machine; a file that hashes differently is an error, never used.

    Checked on every load (hashes are cached per size, mtime, inode and ctime: a stat when unchanged).
    """
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
        raise ModelError(
            f"{component.kind} {component.source!r} on this worker ({path}) is not the submitted one: "
            f"sha256 {digest} != {component.sha256}"
        )
    return path


@dataclass
class Extras:
    """What a resident pipeline carries beside its own weights."""

    loras: dict[str, lora.Network] = field(default_factory=dict)  # LoRA identity -> its modules, most recent last
    merged: lora.Merged = field(default_factory=lora.Merged)  # what is merged into the weights, and the base
    active: tuple[tuple[str, float, float], ...] = ()  # ((LoRA identity, te, unet), ...) merged now
    table: LayerTable | None = None  # the pipeline's layers as A1111 names them
    vaes: dict[str, Any] = field(default_factory=dict)  # VAE identity -> AutoencoderKL
    vectors: dict[str, Any] = field(default_factory=dict)  # embedding sha256 -> (n, width), or SDXL's per encoder
    fp32_vaes: dict[str, Any] = field(default_factory=dict)  # float32 copies for decodes that overflowed
    merge_seconds: float = 0.0  # time spent merging and restoring, for logs and benchmarks


def lora_roots(pipe: Any) -> dict[str, torch.nn.Module]:
    """The modules layer paths are relative to: the UNet and each text encoder's text transformer."""
    roots = {UNET: pipe.unet, TEXT: text_transformer(pipe.text_encoder)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        roots[TEXT_2] = text_transformer(pipe.text_encoder_2)
    return roots


def pipeline_layers(pipe: Any) -> LayerTable:
    """The pipeline's layer table, from its own configs (SD 1.x: one text encoder; SDXL: two)."""
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])
    return layer_table(dict(pipe.unet.config), [e.config.to_dict() for e in encoders])


def use_loras(pipe: Any, extras: Extras, loras: tuple[LoraUse, ...]) -> None:
    """Merge exactly these LoRAs, in order, into the UNet and text encoders; () for the base weights.

    A no-op when the set is the one merged now: a chunk's cells share their LoRAs, so
    a chunk costs at most one merge.
    """
    key = tuple((use.lora.identity_key(), use.te, use.unet) for use in loras)
    if key == extras.active:
        return
    start = time.perf_counter()
    if extras.table is None:
        extras.table = pipeline_layers(pipe)
    for use in loras:
        component = use.lora
        identity = component.identity_key()
        network = extras.loras.pop(identity, None)  # re-inserted: the dict's order is the order of use
        if network is None:
            try:
                network = read_checked(component, functools.partial(lora.load, table=extras.table))
            except ValueError as exc:
                raise ModelError(f"LoRA {component.name!r} does not fit the model: {exc}") from None
            log.info("LoRA %s loaded (%d layers)", component.name, len(network.modules))
        extras.loras[identity] = network
    while len(extras.loras) > max(len(loras), KEEP_LORAS):  # a sweep over many LoRAs keeps a few in memory
        extras.loras.pop(next(iter(extras.loras)))
    networks = [(extras.loras[use.lora.identity_key()], use.te, use.unet) for use in loras]
    extras.active = ()  # what a failed merge leaves: the base weights (Merged.apply restores them)
    written = extras.merged.apply(lora_roots(pipe), networks)
    extras.active = key
    seconds = time.perf_counter() - start
    extras.merge_seconds += seconds
    log.info(
        "LoRA set %s merged: %d layers written in %.3fs",
        ", ".join(f"{u.mention}:{u.te:g}" + (f":{u.unet:g}" if u.unet != u.te else "") for u in loras) or "none",
        written,
        seconds,
    )


def vae_for(pipe: Any, extras: Extras, component: Component | None, config_folder: Callable[[], Path], keep: int = 2) -> Any:
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

            def read(path: Path) -> Any:
                if path.is_dir():
                    return AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
                return AutoencoderKL.from_single_file(
                    str(path), config=str(config_folder()), torch_dtype=dtype, local_files_only=True
                )

            own_config = local_file(component).is_dir()
            vae = read_checked(component, read)
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

        def read(path: Path) -> Any:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)

        data = read_checked(component, read)
        if isinstance(data, dict) and all(isinstance(data.get(k), torch.Tensor) for k in EMBEDDING_KEYS):
            extras.vectors[key] = {k: data[k].reshape(-1, data[k].shape[-1]).float() for k in EMBEDDING_KEYS}
            return extras.vectors[key]
        tensor = _the_tensor(data)
        if tensor is None:
            raise ModelError(f"embedding {component.name!r} ({component.location}) holds no embedding vectors")
        extras.vectors[key] = tensor.reshape(-1, tensor.shape[-1]).float()
    return extras.vectors[key]


def _the_tensor(data: Any) -> torch.Tensor | None:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, dict):
        if "string_to_param" in data:  # A1111's .pt
            return _the_tensor(next(iter(data["string_to_param"].values())))
        if "emb_params" in data:
            params: torch.Tensor = data["emb_params"]
            return params
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    return None
