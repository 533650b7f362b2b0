"""Which Stable Diffusion family a model is, read from its files, never from its name.

A single file in the original (LDM/sgm) layout says it by its tensor names: SD 1.x keeps
CLIP under `cond_stage_model.transformer.`, SD 2.x OpenCLIP under `cond_stage_model.model.`,
SDXL two encoders under `conditioner.embedders.0.transformer.` (CLIP-L) and
`conditioner.embedders.1.model.` (OpenCLIP bigG); the SDXL refiner has only the OpenCLIP
one, as `conditioner.embedders.0.model.`. SD3 and Flux are transformers (`joint_blocks`,
`double_blocks`). A diffusers folder says it in model_index.json.

v-prediction and zero terminal SNR: NoobAI-XL v-pred files carry empty `v_pred` and
`ztsnr` tensors (read by A1111's dev branch, Forge and ComfyUI); a folder's scheduler
config says `prediction_type` and `rescale_betas_zero_snr`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ModelInputError

SD1, SDXL = "sd1", "sdxl"
EPSILON, V_PREDICTION = "epsilon", "v_prediction"
PREDICTIONS = (EPSILON, V_PREDICTION)
AUTO = "auto"
DEFAULT_SCHEDULE, ZERO_TERMINAL_SNR = "Default", "Zero Terminal SNR"  # A1111's "Noise schedule" setting

SD1_TEXT = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
XL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
XL_CLIP_G = "conditioner.embedders.1.model."
REFINER_CLIP_G = "conditioner.embedders.0.model."
UNET = "model.diffusion_model."
PIPELINES = {"StableDiffusionPipeline": SD1, "StableDiffusionXLPipeline": SDXL}


@dataclass(frozen=True)
class Prediction:
    """What the UNet predicts and on which noise schedule, as the files say it."""

    prediction: str = EPSILON
    zero_terminal_snr: bool = False


class _Keys:
    """A checkpoint's tensor names, asked by prefix."""

    def __init__(self, shapes: Mapping[str, Any]):
        self.shapes = shapes

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    def match(self, pattern: str) -> bool:
        return any(re.match(pattern, k) for k in self.shapes)


_LATENT_CHANNELS = (0, 4)  # a text-to-image UNet's input channels (0: the file does not say)
_OTHER_INPUTS = {9: "an inpainting", 8: "an instruct-pix2pix"}  # A1111's sd_models_config


def checkpoint_family(shapes: Mapping[str, Any]) -> str:
    """SD1 or SDXL for an original-layout checkpoint; anything else is bad input that says what it is."""
    keys = _Keys(shapes)
    _reject_other_architectures(keys)
    if keys.has("conditioner.embedders."):
        if not (keys.has(XL_CLIP_L) and keys.has(XL_CLIP_G)):
            raise ModelInputError(
                f"is an SDXL-style checkpoint without both text encoders ('{XL_CLIP_L}' CLIP-L and '{XL_CLIP_G}' OpenCLIP bigG)"
            )
        if not keys.has(UNET):
            raise ModelInputError("is an SDXL text-encoder file without UNet weights ('model.diffusion_model.')")
        return SDXL
    if keys.has("cond_stage_model.model."):
        raise ModelInputError(
            "is an SD 2.x checkpoint (OpenCLIP text encoder, key 'cond_stage_model.model.'); "
            "gridrender renders SD 1.x and SDXL-family checkpoints"
        )
    if not keys.has(UNET):
        if any("lora" in k for k in shapes):
            raise ModelInputError("is a LoRA, not a model (use it under `loras:`)")
        raise ModelInputError("is not a Stable Diffusion checkpoint (it has no UNet weights, 'model.diffusion_model.')")
    if not keys.has(SD1_TEXT[1]):
        raise ModelInputError("is a checkpoint without a CLIP text encoder ('cond_stage_model.transformer.')")
    return SD1


