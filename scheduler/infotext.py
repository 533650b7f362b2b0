"""A1111's "parameters" PNG text: what its PNG-info tab and civitai read back."""
from __future__ import annotations

import json


def _quote(value: object) -> str:
    text = str(value)
    # A1111's own rule: values that would break the "k: v, k: v" line are JSON-quoted.
    if any(c in text for c in ',\n:"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float) -> str:
    return f"{value:g}"


def parameters(params: dict, model_hash: str, model_name: str) -> str:
    """`<prompt>\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...` for one cell."""
    pairs = {
        "Steps": params["steps"],
        "Sampler": params["sampler"],
        "CFG scale": _number(params["guidance"]),
        "Seed": params["seed"],
        "Size": f"{params['width']}x{params['height']}",
        "Model hash": model_hash,
        "Model": model_name,
        "Clip skip": params["clip_skip"],
    }
    last = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items())
    lines = [params["prompt"]]
    if params["negative_prompt"]:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(last)
    return "\n".join(lines)
