"""What the UNet is conditioned on for a batch of cells: one object for SD 1.x and SDXL.

SD 1.x: the token states. SDXL (sgm's GeneralConditioner as A1111 calls it in
sd_models_xl.get_learned_conditioning): the two encoders' states side by side, the
second encoder's pooled vector, and the size conditioning (original size, crop top-left,
target size) = (h, w, 0, 0, h, w). A negative prompt that is empty is all zeros, states
and pooled (A1111's force_zero_negative_prompt), the size conditioning kept.

A hires pass renders the same conditioning at another target size (A1111's
calculate_hr_conds): `at_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .clip import Encoded

CROP_TOP_LEFT = (0, 0)  # A1111's sdxl_crop_top / sdxl_crop_left defaults


def size_ids(width: int, height: int) -> list[int]:
    """SDXL's six size numbers: original (h, w), crop (top, left), target (h, w)."""
    return [height, width, *CROP_TOP_LEFT, height, width]


@dataclass(frozen=True)
class Conditioning:
    """A batch's conditioning: (B, 77k, width) states, and for SDXL (B, proj) pooled and (B, 6) size ids."""

    states: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @classmethod
    def of(
        cls, encoded: Sequence[Encoded], dtype: torch.dtype, width: int, height: int, zero: Sequence[bool] = ()
    ) -> Conditioning:
        """Stacked per-cell encodings; SDXL's gain the size ids and pooled vectors.

        `zero[i]`: cell i's text is an empty negative prompt, which SDXL conditions on as
        zeros (states and pooled), as A1111 does.
        """
        states = torch.stack([e.embedding for e in encoded]).to(dtype)
        if encoded[0].pooled is None:
            return cls(states)
        pooled = torch.stack([e.pooled for e in encoded if e.pooled is not None]).to(dtype)
        if any(zero):
            keep = torch.tensor([not z for z in zero], device=states.device)
            states = torch.where(keep[:, None, None], states, torch.zeros_like(states))
            pooled = torch.where(keep[:, None], pooled, torch.zeros_like(pooled))
        ids = torch.tensor([size_ids(width, height)] * len(encoded), dtype=dtype, device=states.device)
        return cls(states, pooled, ids)

    @property
    def length(self) -> int:
        """Tokens of conditioning (77 per chunk): cond and uncond of different lengths cannot share a call."""
        return int(self.states.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.states.dtype

    def unet_kwargs(self) -> dict[str, Any]:
        """The UNet's keyword arguments for this conditioning (diffusers' UNet2DConditionModel)."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.states}
        return {
            "encoder_hidden_states": self.states,
            "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids},
        }

    def cat(self, other: Conditioning) -> Conditioning:
        """Two batches as one (cond and uncond in one UNet call)."""
        if self.pooled is None or other.pooled is None or self.time_ids is None or other.time_ids is None:
            return Conditioning(torch.cat([self.states, other.states]))
        return Conditioning(
            torch.cat([self.states, other.states]),
            torch.cat([self.pooled, other.pooled]),
            torch.cat([self.time_ids, other.time_ids]),
        )

    def at_size(self, width: int, height: int) -> Conditioning:
        """The same texts at another image size (a hires pass: A1111's calculate_hr_conds)."""
        if self.time_ids is None:
            return self
        ids = torch.tensor(
            [size_ids(width, height)] * self.states.shape[0], dtype=self.time_ids.dtype, device=self.time_ids.device
        )
        return replace(self, time_ids=ids)
