"""Every noise draw of a cell, from A1111's random-number sources (modules/rng.py).

- "GPU" (A1111's default) is torch's CUDA generator; "NV" is A1111's emulation of it.
  Both are computed here with `philox.PhiloxGenerator`, on the CPU, so a cell's image
  does not depend on the worker's device. "CPU" is torch's CPU generator.
- `ImageNoise` is one image's part of A1111's ImageRNG: `first()` is the initial noise
  from a generator seeded with the image's seed; after it, a nonzero ENSD
  (eta_noise_seed_delta) reseeds the generator with seed + ENSD, and every later draw
  (`next()`: ancestral samplers' noise, through A1111's TorchHijack of
  k-diffusion's randn_like) comes from that generator.
- SDE samplers' Brownian trees are torchsde's, whose node draws A1111 replaces with
  `randn_local(seed, size)` of the chosen source (sd_samplers_common.replace_torchsde_browinan):
  `brownian_draws` does the same while a tree is built and read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

from gridrender.scheduler.samplers import RNG_SOURCES

from .philox import PhiloxGenerator

Generator = torch.Generator | PhiloxGenerator


def create_generator(source: str, seed: int) -> Generator:
    """A1111's rng.create_generator: a fresh generator of `source` seeded with `seed`."""
    if source == "CPU":
        return torch.Generator("cpu").manual_seed(int(seed))
    if source in ("GPU", "NV"):
        return PhiloxGenerator(int(seed))
    raise ValueError(f"unknown random-number source {source!r}; valid: {', '.join(RNG_SOURCES)}")


def randn(generator: Generator, shape: Sequence[int]) -> torch.Tensor:
    """The generator's next draw of `shape` standard normals, float32 on the CPU."""
    if isinstance(generator, PhiloxGenerator):
        return torch.from_numpy(generator.randn(shape))
    return torch.randn(tuple(shape), generator=generator)


def randn_local(source: str, seed: int, shape: Sequence[int]) -> torch.Tensor:
    """A1111's rng.randn_local: the first draw of a generator seeded with `seed`."""
    return randn(create_generator(source, seed), shape)


class ImageNoise:
    """One image's generator, as A1111's ImageRNG keeps it (no variation seeds)."""

    def __init__(self, source: str, seed: int, ensd: int, shape: Sequence[int]):
        self.source, self.seed, self.ensd, self.shape = source, seed, ensd, tuple(shape)
        self.generator = create_generator(source, seed)
        self.is_first = True

    def first(self) -> torch.Tensor:
        noise = randn(self.generator, self.shape)
        if self.ensd:
            self.generator = create_generator(self.source, self.seed + self.ensd)
        return noise

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self.first()
        return randn(self.generator, self.shape)


class BatchNoise:
    """A batch's ImageNoise, one per cell: draws are stacked, so a cell's noise never depends on its batch."""

    def __init__(self, source: str, seeds: Sequence[int], ensd: int, shape: Sequence[int], device: torch.device):
        self.images = [ImageNoise(source, seed, ensd, shape) for seed in seeds]
        self.source, self.device = source, device

    def next(self) -> torch.Tensor:
        return torch.stack([image.next() for image in self.images]).to(self.device)

    def __call__(self, _sigma: torch.Tensor, _sigma_next: torch.Tensor) -> torch.Tensor:
        """k-diffusion's noise-sampler signature: ancestral samplers' draws are `next()`, whatever the sigmas."""
        return self.next()


_TORCHSDE_LOCK = threading.Lock()


@contextlib.contextmanager
def brownian_draws(source: str) -> Iterator[None]:
    """torchsde's node draws from `source`, as A1111 patches them; torchsde's own CPU draws are "CPU"'s."""
    if source == "CPU":
        yield
        return
    from torchsde._brownian import brownian_interval

    def draw(size: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
        return randn_local(source, seed, size).to(device=device, dtype=dtype)

    with _TORCHSDE_LOCK:
        original = brownian_interval._randn
        brownian_interval._randn = draw
        try:
            yield
        finally:
            brownian_interval._randn = original
