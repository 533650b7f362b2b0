"""Sampler and schedule names as users write them, resolved without diffusers or torch.

Two families:
- A1111 names ("Euler a", "DPM++ 2M", ...): A1111's k-diffusion sampler with A1111's
  default options, its noise from the cell's random-number source (`rng`, GPU by
  default, as in A1111); sigmas from the model's own `alphas_cumprod`
  (`workers/sigmas.py`), whatever the model's scheduler config says. A1111 1.9+
  names the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"); the older
  combined names ("DPM++ 2M Karras") are the same cells. `Automatic` is A1111 1.9+'s:
  the sampler's own default schedule (sd_samplers_kdiffusion.samplers_k_diffusion's
  'scheduler' option: Karras for DPM++ 2M, Exponential for DPM++ 2M SDE, ...), else
  Uniform, k-diffusion's discretization of the model's own sigmas.
- diffusers class names ("EulerDiscreteScheduler"): that class, built on the model's
  own scheduler config, as diffusers' pipelines run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

# Bump when what an A1111 name renders changes: it is part of every such cell's id.
# 2: GPU noise by default (the `rng` parameter), Automatic = the sampler's default schedule.
A1111_SEMANTICS = "a1111-kdiffusion-2"
DIFFUSERS_SEMANTICS = "diffusers-class-1"
AUTOMATIC = "Automatic"
UNIFORM = "Uniform"
KARRAS = "Karras"
EXPONENTIAL = "Exponential"
# A1111's "Random number generator source"; an infotext without "RNG" means GPU.
RNG_SOURCES = ("GPU", "CPU", "NV")
DEFAULT_RNG = "GPU"


@dataclass(frozen=True)
class Schedule:
    label: str  # as A1111 writes it in infotext ("Schedule type: Karras")
    name: str  # A1111's internal name
    aliases: tuple[str, ...] = ()


SCHEDULES = [
    Schedule(AUTOMATIC, "automatic"),
    Schedule(UNIFORM, "uniform"),
    Schedule("Karras", "karras"),
    Schedule("Exponential", "exponential"),
    Schedule("Polyexponential", "polyexponential"),
    Schedule("SGM Uniform", "sgm_uniform", ("SGMUniform",)),
    Schedule("KL Optimal", "kl_optimal"),
    Schedule("Align Your Steps", "align_your_steps"),
    Schedule("Simple", "simple"),
    Schedule("Normal", "normal"),
    Schedule("DDIM", "ddim"),
    Schedule("Beta", "beta"),
]


@dataclass(frozen=True)
class Sampler:
    name: str  # canonical spelling: the A1111 label or the diffusers class name
    family: str  # "a1111" | "diffusers"
    function: str  # k-diffusion sampling function, or the diffusers class name
    aliases: tuple[str, ...] = ()
    discard_penultimate_sigma: bool = False  # A1111's discard_next_to_last_sigma
    noise: str = "none"  # "ancestral": per-cell CPU draws; "brownian": per-cell Brownian tree
    options: dict[str, Any] = field(default_factory=dict, hash=False)  # keyword arguments of the function
    default_schedule: str = UNIFORM  # what Automatic means for it (A1111 1.9+'s 'scheduler' option)
    uses_ensd: bool = False  # A1111 writes "ENSD" for it: its later draws come from the reseeded generator
    # Samplers whose noise is drawn for the whole call at once render one cell per call.
    batch_invariant: bool = True

    @property
    def semantics(self) -> str:
        return A1111_SEMANTICS if self.family == "a1111" else DIFFUSERS_SEMANTICS


def _a1111(name: str, function: str, aliases: tuple[str, ...] = (), **kw: Any) -> Sampler:
    return Sampler(name, "a1111", function, aliases, **kw)


# A1111's k-diffusion samplers (modules/sd_samplers_kdiffusion.py) with its defaults:
# eta 1 for ancestral and SDE samplers, s_churn 0, s_noise 1. DDIM, PLMS, UniPC, LCM
# and DPM fast/adaptive are not matched exactly and are not in this table; their
# diffusers classes stay available under the class names.
A1111 = [
    _a1111("Euler a", "sample_euler_ancestral", ("k_euler_a", "k_euler_ancestral"), noise="ancestral", uses_ensd=True),
    _a1111("Euler", "sample_euler", ("k_euler",)),
    _a1111("LMS", "sample_lms", ("k_lms",)),
    _a1111("Heun", "sample_heun", ("k_heun",)),
    _a1111("DPM2", "sample_dpm_2", ("k_dpm_2",), discard_penultimate_sigma=True, default_schedule=KARRAS),
    _a1111(
        "DPM2 a",
        "sample_dpm_2_ancestral",
        ("k_dpm_2_a",),
        discard_penultimate_sigma=True,
        noise="ancestral",
        default_schedule=KARRAS,
        uses_ensd=True,
    ),
    _a1111(
        "DPM++ 2S a", "sample_dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), noise="ancestral", default_schedule=KARRAS, uses_ensd=True
    ),
    _a1111("DPM++ 2M", "sample_dpmpp_2m", ("k_dpmpp_2m",), default_schedule=KARRAS),
    _a1111("DPM++ SDE", "sample_dpmpp_sde", ("k_dpmpp_sde",), noise="brownian", default_schedule=KARRAS),
    _a1111(
        "DPM++ 2M SDE",
        "sample_dpmpp_2m_sde",
        ("k_dpmpp_2m_sde",),
        noise="brownian",
        options={"solver_type": "midpoint"},
        default_schedule=EXPONENTIAL,
    ),
    _a1111(
        "DPM++ 2M SDE Heun",
        "sample_dpmpp_2m_sde",
        ("k_dpmpp_2m_sde_heun",),
        noise="brownian",
        options={"solver_type": "heun"},
        default_schedule=EXPONENTIAL,
    ),
    _a1111(
        "DPM++ 3M SDE",
        "sample_dpmpp_3m_sde",
        ("k_dpmpp_3m_sde",),
        discard_penultimate_sigma=True,
        noise="brownian",
        default_schedule=EXPONENTIAL,
    ),
]

# The combined names A1111 had before 1.9 (its samplers_k_diffusion up to 1.8): written as
# "Sampler:" so that those versions render the same image; every other pair is written
# as A1111 1.9+ writes it, the sampler's name and "Schedule type".
COMBINED_NAMES = frozenset(
    {
        ("LMS", "Karras"),
        ("DPM2", "Karras"),
        ("DPM2 a", "Karras"),
        ("DPM++ 2S a", "Karras"),
        ("DPM++ 2M", "Karras"),
        ("DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE", "Karras"),
        ("DPM++ 2M SDE", "Exponential"),
        ("DPM++ 2M SDE Heun", "Karras"),
        ("DPM++ 2M SDE Heun", "Exponential"),
        ("DPM++ 3M SDE", "Karras"),
        ("DPM++ 3M SDE", "Exponential"),
    }
)

# diffusers classes accepted under their own names, with the model's own config.
# DPMSolverSDEScheduler seeds one Brownian tree per call: one cell per call, seeded by it.
DIFFUSERS = [
    Sampler(cls, "diffusers", cls, batch_invariant=cls != "DPMSolverSDEScheduler")
    for cls in sorted(
        [
            "DDIMScheduler",
            "DDPMScheduler",
            "DEISMultistepScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSDEScheduler",
            "DPMSolverSinglestepScheduler",
            "EulerAncestralDiscreteScheduler",
            "EulerDiscreteScheduler",
            "HeunDiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler",
            "KDPM2DiscreteScheduler",
            "LCMScheduler",
            "LMSDiscreteScheduler",
            "PNDMScheduler",
            "TCDScheduler",
            "UniPCMultistepScheduler",
        ]
    )
]

# Names A1111 users bring that gridrender cannot render as A1111 does.
NOT_MATCHED = {
    "ddim": "DDIMScheduler",
    "plms": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "ddpm": "DDPMScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm fast": None,
    "dpm adaptive": None,
    "restart": None,
}


def _fold(name: str) -> str:
    return " ".join(name.split()).casefold()


_SAMPLERS = {_fold(s.name): s for s in [*A1111, *DIFFUSERS]}
_SAMPLERS.update({_fold(a): s for s in A1111 for a in s.aliases})
_SCHEDULES = {_fold(n): s for s in SCHEDULES for n in (s.label, s.name, *s.aliases)}


def valid_samplers() -> list[str]:
    return [s.name for s in A1111] + [s.name for s in DIFFUSERS]


def valid_schedules() -> list[str]:
    return [s.label for s in SCHEDULES]


class UnknownName(ValueError):
    """A sampler or schedule name that is not in the tables (the message teaches)."""


def lookup(name: str) -> Sampler:
    """The sampler called exactly `name` (case and spacing forgiven); no schedule suffix."""
    try:
        return _SAMPLERS[_fold(name)]
    except KeyError:
        raise UnknownName(_unknown_sampler(name)) from None


def schedule(label: str) -> Schedule:
    try:
        return _SCHEDULES[_fold(label)]
    except KeyError:
        raise UnknownName(f"unknown schedule {label!r}; valid: {', '.join(valid_schedules())}") from None


@cache
def split_name(name: str) -> tuple[Sampler, Schedule | None]:
    """A sampler name, possibly with A1111's schedule suffix ("DPM++ 2M Karras")."""
    folded = _fold(name)
    if folded in _SAMPLERS:
        return _SAMPLERS[folded], None
    for spelling, sched in _SCHEDULES.items():
        base = folded.removesuffix(" " + spelling)
        if base != folded and base in _SAMPLERS and _SAMPLERS[base].family == "a1111" and sched.label != AUTOMATIC:
            return _SAMPLERS[base], sched
    raise UnknownName(_unknown_sampler(name))


