"""`gridrender import IMAGE...`: the job file that renders an A1111, Forge or civitai image again.

Reads the "parameters" text an image carries (a PNG tEXt/iTXt chunk, or a JPEG/WebP EXIF
UserComment), parses it as A1111 does (modules/infotext_utils.py parse_generation_parameters),
and writes a job: every field gridrender renders becomes a key; the model is found by its
hash among GRIDRENDER_MODEL_DIR's files, else named in a comment; every field it does not
render (ControlNet, ADetailer, regional prompts, variation seeds, ...) is listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import samplers
from .errors import InputError
from .hires import LATENT_MODES, PIXEL_UPSCALERS
from .infotext import parse_generation_parameters, read_parameters
from .models import SINGLE_FILE_SUFFIXES
from .settings import Settings
from .weightfiles import file_sha256

_NAME_CHARS = re.compile(r"[^a-z0-9_-]+")
_LEGACY_HASH_DIGITS = 8  # A1111's old "Model hash"

# Fields gridrender renders (read below), and fields that describe the image without changing it.
HANDLED = {
    "_missing",
    "Prompt",
    "Negative prompt",
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size-1",
    "Size-2",
    "Model hash",
    "Model",
    "Clip skip",
    "RNG",
    "ENSD",
    "Denoising strength",
    "Hires upscale",
    "Hires resize-1",
    "Hires resize-2",
    "Hires upscaler",
    "Hires steps",
    "Hires sampler",
    "Hires schedule type",
    "Hires prompt",
    "VAE",
    "VAE hash",
    "Lora hashes",
    "TI hashes",
}
HARMLESS = {"Version", "Hashes", "Civitai resources", "Civitai metadata", "User", "Init image hash"}
# Fields at A1111's default (what gridrender renders): no need to list them. ("Pad conds: True" is not
# one: A1111 writes it only when it padded the shorter conditioning, which gridrender never does.)
DEFAULTS = {
    "Emphasis": "Original",
    "Eta": "1",
    "Hires negative prompt": "",
    "Hires checkpoint": "Use same checkpoint",
    "Hires sampler": "Use same sampler",
    "Schedule rho": "0",
    "Schedule max sigma": "0",
    "Schedule min sigma": "0",
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
}


@dataclass
class Imported:
    """One image's job: the job file's data, comments to write above it, fields not rendered."""

    name: str
    job: dict[str, Any]
    comments: list[str] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)

    def yaml(self) -> str:
        header = "".join(f"# {line}\n" for line in self.comments)
        if self.unsupported:
            header += "# not rendered by gridrender (fields of the image's parameters):\n"
            header += "".join(f"#   {k}: {v}\n" for k, v in self.unsupported.items())
        body: str = yaml.safe_dump(self.job, sort_keys=False, allow_unicode=True, width=1 << 16)
        return header + body


class HashIndex:
    """Model files under GRIDRENDER_MODEL_DIR by A1111's hashes: sha256[:10] and the old 8-digit one."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder).expanduser() if folder else None
        self._files: list[Path] | None = None

    def files(self) -> list[Path]:
        if self._files is None:
            found = self.folder.rglob("*") if self.folder and self.folder.is_dir() else iter(())
            self._files = sorted(p for p in found if p.is_file() and p.suffix in SINGLE_FILE_SUFFIXES)
        return self._files

    def find(self, digest: str) -> Path | None:
        digest = digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            return None
        for path in self.files():
            if len(digest) == _LEGACY_HASH_DIGITS and _legacy_hash(path) == digest:
                return path
            if file_sha256(path).startswith(digest):
                return path
        return None


def _legacy_hash(path: Path) -> str:
    """A1111's old "Model hash": sha256 of 64 KiB at offset 1 MiB, 8 hex digits."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:_LEGACY_HASH_DIGITS]


def job_name(stem: str) -> str:
    name = _NAME_CHARS.sub("-", stem.lower()).strip("-_")
    return (name if name and name[0].isalnum() else f"img-{name}")[:100] or "imported"


def to_job(params: dict[str, str], name: str, index: HashIndex) -> Imported:
    """The job that renders one image's parameters again, with what it cannot render listed."""
    imported = Imported(name, {"name": name})
    job = imported.job
    for key, value in params.items():
        if key not in HANDLED and key not in HARMLESS and not _is_default(key, value):
            imported.unsupported[key] = value
    job["model"] = _model(params, index, imported)
    job["prompts"] = [params["Prompt"]]
    if params.get("Negative prompt"):
        job["negative_prompt"] = params["Negative prompt"]
    sampler, schedule = _sampler(params.get("Sampler", "Euler a"), params["Schedule type"], imported)
    schedule = _schedule_before_1_9(params, schedule, imported)
    if _downcast_alphas(params.get("Version", "")) and "Downcast alphas_cumprod" not in params:
        # infotext_versions.backcompat: A1111 1.10 renders such a text with alphas_cumprod in float16
        imported.unsupported["Downcast alphas_cumprod"] = (
            f"True (implied by Version {params['Version']}: A1111 before 1.7.0-225 rounded alphas_cumprod to float16)"
        )
    job["sampler"] = sampler
    job["schedule"] = schedule
    job.update(_image_settings(params))
    hires = _hires(params, imported, sampler, schedule)
    if hires:
        job["hires"] = hires
    elif "Denoising strength" in params:
        job["denoise"] = _float(params["Denoising strength"], "Denoising strength")
        imported.comments.append("img2img: the init image is not in the parameters; add `init_images: [FILE]`")
    _components(params, index, imported)
    return imported


