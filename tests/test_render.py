"""Seeds: a cell's image does not depend on the batch it was rendered in.

Each cell's noise comes from its own generator, so the only batch effect left is
float rounding: GEMM and convolution kernels pick different blockings for different
batch shapes (on CPU and on GPU alike). Measured here with CPU noise (the conditions
this bound was set for): at most 1/255, on under 1% of the channel values. That is
the tolerance `gridrender reproduce` accepts, and what these tests hold the renderer to.

With GPU noise the same seeds draw other latents, and one of them (seed 107) lands
where this random tiny UNet amplifies rounding: its first UNet call, on bit-identical
input, differs by 2e-3 between batch shapes (8e-6 for the other seeds), and about 10%
of the image's values differ: by 1/255 where the CPU's kernels are AVX2 ones, by up to
2/255 where they are AVX-512 ones (other blockings; measured 2026-12-02, 10.8% of values).
Measured, not fitted: the GPU case asserts that the input is identical and allows that
share and that step for it alone.
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
    from gridrender.workers import denoise

    inputs: list[torch.Tensor] = []
    call = denoise.Guided.__call__

    def spy(self, x, t):
        inputs.append(x.detach().clone())
        return call(self, x, t)

    monkeypatch.setattr(denoise.Guided, "__call__", spy)
    measured = _alone_and_in_a_batch_of_8(renderer, tiny, sampler, "GPU")
    for index, (largest, share) in zip((0, 3, 5, 7), measured, strict=True):
        # seed 107 (cell 7): this random UNet amplifies the batch's rounding (module docstring)
        amplified = index == 7
        assert largest <= (2 if amplified else 1), f"cell {index} differs by {largest}/255 between batch and single render"
        assert share < (0.15 if amplified else 0.05), f"cell {index}: {share:.1%} of values differ"
    # the UNet's first input (the initial noise) of every cell is the same bits alone and in the batch
    batch_first = inputs[0]
    alone_firsts = [x for x in inputs if x.shape[0] == 1][::3]  # both samplers: one UNet call per step, 3 steps
    assert len(alone_firsts) == 4
    for index, alone in zip((0, 3, 5, 7), alone_firsts, strict=True):
        assert torch.equal(batch_first[index], alone[0])


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
