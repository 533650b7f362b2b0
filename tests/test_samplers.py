"""A1111 sampler names and diffusers class names map to the right schedulers."""
from __future__ import annotations

import json

import pytest

from gridrender.scheduler import samplers
from gridrender.scheduler.models import config_dir
from gridrender.workers.samplers import make_scheduler

BASE = json.loads((config_dir("sd15") / "scheduler" / "scheduler_config.json").read_text())

EXPECTED = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_a1111_names(name):
    cls, config = EXPECTED[name]
    scheduler = make_scheduler(name, BASE)
    assert type(scheduler).__name__ == cls
    for key, value in config.items():
        assert scheduler.config[key] == value, key
    # the model's own noise schedule is kept
    assert scheduler.config["beta_schedule"] == "scaled_linear"
    assert scheduler.config["beta_end"] == BASE["beta_end"]


@pytest.mark.parametrize("name", samplers.valid_names())
def test_every_listed_name_builds(name):
    assert make_scheduler(name, BASE) is not None


def test_class_names_work_as_they_are():
    assert type(make_scheduler("EulerDiscreteScheduler", BASE)).__name__ == "EulerDiscreteScheduler"


def test_karras_does_not_leak_into_the_next_sampler():
    make_scheduler("DPM++ 2M Karras", BASE)
    assert make_scheduler("DPM++ 2M", BASE).config["use_karras_sigmas"] is False


def test_unknown_name_raises():
    with pytest.raises(KeyError):
        samplers.lookup("Warp Drive")
