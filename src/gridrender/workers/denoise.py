"""The denoising loop of one batch, for both sampler families.

- A1111 names: k-diffusion's CompVisDenoiser around the UNet (continuous timesteps,
  c_in = 1/sqrt(sigma^2 + 1), denoised = x - sigma * eps), or for a v-prediction
  model its CompVisVDenoiser (denoised = v * -sigma/sqrt(sigma^2 + 1) + x/(sigma^2 + 1)),
  as A1111 picks by the model's parameterization; classifier-free guidance
  on the denoised latents as A1111's CFGDenoiser does (cond and uncond in one UNet
  call when their lengths match, else one call each), a sampler from `ksampling`,
  latents in float32 whatever the UNet's dtype.
- diffusers class names: the class on the model's own config, stepped exactly as
  StableDiffusionPipeline steps it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gridrender.scheduler import samplers

from . import ksampling
from .conditioning import Conditioning
from .noise import BatchNoise
from .sigmas import ModelSigmas, sigmas_for


@dataclass
class Guided:
    """The UNet with a batch's conditioning: its output for cond and uncond at once."""

    unet: Callable[..., Any]  # the UNet's forward, compiled or not
    cond: Conditioning  # in the UNet's dtype
    uncond: Conditioning
    uncond_first: bool  # diffusers' pipelines stack [uncond, cond]; A1111 stacks [cond, uncond]

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output for cond, output for uncond) of model input `x` at timesteps `t` (one per cell)."""
        x = x.to(self.cond.dtype)
        if self.cond.length != self.uncond.length:
            # Conditionings of different lengths cannot share a call (A1111's default: no padding).
            return self.once(x, t, self.cond), self.once(x, t, self.uncond)
        first, second = (self.uncond, self.cond) if self.uncond_first else (self.cond, self.uncond)
        out = self.once(torch.cat([x, x]), torch.cat([t, t]), first.cat(second))
        a, b = out.chunk(2)
        return (b, a) if self.uncond_first else (a, b)

    def once(self, x: torch.Tensor, t: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        out: torch.Tensor = self.unet(x, t, **conditioning.unet_kwargs(), return_dict=False)[0]
        return out


@dataclass
class Img2Img:
    """Where an img2img pass starts: A1111's sample_img2img on VAE-encoded (or upscaled) latents."""

    latents: torch.Tensor  # (B, C, h, w) float32: the encoded init images, or the upscaled first pass
    denoise: float  # A1111's denoising strength, in (0, 1]
    steps: int | None = None  # hires fix: the pass's own steps (setup_img2img_steps' fixed-steps branch)


def img2img_steps(steps: int, denoise: float, fixed: int | None) -> tuple[int, int]:
    """(steps of the full schedule, t_enc): A1111's sd_samplers_common.setup_img2img_steps.

    A hires pass passes its steps (fixed): the schedule is stretched so that exactly those
    steps remain; img2img (img2img_fix_steps off, A1111's default) runs int(denoise * steps)+1.
    """
    if fixed is not None:
        return int(fixed / min(denoise, 0.999)), fixed - 1
    return steps, int(min(denoise, 0.999) * steps)


# Too many arguments: render.py calls it positionally; a parameter object follows render.py's rewrite.
def a1111_sample(  # noqa: PLR0913, PLR0917
    guided: Guided,
    model_sigmas: ModelSigmas,
    name: str,
    schedule: str,
    steps: int,
    scale: float,
    noise: BatchNoise,
    seeds: list[int],
    start: Img2Img | None = None,
    v_prediction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, sigmas run) of an A1111 sampler; `noise` is the batch's generators (first draw: initial noise).

    The sigmas stay on the CPU, as A1111 keeps them; latents are float32 on the noise's device.
    """
    sampler = samplers.lookup(name)
    total, t_enc = img2img_steps(steps, start.denoise, start.steps) if start else (steps, steps - 1)
    sigmas = sigmas_for(schedule, total, model_sigmas, sampler.discard_penultimate_sigma)
    run = sigmas[total - t_enc - 1 :] if start else sigmas

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None, None, None]
        t = model_sigmas.sigma_to_t(sigma)
        out_cond, out_uncond = guided(x * c_in, t)
        if v_prediction:  # k-diffusion's DiscreteVDDPMDenoiser, sigma_data 1
            c_skip = (1 / (sigma**2 + 1))[:, None, None, None]
            c_out = (-sigma / (sigma**2 + 1) ** 0.5)[:, None, None, None]
            cond, uncond = out_cond.float() * c_out + x * c_skip, out_uncond.float() * c_out + x * c_skip
        else:  # DiscreteEpsDDPMDenoiser
            c_out = -sigma[:, None, None, None]
            cond, uncond = x + out_cond.float() * c_out, x + out_uncond.float() * c_out
        return uncond + (cond - uncond) * scale

    first = noise.next()
    x = first * run[0] if start is None else start.latents.to(first) + first * run[0]
    step_noise: ksampling.Noise = noise
    if sampler.noise == "brownian":  # A1111's create_noise_sampler: over the whole schedule's range
        step_noise = ksampling.CellBrownianNoise(seeds, tuple(first.shape[1:]), sigmas, first.device, noise.source)
    options = ksampling.Options(**sampler.options)
    return ksampling.FUNCTIONS[sampler.function](denoise, x, run, step_noise, options), run


# Too many arguments: render.py calls it positionally; a parameter object follows render.py's rewrite.
# `scheduler`: any diffusers scheduler class; their step() signatures differ (hence Any).
def diffusers_sample(  # noqa: PLR0913, PLR0917
    guided: Guided,
    scheduler: Any,
    steps: int,
    scale: float,
    noise: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """StableDiffusionPipeline's loop: `noise` as its prepare_latents draws it (per-cell generators)."""
    device = noise.device
    scheduler.set_timesteps(steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra: dict[str, Any] = {"generator": generators} if "generator" in step_params else {}
    if "eta" in step_params:
        extra["eta"] = 0.0
    use_cfg = scale > 1
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        ts = t.expand(latents.shape[0]) if t.ndim == 0 else t
        if use_cfg:
            eps_cond, eps_uncond = guided(model_input, ts)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
        else:
            eps = guided.once(model_input.to(guided.cond.dtype), ts, guided.cond)
        latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
    stepped: torch.Tensor = latents
    return stepped
