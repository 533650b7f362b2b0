"""torch's CUDA `randn`, computed on any device: Philox 4x32-10 and Box-Muller, as A1111's "NV" source.

A1111 ships this emulation as its "NV" random-number source (modules/rng_philox.py);
its default "GPU" source is torch's own CUDA generator, which the emulation imitates.
Element i of a draw comes from the Philox block with counter (offset, 0, i, 0) and key
(seed's low 32 bits, high 32 bits); only the block's first two words are used, through
the first output of a Box-Muller transform. Each draw moves the offset on by one, as
torch moves its Philox offset by one block per draw of a tensor that fits one grid
pass of its kernel (every SD latent of one image).

The arithmetic follows A1111's numpy code exactly: 64-bit products for the rounds, and
Box-Muller in float64 on float32 constants, rounded to float32 at the end. Vectorized
with numpy: a 4x128x128 latent takes about a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_MUL = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))  # Philox 4x32 round multipliers
_WEYL = (0x9E3779B9, 0xBB67AE85)  # key increments per round
_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
# A1111's constants are float32 arrays; its products with uint32 arrays are float64.
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)

U32 = npt.NDArray[np.uint32]


def philox4x32(counter: tuple[U32, U32, U32, U32], key: tuple[int, int]) -> tuple[U32, U32, U32, U32]:
    """Philox 4x32-10 over arrays of counters with one key: four 32-bit words per counter."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(_ROUNDS):
        if round_:
            k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
        p0 = c0.astype(np.uint64) * _MUL[0]
        p1 = c2.astype(np.uint64) * _MUL[1]
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
    return c0, c1, c2, c3


def box_muller_first(x: U32, y: U32) -> npt.NDArray[np.float32]:
    """The first of the two normals Box-Muller makes from two uniform words (curand's x output)."""
    u = x * np.float64(_TWO_POW32_INV) + np.float64(_TWO_POW32_INV / 2)
    v = y * np.float64(_TWO_POW32_INV_2PI) + np.float64(_TWO_POW32_INV_2PI / 2)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """One seed's stream of normal draws, as torch's CUDA generator gives them (A1111's NV source)."""

    def __init__(self, seed: int):
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside 0..2^64-1")
        self.seed = seed
        self.offset = 0

    def randn(self, shape: Sequence[int]) -> npt.NDArray[np.float32]:
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError("a Philox draw holds fewer than 2^32 numbers")
        index = np.arange(n, dtype=np.uint32)
        zeros = np.zeros(n, dtype=np.uint32)
        offset = np.full(n, self.offset & _MASK32, dtype=np.uint32)
        self.offset += 1
        words = philox4x32((offset, zeros, index, zeros), (self.seed & _MASK32, self.seed >> 32))
        return box_muller_first(words[0], words[1]).reshape(tuple(shape))
