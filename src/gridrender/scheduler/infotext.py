"""A1111's "parameters" PNG text: what its PNG-info tab and civitai read back.

Written so that A1111 before and after 1.9 read the same sampler: the old combined
name where A1111 had one ("DPM++ 2M Karras"; never one it did not, like "Euler a
Karras"), and "Schedule type", the schedule used. "RNG" unless GPU and "ENSD" unless
0, as A1111 writes them (it writes ENSD only for samplers that use it; gridrender
writes any nonzero value, so that an imported PNG names the same cell).
Components as A1111 and civitai name them: `<lora:NAME:WEIGHT>` in the prompt,
"Lora hashes" (A1111's hash of each LoRA's tensor data), "VAE"/"VAE hash", "TI hashes".
"""

from __future__ import annotations

import json

from . import samplers
from .components import LoraUse
from .grid import Cell
from .params import short_model_name
from .prompts import lora_tags, search_replace


def _quote(value: object) -> str:
    text = str(value)
    # A1111's own rule: values that would break the "k: v, k: v" line are JSON-quoted.
    if any(c in text for c in ',\n:"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _hashes(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in pairs)


_REMOVE = str.maketrans("", "", ":,")


def _tag(use: LoraUse) -> str:
    unet = f":{use.unet:g}" if use.unet != use.te else ""
    return f" <lora:{use.mention}:{use.te:g}{unet}>"


def parameters(cell: Cell) -> str:
    """`<prompt>\\nNegative prompt: ...\\nSteps: .., Sampler: .., ...` for one cell."""
    prompt = search_replace(cell.prompt, cell.prompt_sr)  # its <lora:…> tags as written
    tagged = {tag.name for tag in lora_tags(prompt)}
    extra_tags = "".join(_tag(use) for use in cell.loras if use.mention not in tagged)
    pairs = {**_first_pass_pairs(cell), **_hires_pairs(cell, prompt), **_model_and_network_pairs(cell)}
    last = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items())
    lines = [prompt + extra_tags]
    negative = search_replace(cell.negative_prompt, cell.prompt_sr)
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(last)
    return "\n".join(lines)


def _first_pass_pairs(cell: Cell) -> dict[str, object]:
    pairs: dict[str, object] = {
        "Steps": cell.steps,
        "Sampler": samplers.infotext_name(cell.sampler, cell.schedule),
        "Schedule type": cell.schedule,
        "CFG scale": f"{cell.guidance:g}",
        "Seed": cell.seed,
        "Size": f"{cell.width}x{cell.height}",
        "Model hash": cell.model.short_hash(),
        "Model": short_model_name(cell.model.source),
    }
    if samplers.lookup(cell.sampler).family == "diffusers":
        del pairs["Schedule type"]  # the class's own config decides; A1111 has no such type
    if cell.vae is not None:
        pairs["VAE hash"] = cell.vae.short_hash()
        pairs["VAE"] = cell.vae.name
    if cell.init_image is not None:
        pairs["Denoising strength"] = f"{cell.denoise:g}"
    pairs["Clip skip"] = cell.clip_skip
    if cell.eta_noise_seed_delta:
        pairs["ENSD"] = cell.eta_noise_seed_delta
    if cell.rng != samplers.DEFAULT_RNG:
        pairs["RNG"] = cell.rng
    return pairs


def _hires_pairs(cell: Cell, prompt: str) -> dict[str, object]:
    if cell.hires is None:
        return {}
    hires_prompt = None if cell.hires.prompt is None else search_replace(cell.hires.prompt, cell.prompt_sr)
    fields = cell.hires.infotext(cell.sampler, cell.schedule, prompt, hires_prompt)
    if "Hires sampler" in fields:
        fields["Hires sampler"] = samplers.infotext_name(str(fields["Hires sampler"]), cell.hires.schedule or "")
    return dict(fields)


def _model_and_network_pairs(cell: Cell) -> dict[str, object]:
    pairs: dict[str, object] = {}
    if cell.model.zero_terminal_snr:  # A1111's setting: written so that A1111 renders it so again
        pairs["Noise Schedule"] = "Zero Terminal SNR"
    if cell.loras:  # extra_networks_lora.py: mentioned name without ":" and ",", A1111's 12-digit hash, once each
        hashes = {use.mention.translate(_REMOVE): use.lora.short_hash() for use in cell.loras}
        pairs["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in hashes.items())
    if cell.embeddings:
        pairs["TI hashes"] = _hashes([(e.name, e.short_hash()) for e in cell.embeddings])
    return pairs
