"""What a cell's record says about how it was sampled: the sampler run, its noise source, token counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from gridrender.scheduler import samplers
from gridrender.scheduler.grid import Cell

from .clip import Encoded
from .pipelines import Loaded

RNG_ALGORITHMS = {
    "GPU": "philox4x32-10 (torch CUDA randn, A1111's NV emulation)",
    "NV": "philox4x32-10 (A1111's NV emulation)",
    "CPU": "torch CPU mt19937",
}


def describe_a1111(loaded: Loaded, first: Cell, name: str, schedule: str, sigmas: torch.Tensor) -> dict[str, Any]:
    """What a record says about an A1111 sampler run (`name`, `schedule`: the pass's): function, options,
    denoiser, noise source (the call's first cell's), sigmas."""
    rng, ensd = first.rng, first.eta_noise_seed_delta
    sampler = samplers.lookup(name)
    denoiser = "CompVisVDenoiser" if loaded.v_prediction else "CompVisDenoiser"
    return {
        "family": "a1111",
        "name": name,
        "schedule": schedule,
        "class": f"k-diffusion:{sampler.function}",
        "semantics": sampler.semantics,
        "config": {
            "discard_penultimate_sigma": sampler.discard_penultimate_sigma,
            "noise": sampler.noise,
            "eta": 1.0 if sampler.noise != "none" else 0.0,
            "s_noise": 1.0,
            **sampler.options,
            "rng": rng,
            "rng_algorithm": RNG_ALGORITHMS[rng],
            "eta_noise_seed_delta": ensd,
            "denoiser": f"k-diffusion:{denoiser}",
            "zero_terminal_snr": loaded.model.zero_terminal_snr,
        },
        "sigmas": [round(float(s), 6) for s in sigmas.cpu()],
    }


RNG_ALGORITHMS = {
    "GPU": "philox4x32-10 (torch CUDA randn, A1111's NV emulation)",
    "NV": "philox4x32-10 (A1111's NV emulation)",
    "CPU": "torch CPU mt19937",
}


def describe_diffusers(first: Cell, scheduler: Any) -> dict[str, Any]:
    """What a record says about a diffusers scheduler run: its class and its config (private keys left out)."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {
        "family": "diffusers",
        "name": first.sampler,
        "schedule": first.schedule,
        "class": type(scheduler).__name__,
        "semantics": samplers.DIFFUSERS_SEMANTICS,
        "config": config,
    }


def token_counts(embeddings: Mapping[tuple[str, int], Encoded], cell: Cell) -> dict[str, dict[str, int]]:
    """A1111's token counts of a cell's two texts, and the 77-token chunks each took."""
    out = {}
    for name, text in (("prompt", cell.text), ("negative_prompt", cell.negative_text)):
        encoded = embeddings[(text, cell.clip_skip)]
        out[name] = {"tokens": encoded.tokens, "chunks": encoded.chunks}
    return out