@cache
def canonical(name: str, schedule_label: str = AUTOMATIC) -> tuple[str, str]:
    """(sampler, schedule) as cells hold them: "DPM++ 2M Karras" + Automatic -> ("DPM++ 2M", "Karras").

    Raises UnknownName, or ValueError for a name and schedule that contradict each other.
    """
    sampler, implied = split_name(name)
    chosen = schedule(schedule_label)
    if sampler.family == "diffusers":
        if chosen.label != AUTOMATIC:
            raise ValueError(
                f"schedule {chosen.label!r} applies to A1111 sampler names; {sampler.name} "
                "uses the model's own scheduler config (write schedule: Automatic)"
            )
        return sampler.name, AUTOMATIC
    if implied is not None and chosen.label not in (AUTOMATIC, implied.label):
        raise ValueError(
            f"sampler {name!r} already names its schedule ({implied.label}) but schedule is "
            f"{chosen.label!r}; write sampler {sampler.name!r} with the schedule you want"
        )
    resolved = implied or (chosen if chosen.label != AUTOMATIC else schedule(sampler.default_schedule))
    return sampler.name, resolved.label


def identity(name: str) -> dict[str, str]:
    """A canonical sampler's part of the cell id: its name and what the name means."""
    return {"name": name, "semantics": lookup(name).semantics}


# Schedules whose meaning changed after cells were rendered with them: their ids carry a version.
# Align Your Steps took SD 1.5's table on SDXL too; it now takes SDXL's there, as A1111 does.
SCHEDULE_VERSIONS = {"Align Your Steps": "sd15-sdxl-tables"}


def schedule_identity(label: str) -> str | dict[str, str]:
    """A schedule's part of the cell id: its label, with a version where its meaning changed."""
    version = SCHEDULE_VERSIONS.get(label)
    return label if version is None else {"label": label, "version": version}


def infotext_name(name: str, schedule_label: str) -> str:
    """ "Sampler:" as both A1111 generations read it: the old combined name where one existed."""
    sampler = lookup(name)
    if (sampler.name, schedule_label) in COMBINED_NAMES:
        return f"{sampler.name} {schedule_label}"
    return sampler.name


def uses_ensd(name: str) -> bool:
    """Whether ENSD changes what `name` renders: its draws after the initial noise come from the generator."""
    return lookup(name).uses_ensd


def _unknown_sampler(name: str) -> str:
    folded = _fold(name)
    for base in (folded, *(folded.removesuffix(" " + s) for s in _SCHEDULES)):
        if base in NOT_MATCHED:
            cls = NOT_MATCHED[base]
            alternative = f"; use the diffusers class {cls} (the model's own config, not A1111's sampler)" if cls else ""
            return f"sampler {name!r} is A1111's, but gridrender cannot render it exactly as A1111 does{alternative}"
    return f"unknown sampler {name!r}; valid: " + ", ".join(valid_samplers())