def _schedule_before_1_9(params: dict[str, str], schedule: str, imported: Imported) -> str:
    """Uniform for a text an A1111 before 1.9 wrote with a sampler name without a schedule suffix.

    A1111 1.9+ always writes "Schedule type" (create_infotext: p.scheduler, "Automatic" at least), so a text
    without it comes from an older A1111, where a name without a schedule suffix meant Uniform. A1111 1.10's
    paste reads it as Automatic (parse_generation_parameters' default) and renders another image.
    """
    if (
        "Schedule type" in params.get("_missing", "")
        and not _at_least(params.get("Version", ""), (1, 9))
        and not samplers.split_name(params.get("Sampler", "Euler a"))[1]
        and schedule != samplers.UNIFORM
    ):
        made_by = f"made by {params['Version']}" if params.get("Version") else "no Schedule type, so made before 1.9"
        imported.comments.append(
            f"{made_by}: a sampler name without a schedule, so Uniform, as it rendered then "
            "(A1111 1.9+ would read it as Automatic)"
        )
        return samplers.UNIFORM
    return schedule


def _image_settings(params: dict[str, str]) -> dict[str, Any]:
    """Steps, CFG scale, seed, clip skip, size, RNG and ENSD as job keys, in the job file's order."""
    settings: dict[str, Any] = {
        "steps": _int(params.get("Steps", "20"), "Steps"),
        "guidance": _float(params.get("CFG scale", "7"), "CFG scale"),
        "seeds": [_int(params.get("Seed", "-1"), "Seed")],
        "clip_skip": _int(params["Clip skip"], "Clip skip"),
        "width": _int(params.get("Size-1", "512"), "Size"),
        "height": _int(params.get("Size-2", "512"), "Size"),
    }
    if params["RNG"] != samplers.DEFAULT_RNG:
        settings["rng"] = params["RNG"].upper()
    if params.get("ENSD"):
        settings["eta_noise_seed_delta"] = _int(params["ENSD"], "ENSD")
    return settings


def _components(params: dict[str, str], index: HashIndex, imported: Imported) -> None:
    """The VAE, found by its hash where it can be; notes on the LoRAs and embeddings the text names."""
    if "VAE" in params or "VAE hash" in params:
        found = index.find(params.get("VAE hash", "")) if params.get("VAE hash") else None
        if found is not None:
            imported.job["vae"] = str(found)
        else:
            imported.comments.append(
                f"VAE {params.get('VAE', '?')} (hash {params.get('VAE hash', '?')}): "
                "not found under GRIDRENDER_MODEL_DIR; set `vae:` to its file"
            )
    if "Lora hashes" in params:
        imported.comments.append(
            f"LoRAs (Lora hashes: {params['Lora hashes']}): the prompt's <lora:NAME:W> tags "
            "load GRIDRENDER_LORA_DIR/NAME.safetensors"
        )
    if "TI hashes" in params:
        imported.comments.append(f"embeddings (TI hashes: {params['TI hashes']}): list their files under `embeddings:`")


def _at_least(version: str, minimum: tuple[int, int]) -> bool:
    """An A1111 version string ("v1.9.4", "v1.6.0-2-g4afaaf8a") at least `minimum`; Forge's ("f0.0.17v1.8.0rc") too."""
    match = re.search(r"v(\d+)\.(\d+)\.\d+", version)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= minimum


def _downcast_alphas(version: str) -> bool:
    """infotext_versions.backcompat: Version below v1.7.0-225 turns on "Downcast alphas_cumprod".

    A1111's parse_version keeps "MAJOR.MINOR.PATCH-N" of "v1.7.0-133-gde03882d" (N: commits since the tag,
    a post-release to `packaging`); a text it cannot parse (Forge's "f0.0.17v1.8.0rc") turns nothing on.
    """
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)(?:-(\d+))?(?:-|$)", version)
    if match is None:
        return False
    major, minor, patch, post = (int(g) if g else 0 for g in match.groups())
    return (major, minor, patch, post) < (1, 7, 0, 225)


def _is_default(key: str, value: str) -> bool:
    return key in DEFAULTS and DEFAULTS[key] == value


