"""A1111's samplers: k-diffusion's sampling functions, with A1111's per-cell noise.

Ported from k-diffusion (k_diffusion/sampling.py, MIT), step for step, with the
options A1111 passes by default (eta 1, s_churn 0, s_noise 1). k-diffusion itself
is not a dependency: its package imports training extras (wandb, clean-fid, ...)
that a render worker has no use for. `tests/test_a1111.py` checks every function
here against k-diffusion's own.

The one difference is where noise comes from, which is A1111's too: every draw of
a cell comes from that cell's own generator (ancestral samplers: `noise.BatchNoise`),
or from a Brownian tree seeded with the cell's seed (SDE samplers), so a cell's
image does not depend on the batch it is rendered in.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torchsde
from scipy import integrate

from .noise import brownian_draws

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma per cell) -> denoised x
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, sigma_next) -> unit noise like x


@dataclass(frozen=True)
class Options:
    """k-diffusion's sampler options, at the values A1111 passes by default; each function reads its own."""

    eta: float = 1.0  # ancestral and SDE samplers: how much of each step is new noise
    s_noise: float = 1.0
    r: float = 1 / 2  # DPM++ SDE: where its intermediate step lies
    solver_type: str = "midpoint"  # DPM++ 2M SDE: "midpoint" or "heun"
    order: int = 4  # LMS


A1111_OPTIONS = Options()
# Every function takes (denoiser, x, sigmas, noise, options): deterministic ones ignore the noise.
Sampling = Callable[[Denoiser, torch.Tensor, torch.Tensor, Noise, Options], torch.Tensor]


class CellBrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler with one tree per cell seeded by its seed, as A1111 builds it.

    The trees live on the CPU and their node draws come from the cell's random-number
    source, as A1111's patch of torchsde makes them: a seed means the same noise on any device.
    """

    def __init__(self, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor, device: torch.device, source: str = "CPU"):
        sigmas = sigmas.cpu()
        t0, t1, self.sign = _sort(sigmas[sigmas > 0].min(), sigmas.max())
        w0 = torch.zeros(shape)
        self.source = source
        with brownian_draws(source):
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in seeds]
        self.device = device

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma).cpu(), torch.as_tensor(sigma_next).cpu()
        a, b, sign = _sort(t0, t1)
        with warnings.catch_warnings(), brownian_draws(self.source):
            # torchsde notes float32 sigmas a hair outside its float64 interval ("Should have ta>=t0");
            # k-diffusion and A1111 query it the same way, the noise is the same.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            w = torch.stack([tree(a, b) for tree in self.trees]) * (self.sign * sign)
        return (w / (t1 - t0).abs().sqrt()).to(self.device)


def _sort(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The Karras ODE derivative."""
    return (x - denoised) / sigma.reshape(-1, *([1] * (x.ndim - 1))) if sigma.ndim else (x - denoised) / sigma


def ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(sigma_down, sigma_up): where to step deterministically, and how much noise to add."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, _noise: Noise | None = None, _options: Options = A1111_OPTIONS
) -> torch.Tensor:
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise = options.eta, options.s_noise
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, _noise: Noise | None = None, _options: Options = A1111_OPTIONS
) -> torch.Tensor:
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, _noise: Noise | None = None, _options: Options = A1111_OPTIONS
) -> torch.Tensor:
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise = options.eta, options.s_noise
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def _lms_coefficient(order: int, t: npt.NDArray[np.floating[Any]], i: int, j: int) -> float:
    def fn(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if j == k:
                continue
            prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return float(integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0])


@torch.no_grad()
def sample_lms(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, _noise: Noise | None = None, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    order = options.order
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds), strict=True))
    return x


def _sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise = options.eta, options.s_noise
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h * r).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise, r = options.eta, options.s_noise, options.r
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
            s_ = _t_fn(sd)
            x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise(_sigma_fn(t), _sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, _sigma_fn(s) * s_in)
            sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
            t_next_ = _t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise(_sigma_fn(t), _sigma_fn(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, _noise: Noise | None = None, _options: Options = A1111_OPTIONS
) -> torch.Tensor:
    s_in = x.new_ones([x.shape[0]])
    old_denoised: Any = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - _t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise, solver_type = options.eta, options.s_noise, options.solver_type
    s_in = x.new_ones([x.shape[0]])
    old_denoised: Any = None  # the previous steps' values; None until there is one
    h_last: Any = None
    h: Any = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, noise: Noise, options: Options = A1111_OPTIONS
) -> torch.Tensor:
    eta, s_noise = options.eta, options.s_noise
    s_in = x.new_ones([x.shape[0]])
    denoised_1: Any = None  # the previous steps' values; None until there are some
    denoised_2: Any = None
    h: Any = None
    h_1: Any = None
    h_2: Any = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


FUNCTIONS: dict[str, Sampling] = {
    f.__name__: f
    for f in (
        sample_euler,
        sample_euler_ancestral,
        sample_heun,
        sample_dpm_2,
        sample_dpm_2_ancestral,
        sample_lms,
        sample_dpmpp_2s_ancestral,
        sample_dpmpp_sde,
        sample_dpmpp_2m,
        sample_dpmpp_2m_sde,
        sample_dpmpp_3m_sde,
    )
}
