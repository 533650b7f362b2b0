"""Turning a sampler name into a diffusers scheduler built on the model's own config."""
from __future__ import annotations

import diffusers

from gridrender.scheduler import samplers


def make_scheduler(name: str, base_config: dict):
    spec = samplers.lookup(name)
    cls = getattr(diffusers, spec.cls)
    return cls.from_config(base_config, **spec.config)


def describe(scheduler) -> dict:
    """The class name and full config, as the record stores them."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, "config": config}
