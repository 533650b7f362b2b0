"""Noise levels as A1111 computes them: k-diffusion's discretization of the model's own sigmas.

`ModelSigmas` is k-diffusion's CompVisDenoiser schedule: sigma_i = sqrt((1 - a_i) / a_i)
over the model's `alphas_cumprod`, with continuous timesteps between them (A1111's
"quantization" option is off by default). The schedule functions are A1111's
(modules/sd_schedulers.py) with its default options.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

# A1111's "Align Your Steps" noise levels (NVIDIA's published 10-step schedules; sd_schedulers.py
# get_align_your_steps_sigmas picks SDXL's when shared.sd_model.is_sdxl, else SD 1.5's).
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
BETA_ALPHA = BETA_BETA = 0.6  # A1111's beta_dist_alpha / beta_dist_beta defaults


def alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """The model's training noise schedule from its scheduler config, as LDM computes it (float64, then float32)."""
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif config.get("beta_schedule", "linear") == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    elif config.get("beta_schedule", "linear") == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], steps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule {config.get('beta_schedule')!r} is not one A1111's samplers know")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


# A1111's last alphas_cumprod of a zero-terminal-SNR schedule: not 0, which would make sigma infinite.
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def rescale_zero_terminal_snr(cumprod: torch.Tensor) -> torch.Tensor:
    """A1111's rescale_zero_terminal_snr_abar (Lin et al. 2023), in the schedule's own float32.

    Shift sqrt(alphas_cumprod) so the last step is 0, rescale so the first keeps its
    value, and set the last alphas_cumprod to ZTSNR_LAST_ALPHA_BAR (sigma_max ~ 4500).
    """
    root = cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    rescaled = root**2
    rescaled[-1] = ZTSNR_LAST_ALPHA_BAR
    return rescaled


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


class ModelSigmas:
    """k-diffusion's DiscreteSchedule over the model's sigmas (CPU, float32); `xl`: an SDXL-family model."""

    def __init__(self, cumprod: torch.Tensor, xl: bool = False):
        self.sigmas = ((1 - cumprod) / cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.xl = xl

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def uniform(self, n: int) -> torch.Tensor:
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def sgm_uniform(n: int, model: ModelSigmas) -> torch.Tensor:
    start = model.sigma_to_t(torch.tensor(model.sigma_max))
    end = model.sigma_to_t(torch.tensor(model.sigma_min))
    sigmas = [model.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor([*sigmas, 0.0])


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
    steps = torch.arange(n + 1)
    return torch.tan(steps / n * alpha_min + (1.0 - steps / n) * alpha_max)


def align_your_steps(n: int, xl: bool = False) -> torch.Tensor:
    sigmas = list(AYS_SDXL if xl else AYS_SD15)
    if n != len(sigmas):
        xs, ys = np.linspace(0, 1, len(sigmas)), np.log(sigmas[::-1])
        interpolated = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
        return torch.FloatTensor(np.append(interpolated, [0.0]))
    return torch.FloatTensor([*sigmas, 0.0])


def simple(n: int, model: ModelSigmas) -> torch.Tensor:
    stride = len(model.sigmas) / n
    return torch.FloatTensor([float(model.sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0])


def normal(n: int, model: ModelSigmas) -> torch.Tensor:
    start = model.sigma_to_t(torch.tensor(model.sigma_max))
    end = model.sigma_to_t(torch.tensor(model.sigma_min))
    return torch.FloatTensor([model.t_to_sigma(t) for t in torch.linspace(start, end, n)] + [0.0])


def ddim(n: int, model: ModelSigmas) -> torch.Tensor:
    stride = max(len(model.sigmas) // n, 1)
    sigmas = [float(model.sigmas[x]) for x in range(1, len(model.sigmas), stride)]
    return torch.FloatTensor([*sigmas[::-1], 0.0])


def beta(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    from scipy import stats

    timesteps = [stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([sigma_min + x * (sigma_max - sigma_min) for x in timesteps] + [0.0])


def sigmas_for(schedule: str, steps: int, model: ModelSigmas, discard_penultimate: bool = False) -> torch.Tensor:
    """The noise levels of one render: `steps` + 1 values ending in 0, as A1111's get_sigmas."""
    n = steps + 1 if discard_penultimate else steps
    lo, hi = model.sigma_min, model.sigma_max
    table = {
        "Uniform": lambda: model.uniform(n),
        "Karras": lambda: karras(n, lo, hi),
        "Exponential": lambda: exponential(n, lo, hi),
        "Polyexponential": lambda: polyexponential(n, lo, hi),
        "SGM Uniform": lambda: sgm_uniform(n, model),
        "KL Optimal": lambda: kl_optimal(n, lo, hi),
        "Align Your Steps": lambda: align_your_steps(n, model.xl),
        "Simple": lambda: simple(n, model),
        "Normal": lambda: normal(n, model),
        "DDIM": lambda: ddim(n, model),
        "Beta": lambda: beta(n, lo, hi),
    }
    if schedule not in table:
        raise ValueError(f"no schedule {schedule!r}")
    sigmas = table[schedule]()
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas
