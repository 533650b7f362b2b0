"""Sampler and schedule names: A1111's table, its combined names, diffusers classes."""

from __future__ import annotations

import pytest

from gridrender.scheduler import samplers
from gridrender.scheduler.errors import JobError
from gridrender.scheduler.jobfile import parse_job


@pytest.mark.parametrize(
    "name, schedule, expected",
    [
        ("Euler a", "Automatic", ("Euler a", "Uniform")),
        ("euler  A", "automatic", ("Euler a", "Uniform")),
        ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),  # A1111 1.9+: the sampler's own default
        ("DPM++ 2M", "Uniform", ("DPM++ 2M", "Uniform")),
        ("DPM++ 2M SDE", "Automatic", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 3M SDE", "Automatic", ("DPM++ 3M SDE", "Exponential")),
        ("DPM2 a", "Automatic", ("DPM2 a", "Karras")),
        ("Heun", "Automatic", ("Heun", "Uniform")),
        ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Karras")),
        ("DPM++ 2M Karras", "karras", ("DPM++ 2M", "Karras")),
        ("DPM++ SDE Karras", "Automatic", ("DPM++ SDE", "Karras")),
        ("DPM++ 2M SDE Exponential", "Automatic", ("DPM++ 2M SDE", "Exponential")),
        ("DPM++ 2M SDE Heun", "Automatic", ("DPM++ 2M SDE Heun", "Exponential")),
        ("Euler", "SGMUniform", ("Euler", "SGM Uniform")),
        ("k_dpmpp_2m", "Automatic", ("DPM++ 2M", "Karras")),
        ("EulerDiscreteScheduler", "Automatic", ("EulerDiscreteScheduler", "Automatic")),
    ],
)
def test_names_resolve_to_one_canonical_sampler_and_schedule(name, schedule, expected):
    assert samplers.canonical(name, schedule) == expected


def test_contradicting_names_and_schedules_are_errors():
    with pytest.raises(ValueError, match="already names its schedule"):
        samplers.canonical("DPM++ 2M Karras", "Exponential")
    with pytest.raises(ValueError, match="model's own scheduler config"):
        samplers.canonical("EulerDiscreteScheduler", "Karras")


@pytest.mark.parametrize(
    "name, hint",
    [("DDIM", "DDIMScheduler"), ("UniPC", "UniPCMultistepScheduler"), ("PLMS", "PNDMScheduler"), ("DPM fast", "exactly")],
)
def test_a1111_names_that_are_not_matched_teach_the_alternative(name, hint):
    with pytest.raises(samplers.UnknownName, match=hint):
        samplers.split_name(name)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(samplers.UnknownName, match="Euler a"):
        samplers.split_name("Warp Drive")
    with pytest.raises(samplers.UnknownName, match="Karras"):
        samplers.schedule("Wobbly")


def test_infotext_names_read_the_same_in_old_and_new_a1111():
    assert samplers.infotext_name("DPM++ 2M", "Karras") == "DPM++ 2M Karras"
    assert samplers.infotext_name("DPM++ 2M", "Uniform") == "DPM++ 2M"
    assert samplers.infotext_name("DPM++ 2M SDE", "Exponential") == "DPM++ 2M SDE Exponential"
    # combined names only where A1111 had them
    assert samplers.infotext_name("Euler a", "Karras") == "Euler a"
    assert samplers.infotext_name("DPM++ 2M", "Exponential") == "DPM++ 2M"
    assert samplers.infotext_name("EulerDiscreteScheduler", "Automatic") == "EulerDiscreteScheduler"


def test_job_schedule_axis_and_duplicates_after_canonicalization():
    job = parse_job(b"name: g\nmodel: builtin:tiny\nprompts: a\nsampler: [DPM++ 2M, Euler]\nschedule: [Uniform, Karras]\n")
    assert job.cell_count() == 4 and job.schedule == ["Uniform", "Karras"]
    for text in (
        b"sampler: [DPM++ 2M Karras, dpm++ 2m karras]\n",
        b"sampler: [DPM++ 2M, DPM++ 2M Karras]\nschedule: [Automatic, Karras]\n",
    ):
        with pytest.raises(JobError) as info:
            parse_job(b"name: g\nmodel: builtin:tiny\nprompts: a\n" + text)
        assert info.value.problems[0].field == "sampler"
    with pytest.raises(JobError, match="schedule"):
        parse_job(b"name: g\nmodel: builtin:tiny\nprompts: a\nschedule: Wobbly\n")


def test_every_a1111_sampler_has_a_kdiffusion_function():
    from gridrender.workers.ksampling import FUNCTIONS

    assert {s.function for s in samplers.A1111} <= FUNCTIONS.keys()