def _model(params: dict[str, str], index: HashIndex, imported: Imported) -> str:
    name, digest = params.get("Model", ""), params.get("Model hash", "")
    if name.startswith("builtin:"):
        return name
    found = index.find(digest) if digest else None
    if found is not None:
        return str(found)
    imported.comments.append(
        f"model {name or '?'} (hash {digest or '?'}) is not under GRIDRENDER_MODEL_DIR: set `model:` to its file"
    )
    return (name + ".safetensors") if name else "MODEL.safetensors"


def _sampler(name: str, schedule: str, imported: Imported) -> tuple[str, str]:
    """sd_samplers.get_sampler_and_scheduler: "DPM++ 2M Karras" is DPM++ 2M with Karras (the suffix wins)."""
    try:
        base, implied = samplers.split_name(name)
        chosen = samplers.schedule(schedule)
    except samplers.UnknownName as exc:
        imported.unsupported["Sampler"] = f"{name} ({exc})"
        return "Euler a", samplers.AUTOMATIC
    return base.name, (implied or chosen).label


def _paste_setting(sampler: str, schedule: str) -> str:
    """The schedule setting A1111 1.10's paste leaves (get_sampler_and_scheduler, convert_automatic): Automatic
    where the schedule is the sampler's own 'scheduler' option (Karras for DPM++ 2M), else the schedule."""
    own = samplers.lookup(sampler).default_schedule
    return samplers.AUTOMATIC if own != samplers.UNIFORM and schedule == own else schedule


def _hires(params: dict[str, str], imported: Imported, sampler: str, schedule: str) -> dict[str, Any] | None:
    if not any(k.startswith("Hires ") for k in params if k not in ("Hires negative prompt", "Hires checkpoint")):
        return None
    hires: dict[str, Any] = {}
    if "Hires resize-1" in params:
        hires["resize"] = [_int(params["Hires resize-1"], "Hires resize"), _int(params["Hires resize-2"], "Hires resize")]
    else:
        hires["scale"] = _float(params.get("Hires upscale", "2"), "Hires upscale")
    upscaler = params.get("Hires upscaler", "Latent")
    if upscaler not in LATENT_MODES and upscaler not in PIXEL_UPSCALERS:
        imported.comments.append(f"hires upscaler {upscaler!r}: give its model file (.pth/.safetensors) as hires.upscaler")
        upscaler = upscaler + ".pth"
    hires["upscaler"] = upscaler
    hires["steps"] = _int(params.get("Hires steps", "0"), "Hires steps")
    hires["denoise"] = _float(params.get("Denoising strength", "0.7"), "Denoising strength")
    if params.get("Hires sampler") and params["Hires sampler"] != "Use same sampler":
        hires["sampler"] = params["Hires sampler"]
    if params.get("Hires schedule type") and params["Hires schedule type"] != "Use same scheduler":
        hires["schedule"] = params["Hires schedule type"]
    elif "sampler" in hires:
        hires_schedule = _same_scheduler(hires["sampler"], sampler, schedule)
        if hires_schedule is not None:
            hires["schedule"] = hires_schedule
    if params.get("Hires prompt"):
        hires["prompt"] = params["Hires prompt"]
    return hires


def _same_scheduler(hires_sampler: str, sampler: str, schedule: str) -> str | None:
    """A hires sampler's schedule under "Use same scheduler", as A1111 1.10 pastes and renders it.

    get_hr_sampler_and_scheduler leaves hr_scheduler unset, so the hires pass takes the pasted setting
    (Automatic where the schedule was the first sampler's own), and Automatic means the hires sampler's own
    schedule (sd_samplers_kdiffusion.get_sigmas): "DPM++ 2M, Karras, Hires sampler: Euler" runs Euler with
    Uniform. None where the job's own schedule already gives that (no key to write).
    """
    try:
        base, implied = samplers.split_name(hires_sampler)
    except samplers.UnknownName:
        return None  # the job file's validation names it
    if implied is not None or base.family != "a1111":
        return None
    setting = _paste_setting(sampler, schedule)
    return None if setting == schedule else samplers.canonical(base.name, setting)[1]


def _int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{key}: {value!r} is not a whole number") from None


def _float(value: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(f"{key}: {value!r} is not a number") from None


def import_images(paths: list[Path], settings: Settings | None = None) -> Iterator[Imported]:
    """One job per image, in order; an image without parameters is an input error."""
    settings = settings or Settings()
    index = HashIndex(settings.model_dir)
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        try:
            text = read_parameters(data)
        except Exception as exc:  # noqa: BLE001  (PIL's parsers raise all kinds on a damaged file: none is an image)
            raise InputError(f"{path} is not an image with parameters: {exc}") from None
        if not text:
            raise InputError(f"{path} carries no generation parameters (no 'parameters' text, no EXIF comment)")
        yield to_job(parse_generation_parameters(text), job_name(path.stem), index)
