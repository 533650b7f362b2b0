"""Loading Stable Diffusion pipelines and keeping them resident.

A worker loads each (model, dtype) once and reuses it for every chunk; loads are
counted so tests and logs can show that the pipeline stayed hot.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gridrender.scheduler.errors import ModelError
from gridrender.scheduler.models import BUILTINS, ModelSpec, config_dir

from . import builtin

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Where SD 1.x's CLIP tokenizer may already lie in the Hugging Face cache.
SD15_TOKENIZER_REPOS = [
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer/"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer/"),
    ("openai/clip-vit-large-patch14", ""),
]


def quiet_libraries() -> None:
    """diffusers/transformers print progress bars and advice meant for notebooks."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gridrender"


def default_device() -> torch.device:
    wanted = os.environ.get("GRIDRENDER_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    pipe: object
    model: ModelSpec
    dtype: str
    load_seconds: float


class PipelineCache:
    """The resident pipelines of one worker process (normally exactly one)."""

    def __init__(self, device: torch.device | None = None, keep: int = 1):
        quiet_libraries()
        self.device = device or default_device()
        self.keep = keep
        self.loaded: dict[tuple, Loaded] = {}
        self.loads = 0

    def get(self, model: ModelSpec, dtype: str) -> Loaded:
        key = (json_key(model), dtype)
        if key in self.loaded:
            return self.loaded[key]
        while len(self.loaded) >= self.keep:  # one GPU holds one SD pipeline comfortably
            self.loaded.pop(next(iter(self.loaded)))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        start = time.perf_counter()
        pipe = load(model, DTYPES[dtype], self.device)
        self.loads += 1
        loaded = Loaded(pipe, model, dtype, time.perf_counter() - start)
        log.info("model load #%d: %s (%s) on %s in %.2fs", self.loads, model.source, dtype, self.device, loaded.load_seconds)
        self.loaded[key] = loaded
        return loaded


    def put(self, model: ModelSpec, dtype: str, pipe) -> Loaded:
        """Make an already built pipeline resident (benchmarks with random full-size weights)."""
        loaded = Loaded(make_resident(pipe, self.device), model, dtype, 0.0)
        self.loaded[(json_key(model), dtype)] = loaded
        return loaded


def json_key(model: ModelSpec) -> tuple:
    return tuple(sorted(model.identity().items()))


def load(model: ModelSpec, dtype: torch.dtype, device: torch.device):
    from diffusers import StableDiffusionPipeline

    # No safety checker (it blanks research grids) and so no feature extractor: folders
    # that list them in model_index.json but lack their files load all the same.
    common = dict(torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        if model.kind == "builtin":
            pipe = StableDiffusionPipeline.from_pretrained(builtin_folder(model.location), local_files_only=True, **common)
        elif model.kind == "folder":
            pipe = StableDiffusionPipeline.from_pretrained(model.location, local_files_only=True, **common)
        elif model.kind == "file":
            pipe = StableDiffusionPipeline.from_single_file(
                model.location, config=str(single_file_config(model.config or "sd15")), local_files_only=True, **common
            )
        elif model.kind == "hub":
            pipe = StableDiffusionPipeline.from_pretrained(model.location, revision=model.revision, **common)
        else:
            raise ModelError(f"unknown model kind {model.kind!r}")
    except ModelError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"cannot load model {model.source!r}: {exc}") from exc
    return make_resident(pipe, device)


def make_resident(pipe, device: torch.device):
    """Quiet, on the device, and tuned for it: every pipeline goes through here."""
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda":
        tune_for_cuda(pipe)
    return pipe


def tune_for_cuda(pipe) -> None:
    """Settings that pay off on a GPU: cuDNN autotuning, channels_last, SDPA, optional compile."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # PyTorch's fused scaled-dot-product attention
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if os.environ.get("GRIDRENDER_COMPILE", "") not in ("", "0"):
        # Compiles on the first call of each shape (minutes), then saves 10-30% per step.
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=True)


def builtin_folder(name: str) -> Path:
    """The builtin model written once into the cache as a diffusers folder."""
    folder = cache_root() / "builtin" / f"{name}-{BUILTINS[name]}"
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        builtin.materialize(name, tmp)
        try:
            tmp.rename(folder)  # concurrent workers: the first rename wins, the rest reuse it
        except OSError:
            if not (folder / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def single_file_config(name: str) -> Path:
    """A diffusers config folder (configs + tokenizer, no weights) for `from_single_file`."""
    if name in BUILTINS:
        return builtin_folder(name)
    folder = cache_root() / "configs" / name
    if (folder / "tokenizer" / ".complete").is_file():
        return folder
    tokenizer = _cached_sd15_tokenizer()
    if tokenizer is None:
        raise ModelError(
            "loading a single-file SD 1.x checkpoint needs the CLIP tokenizer (vocab.json, merges.txt), "
            "which is not in the local Hugging Face cache; download it once with network "
            "(e.g. `huggingface-cli download openai/clip-vit-large-patch14 vocab.json merges.txt`)"
        )
    shutil.copytree(config_dir(name), folder, dirs_exist_ok=True)
    for file in tokenizer:
        shutil.copy(file, folder / "tokenizer" / file.name)
    (folder / "tokenizer" / ".complete").write_text("")
    return folder


def _cached_sd15_tokenizer() -> list[Path] | None:
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in SD15_TOKENIZER_REPOS:
        files = [try_to_load_from_cache(repo, f"{sub}{name}") for name in ("vocab.json", "merges.txt")]
        if all(isinstance(f, str) for f in files):
            return [Path(f) for f in files]
    return None