def _reject_other_architectures(keys: _Keys) -> None:
    """SD3, Flux, the SDXL refiner, inpainting and instruct-pix2pix checkpoints: named, refused."""
    if keys.has(UNET + "joint_blocks.") or keys.has(UNET + "x_embedder.") or keys.has("joint_blocks."):
        raise ModelInputError(
            "is an SD3 checkpoint (an MMDiT transformer, key 'joint_blocks.'); "
            "gridrender renders SD 1.x and SDXL-family checkpoints"
        )
    if keys.match(r"^(model\.diffusion_model\.)?(double_blocks|single_blocks)\."):
        raise ModelInputError(
            "is a Flux checkpoint (key 'double_blocks.'); gridrender renders SD 1.x and SDXL-family checkpoints"
        )
    if keys.has(REFINER_CLIP_G) and not keys.has(XL_CLIP_G):
        raise ModelInputError(
            "is an SDXL refiner (one OpenCLIP encoder, 'conditioner.embedders.0.model.', and "
            "aesthetic-score conditioning); gridrender renders SDXL base-family checkpoints "
            "(SDXL, Pony, Illustrious, NoobAI), not the refiner"
        )
    in_channels = keys.shapes.get(UNET + "input_blocks.0.0.weight", [0, 0])
    if len(in_channels) > 1 and in_channels[1] not in _LATENT_CHANNELS:
        kind = _OTHER_INPUTS.get(int(in_channels[1]), "a")
        raise ModelInputError(
            f"is {kind} checkpoint (its UNet takes {in_channels[1]} input channels, key "
            f"'{UNET}input_blocks.0.0.weight'); gridrender renders text-to-image checkpoints "
            "(4 latent channels)"
        )


def checkpoint_prediction(shapes: Mapping[str, Any]) -> Prediction:
    """NoobAI-XL's marker tensors, as A1111's dev branch and Forge read them."""
    v = "v_pred" in shapes
    return Prediction(V_PREDICTION if v else EPSILON, "ztsnr" in shapes)


def encoder_layers(shapes: Mapping[str, Any], prefix: str, pattern: str) -> int:
    """How many transformer layers an encoder of the checkpoint has."""
    found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + pattern, k))}
    return max(found) + 1 if found else 0


def xl_encoders(shapes: Mapping[str, Any]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, layers) of CLIP-L, (width, layers) of OpenCLIP bigG) of an SDXL checkpoint."""
    l_width = shapes.get(XL_CLIP_L + "embeddings.token_embedding.weight", [0, 0])[1]
    g_width = shapes.get(XL_CLIP_G + "token_embedding.weight", [0, 0])[1]
    return (
        (int(l_width), encoder_layers(shapes, XL_CLIP_L, r"encoder\.layers\.(\d+)\.")),
        (int(g_width), encoder_layers(shapes, XL_CLIP_G, r"transformer\.resblocks\.(\d+)\.")),
    )


def folder_family(index: Mapping[str, Any], source: str) -> str:
    """SD1 or SDXL from a diffusers model_index.json; other pipelines are bad input."""
    name = str(index.get("_class_name", ""))
    if name in ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline") and not _component(index, "text_encoder"):
        raise ModelInputError(
            f"{source!r} is an SDXL refiner ({name} without `text_encoder`); gridrender renders "
            "SDXL base-family models, not the refiner"
        )
    if name.startswith(("StableDiffusion3", "Flux")):
        raise ModelInputError(f"{source!r} is a {name} (a transformer model); gridrender renders SD 1.x and SDXL-family models")
    family = PIPELINES.get(name)
    if family is None and name.startswith("StableDiffusionXL"):
        family = SDXL
    return family or SD1


def _component(index: Mapping[str, Any], name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and value[0] is not None


def scheduler_prediction(config: Mapping[str, Any]) -> Prediction:
    """A folder's scheduler config: `prediction_type` and `rescale_betas_zero_snr`."""
    prediction = str(config.get("prediction_type") or EPSILON)
    return Prediction(prediction if prediction in PREDICTIONS else EPSILON, bool(config.get("rescale_betas_zero_snr")))


def overridden(found: Prediction, prediction: str = AUTO, noise_schedule: str = AUTO) -> Prediction:
    """The job's `prediction:` / `noise_schedule:` keys over what the files say (`auto` keeps it)."""
    return Prediction(
        found.prediction if prediction == AUTO else prediction,
        found.zero_terminal_snr if noise_schedule == AUTO else noise_schedule == ZERO_TERMINAL_SNR,
    )
