"""A1111's "parameters" PNG text: what its PNG-info tab and civitai read back.

Written so that A1111 before and after 1.9 read the same sampler: the old combined
name where A1111 had one ("DPM++ 2M Karras"; never one it did not, like "Euler a
Karras"), and "Schedule type", the schedule used. "RNG" unless GPU and "ENSD" unless
0, as A1111 writes them (it writes ENSD only for samplers that use it; gridrender
writes any nonzero value, so that an imported PNG names the same cell).
Components as A1111 and civitai name them: `<lora:NAME:WEIGHT>` in the prompt,
"Lora hashes" (A1111's hash of each LoRA's tensor data), "VAE"/"VAE hash", "TI hashes".

Read back as A1111 reads it (modules/infotext_utils.py parse_generation_parameters), from
a PNG text chunk or a JPEG/WebP EXIF UserComment, for `gridrender import`.
"""

from __future__ import annotations

import io
import json
import re

from . import samplers
from .components import LoraUse
from .grid import Cell
from .params import short_model_name
from .prompts import lora_tags, search_replace

# infotext_utils.re_param and re_imagesize, as A1111 spells them
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_MIN_LAST_LINE_FIELDS = 3  # parse_generation_parameters: fewer `key: value` pairs and the last line is prompt
_NEGATIVE_PROMPT = "Negative prompt:"


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


def read_parameters(data: bytes) -> str | None:
    """The generation parameters text an image file carries, or None."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get("parameters")
        if isinstance(text, str):
            return text
        comment = image.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    if isinstance(comment, bytes):
        code, body = comment[:8], comment[8:]
        if code.startswith(b"UNICODE"):  # piexif's "unicode": UTF-16, big-endian unless a BOM says
            return body.decode("utf-16") if body[:2] in (b"\xff\xfe", b"\xfe\xff") else body.decode("utf-16-be")
        return body.decode("utf-8", errors="replace").strip("\0")
    if isinstance(comment, str):
        return comment
    return None


def _unquote(text: str) -> str:
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except ValueError:
        return text


def parse_generation_parameters(text: str) -> dict[str, str]:
    """infotext_utils.parse_generation_parameters, without A1111's settings: fields as strings.

    The last line holds the `key: value` pairs when it has at least three; the lines
    before it are the prompt, then (after "Negative prompt:") the negative prompt.
    Missing fields get A1111's defaults: Clip skip 1, RNG GPU, Schedule type Automatic.
    """
    res: dict[str, str] = {}
    prompt, negative = "", ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(_PARAM.findall(lastline)) < _MIN_LAST_LINE_FIELDS:
        lines.append(lastline)
        lastline = ""
    for raw_line in lines:
        line = raw_line.strip()
        if line.startswith(_NEGATIVE_PROMPT):
            done_with_prompt = True
            line = line[len(_NEGATIVE_PROMPT) :].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, written in _PARAM.findall(lastline):
        value = _unquote(written)  # a quoted value is a JSON string
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    missing = [k for k in ("Clip skip", "RNG", "Schedule type") if k not in res]
    res.setdefault("Clip skip", "1")
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    if missing:
        res["_missing"] = ",".join(missing)  # which defaults were filled in (not a field of the text)
    return res
