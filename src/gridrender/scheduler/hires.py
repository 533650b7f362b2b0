"""A1111's hires fix and img2img, as values cells hold: what they mean, without torch.

A1111 reference: modules/processing.py (StableDiffusionProcessingTxt2Img.init,
calculate_target_resolution, sample_hr_pass; StableDiffusionProcessingImg2Img),
modules/shared.py (latent_upscale_modes), modules/images.py (resize_image).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import samplers
from .components import Component

OPT_F = 8  # A1111's opt_f: pixels per latent cell

# shared.latent_upscale_modes: torch.nn.functional.interpolate's mode and antialias per name.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111's built-in pixel upscalers (modules/upscaler.py: UpscalerNone, UpscalerLanczos, UpscalerNearest).
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
MODEL_SUFFIXES = (".pth", ".pt", ".safetensors")  # ESRGAN-family files, loaded with spandrel


def upscaler_names() -> list[str]:
    return [*LATENT_MODES, *PIXEL_UPSCALERS, "<an ESRGAN-family model file: .pth or .safetensors>"]


def is_model_file(upscaler: str) -> bool:
    return upscaler.endswith(MODEL_SUFFIXES)


@dataclass(frozen=True)
class Target:
    """calculate_target_resolution: the upscaled size, and what is cut from the latent after."""

    width: int  # hr_upscale_to_x
    height: int  # hr_upscale_to_y
    truncate_x: int = 0
    truncate_y: int = 0

    @property
    def final(self) -> tuple[int, int]:
        """The image's size after the second pass (the truncated latent, in pixels)."""
        lw, lh = self.width // OPT_F, self.height // OPT_F
        return (
            (lw - (self.truncate_x // 2) - (self.truncate_x + 1) // 2) * OPT_F,
            (lh - (self.truncate_y // 2) - (self.truncate_y + 1) // 2) * OPT_F,
        )


@dataclass(frozen=True)
class Hires:
    """One hires-fix setting of a cell (A1111's enable_hr with its hr_* fields), resolved."""

    upscaler: str  # a LATENT_MODES or PIXEL_UPSCALERS name, or the model file's name (stem)
    denoise: float
    steps: int = 0  # 0: the first pass's steps
    scale: float = 2.0  # used when resize is 0x0
    resize_x: int = 0
    resize_y: int = 0
    sampler: str | None = None  # canonical A1111 name; None: the first pass's sampler
    schedule: str | None = None  # resolved label (A1111's hr_scheduler, "Automatic" resolved against the sampler)
    prompt: str | None = None  # None: the cell's prompt
    model: Component | None = None  # an ESRGAN-family upscaler's file

    def target(self, width: int, height: int) -> Target:
        """A1111's calculate_target_resolution for a first pass of width x height."""
        if self.resize_x == 0 and self.resize_y == 0:
            return Target(int(width * self.scale), int(height * self.scale))
        if self.resize_y == 0:
            return Target(self.resize_x, self.resize_x * height // width)
        if self.resize_x == 0:
            return Target(self.resize_y * width // height, self.resize_y)
        if width / height < self.resize_x / self.resize_y:
            to_x, to_y = self.resize_x, self.resize_x * height // width
        else:
            to_x, to_y = self.resize_y * width // height, self.resize_y
        return Target(to_x, to_y, (to_x - self.resize_x) // OPT_F, (to_y - self.resize_y) // OPT_F)

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        return LATENT_MODES.get(self.upscaler)

    def infotext(self, sampler: str, schedule: str, prompt: str, hires_prompt: str | None = None) -> dict[str, object]:
        """The fields A1111 writes for it (StableDiffusionProcessingTxt2Img.init and get_sigmas).

        `prompt` and `hires_prompt` as rendered (Prompt S/R applied); "Hires prompt" only where they differ.
        """
        fields: dict[str, object] = {"Denoising strength": f"{self.denoise:g}"}
        if self.sampler and self.sampler != sampler:
            fields["Hires sampler"] = self.sampler
        if hires_prompt is not None and hires_prompt != prompt:
            fields["Hires prompt"] = hires_prompt
        # With a hires sampler of its own, its schedule is written even when it is the first pass's: a text
        # without it means "Use same scheduler", which A1111's paste (and `gridrender import`) resolve from
        # the Automatic setting ("DPM++ 2M, Karras, Hires sampler: Euler" runs Euler with Uniform).
        if self.schedule and (self.schedule != schedule or "Hires sampler" in fields):
            fields["Hires schedule type"] = self.schedule
        if self.resize_x == 0 and self.resize_y == 0:
            fields["Hires upscale"] = f"{self.scale:g}"
        else:
            fields["Hires resize"] = f"{self.resize_x}x{self.resize_y}"
        if self.steps:
            fields["Hires steps"] = self.steps
        fields["Hires upscaler"] = self.upscaler
        return fields

    def identity(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "model"}
        if self.model is not None:
            data["model"] = self.model.identity()
        return data

    def public(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k != "model"}
        if self.model is not None:
            data["model"] = self.model.source
        return data

    def label(self) -> str:
        size = f"x{self.scale:g}" if not (self.resize_x or self.resize_y) else f"{self.resize_x}x{self.resize_y}"
        parts = [size, self.upscaler, f"{self.denoise:g}"]
        if self.steps:
            parts.append(f"{self.steps} steps")
        if self.sampler:
            parts.append(self.sampler)
        if self.prompt is not None:
            parts.append(repr(self.prompt[:20]))
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_dict() if self.model else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hires:
        model = Component.from_dict(data["model"]) if data.get("model") else None
        return cls(**{**data, "model": model})

    def resolved(self, sampler: str, schedule: str) -> Hires:
        """The hires sampler and schedule as A1111 runs them: hr_scheduler None takes the first
        pass's schedule *setting*, which Automatic resolves against the hires sampler."""
        first_base, first_implied = samplers.split_name(sampler)
        setting = first_implied.label if first_implied else schedule  # p.scheduler after fix_p_invalid_...
        base, implied = samplers.split_name(self.sampler or first_base.name)
        wanted = self.schedule or (implied.label if implied else setting)
        canonical_sampler, canonical_schedule = samplers.canonical(base.name, wanted)
        first_sampler, first_schedule = samplers.canonical(sampler, schedule)
        return Hires(
            self.upscaler,
            self.denoise,
            self.steps,
            self.scale,
            self.resize_x,
            self.resize_y,
            None if canonical_sampler == first_sampler else canonical_sampler,
            None if canonical_schedule == first_schedule and canonical_sampler == first_sampler else canonical_schedule,
            self.prompt,
            self.model,
        )


@dataclass(frozen=True)
class InitImage:
    """An img2img init image: where it lies (a file or an s3:// URL) and its sha256."""

    source: str  # as written in the job file
    location: str  # absolute path, or s3:// URL
    sha256: str

    @property
    def name(self) -> str:
        return Path(self.source.rstrip("/")).name

    def identity(self) -> dict[str, str]:
        return {"kind": "init_image", "sha256": self.sha256}

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> InitImage:
        return cls(**data)

    def short_hash(self) -> str:
        return self.sha256[:10]


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
