"""Seeds: a cell's image does not depend on the batch it was rendered in.

Each cell's noise comes from its own generator, so the only batch effect left is
float rounding: GEMM and convolution kernels pick different blockings for different
batch shapes (on CPU and on GPU alike). Measured here with CPU noise (the conditions
this bound was set for): at most 1/255, on under 1% of the channel values. That is
the tolerance `gridrender reproduce` accepts, and what these tests hold the renderer to.

With GPU noise the same seeds draw other latents, and one of them (seed 107) lands
where this random tiny UNet amplifies rounding: its first UNet call, on bit-identical
input, differs by 2e-3 between batch shapes (8e-6 for the other seeds), and how much of
its image differs depends on the machine's kernels. Measured 2026-12-02 on one AVX-512
host, its kernels held to each instruction set in turn (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), one thread, Euler a / DPM++ 2M Karras:
AVX-512 2/255 on 11% / 9% of values; ATen alone at AVX2 2/255 on 14% / 13%; all at AVX2
1/255 on 5% / 4%; all at SSE4 4/255 on 35% / 32%. The GPU case asserts that every noise
draw of every cell is the same bits alone and in the batch (the property GPU noise must
have), and allows that cell alone the spread measured: at most 4/255, on under 40%.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gridrender.scheduler.grid import make_cell


def cells(tiny, seeds, sampler="Euler a", **kw):
    base = dict(
        prompt="a cow standing in a field",
        negative_prompt="lowres",
        clip_skip=1,
        sampler=sampler,
        steps=3,
        guidance=7.0,
        width=64,
        height=64,
        dtype="float32",
    )
    return [make_cell(tiny, **{**base, "seed": s, **kw}) for s in seeds]


def _alone_and_in_a_batch_of_8(renderer, tiny, sampler: str, rng: str) -> list[tuple[int, float]]:
    """(max difference, share of values that differ) of cells 0, 3, 5 and 7, alone vs in the batch."""
    batch = cells(tiny, range(100, 108), sampler, rng=rng)
    # mix prompts and clip skips inside the batch, as the worker does
    batch[3] = cells(tiny, [103], sampler, clip_skip=2, rng=rng)[0]
    batch[5] = cells(tiny, [105], sampler, prompt="a lighthouse at dusk", rng=rng)[0]
    together = renderer.render(tiny, batch)
    out = []
    for index in (0, 3, 5, 7):
        alone = renderer.render(tiny, [batch[index]])[0]
        assert together[index].cell.id == alone.cell.id
        diff = np.abs(np.asarray(together[index].image, dtype=int) - np.asarray(alone.image, dtype=int))
        out.append((int(diff.max()), float((diff > 0).mean())))
    return out


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "DDIMScheduler"])
def test_a_cell_alone_equals_the_same_cell_in_a_batch_of_8(renderer, tiny, sampler):
    for index, (largest, share) in zip((0, 3, 5, 7), _alone_and_in_a_batch_of_8(renderer, tiny, sampler, "CPU"), strict=True):
        assert largest <= 1, f"cell {index} differs by {largest}/255 between batch and single render"
        assert share < 0.05, f"cell {index}: {share:.1%} of values differ"


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_with_gpu_noise_a_cell_alone_equals_the_same_cell_in_a_batch_of_8(renderer, tiny, sampler, monkeypatch):
    from gridrender.workers import denoise, noise

    inputs: list[torch.Tensor] = []
    draws: list[torch.Tensor] = []
    call, draw = denoise.Guided.__call__, noise.BatchNoise.next

    def spy(self, x, t):
        inputs.append(x.detach().clone())
        return call(self, x, t)

    def spy_draw(self):
        draws.append(draw(self).clone())
        return draws[-1]

    monkeypatch.setattr(denoise.Guided, "__call__", spy)
    monkeypatch.setattr(noise.BatchNoise, "next", spy_draw)
    measured = _alone_and_in_a_batch_of_8(renderer, tiny, sampler, "GPU")
    for index, (largest, share) in zip((0, 3, 5, 7), measured, strict=True):
        # seed 107 (cell 7): this random UNet amplifies the batch's rounding, by the machine's kernels (docstring)
        amplified = index == 7
        assert largest <= (4 if amplified else 1), f"cell {index} differs by {largest}/255 between batch and single render"
        assert share < (0.40 if amplified else 0.05), f"cell {index}: {share:.1%} of values differ"
    # every noise draw of every cell (the initial noise; Euler a's draw at each step) is the same bits alone and in the batch
    in_batch = [d for d in draws if d.shape[0] == 8]
    alone = [d for d in draws if d.shape[0] == 1]
    assert in_batch and len(alone) == 4 * len(in_batch)
    for k, index in enumerate((0, 3, 5, 7)):
        for batch_draw, alone_draw in zip(in_batch, alone[k * len(in_batch) : (k + 1) * len(in_batch)], strict=True):
            assert torch.equal(batch_draw[index], alone_draw[0])
    # and so is the UNet's first input (the initial noise, scaled)
    batch_first = inputs[0]
    alone_firsts = [x for x in inputs if x.shape[0] == 1][::3]  # both samplers: one UNet call per step, 3 steps
    assert len(alone_firsts) == 4
    for index, alone_first in zip((0, 3, 5, 7), alone_firsts, strict=True):
        assert torch.equal(batch_first[index], alone_first[0])


def test_batch_order_does_not_matter_beyond_rounding(renderer, tiny):
    batch = cells(tiny, range(200, 208))
    forward = renderer.render(tiny, batch)
    backward = renderer.render(tiny, batch[::-1])[::-1]
    for a, b in zip(forward, backward, strict=True):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


def test_different_seeds_give_different_images(renderer, tiny):
    a, b = renderer.render(tiny, cells(tiny, [1, 2]))
    assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() > 0


def test_rendering_again_gives_the_same_pixels(renderer, tiny):
    (a,) = renderer.render(tiny, cells(tiny, [9]))
    (b,) = renderer.render(tiny, cells(tiny, [9]))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_pipeline_stays_resident(renderer, tiny):
    renderer.render(tiny, cells(tiny, [1]))
    loads = renderer.cache.loads
    renderer.render(tiny, cells(tiny, [2, 3], "DDIMScheduler"))
    assert renderer.cache.loads == loads
