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
        return self.unet(x, t, **conditioning.unet_kwargs(), return_dict=False)[0]


def a1111_sample(guided: Guided, model_sigmas: ModelSigmas, name: str, schedule: str, steps: int, scale: float,
                 noise: torch.Tensor, generators: list[torch.Generator], seeds: list[int],
                 v_prediction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, sigmas) of an A1111 sampler; `noise` is the batch's initial unit noise (float32)."""
    sampler = samplers.lookup(name)
    device = noise.device
    sigmas = sigmas_for(schedule, steps, model_sigmas, sampler.discard_penultimate_sigma).to(device)

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

    shape = tuple(noise.shape[1:])
    step_noise: ksampling.Noise
    if sampler.noise == "brownian":
        step_noise = ksampling.CellBrownianNoise(seeds, shape, sigmas, device)
    else:
        step_noise = ksampling.CellNoise(generators, shape, device)
    x = noise * sigmas[0]
    return ksampling.FUNCTIONS[sampler.function](denoise, x, sigmas, step_noise, **sampler.options), sigmas


def diffusers_sample(guided: Guided, scheduler, steps: int, scale: float, noise: torch.Tensor,
                     generators: list[torch.Generator]) -> torch.Tensor:
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
    return latents
