"""A1111's "parameters" PNG text: what its PNG-info tab and civitai read back.

Written so that A1111 before and after 1.9 read the same sampler: the old combined
name where the schedule is not Uniform ("DPM++ 2M Karras"), and "Schedule type".
"""
from __future__ import annotations

import json

from . import samplers
from .models import ModelSpec
from .params import short_model_name


def _quote(value: object) -> str:
    text = str(value)
    # A1111's own rule: values that would break the "k: v, k: v" line are JSON-quoted.
    if any(c in text for c in ',\n:"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def parameters(params: dict, model: ModelSpec) -> str:
    """`<prompt>\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...` for one cell."""
    pairs = {
        "Steps": params["steps"],
        "Sampler": samplers.infotext_name(params["sampler"], params["schedule"]),
        "Schedule type": params["schedule"],
        "CFG scale": f"{params['guidance']:g}",
        "Seed": params["seed"],
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": model.short_hash(),
        "Model": short_model_name(model.source),
        "Clip skip": params["clip_skip"],
    }
    if samplers.lookup(params["sampler"]).family == "diffusers":
        del pairs["Schedule type"]  # the class's own config decides; A1111 has no such type
    last = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items())
    lines = [params["prompt"]]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(last)
    return "\n".join(lines)
