"""Sampler names as users write them, mapped to diffusers scheduler classes.

Pure data, so the scheduler side can validate a job without diffusers. The worker
side (`workers.samplers`) turns a `SamplerSpec` into a scheduler instance.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # canonical spelling, part of the cell id
    cls: str  # diffusers scheduler class name
    config: dict = field(default_factory=dict)  # overrides of the model's scheduler config
    # Samplers whose noise is drawn for the whole batch at once (a Brownian tree seeded
    # once per call) give different images in a batch than alone: render them one by one.
    batch_invariant: bool = True


def _spec(name: str, cls: str, batch_invariant: bool = True, **config) -> SamplerSpec:
    return SamplerSpec(name, cls, config, batch_invariant)


_KARRAS = {"use_karras_sigmas": True}

# A1111 / civitai names. Where A1111's sampler has no exact diffusers twin it is left
# out rather than approximated under the same name.
A1111 = {
    spec.name: spec
    for spec in [
        _spec("Euler", "EulerDiscreteScheduler"),
        _spec("Euler a", "EulerAncestralDiscreteScheduler"),
        _spec("Heun", "HeunDiscreteScheduler"),
        _spec("LMS", "LMSDiscreteScheduler"),
        _spec("LMS Karras", "LMSDiscreteScheduler", **_KARRAS),
        _spec("DPM2", "KDPM2DiscreteScheduler"),
        _spec("DPM2 Karras", "KDPM2DiscreteScheduler", **_KARRAS),
        _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        _spec("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", **_KARRAS),
        _spec("DPM++ 2M", "DPMSolverMultistepScheduler"),
        _spec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", **_KARRAS),
        _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"),
        _spec(
            "DPM++ 2M SDE Karras",
            "DPMSolverMultistepScheduler",
            algorithm_type="sde-dpmsolver++",
            **_KARRAS,
        ),
        _spec("DPM++ SDE", "DPMSolverSDEScheduler", batch_invariant=False),
        _spec("DPM++ SDE Karras", "DPMSolverSDEScheduler", batch_invariant=False, **_KARRAS),
        _spec("DDIM", "DDIMScheduler"),
        _spec("PLMS", "PNDMScheduler", skip_prk_steps=True),
        _spec("UniPC", "UniPCMultistepScheduler"),
        _spec("DEIS", "DEISMultistepScheduler"),
        _spec("DDPM", "DDPMScheduler"),
        _spec("LCM", "LCMScheduler"),
    ]
}

# diffusers class names accepted as they are, with the model's own scheduler config.
CLASSES = sorted({spec.cls for spec in A1111.values()} | {"DPMSolverSinglestepScheduler", "TCDScheduler"})
_NOT_BATCH_INVARIANT = {"DPMSolverSDEScheduler"}

_BY_FOLDED = {name.casefold(): spec for name, spec in A1111.items()}
_BY_FOLDED.update(
    {cls.casefold(): SamplerSpec(cls, cls, {}, cls not in _NOT_BATCH_INVARIANT) for cls in CLASSES}
)


def valid_names() -> list[str]:
    return [*A1111, *CLASSES]


def lookup(name: str) -> SamplerSpec:
    """The sampler called `name` (case and spacing forgiven); KeyError if unknown."""
    folded = " ".join(name.split()).casefold()
    return _BY_FOLDED[folded]
