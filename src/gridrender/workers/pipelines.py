"""Loading Stable Diffusion pipelines and keeping them resident.

A worker loads each (model, dtype) once and reuses it for every chunk; loads are
counted so tests and logs can show that the pipeline stayed hot. What rendering
needs beside the pipeline (the prompt encoder, the model's own scheduler config and
its sigmas) is built once at load and lives with it. SD 1.x models load as
StableDiffusionPipeline, SDXL-family ones as StableDiffusionXLPipeline; a single file
of either loads offline from configs and CLIP's vocabulary shipped with gridrender.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gridrender.scheduler.errors import ModelError
from gridrender.scheduler.families import SDXL, V_PREDICTION
from gridrender.scheduler.models import BUILTINS, ModelSpec, check_weights, config_dir
from gridrender.scheduler.settings import Settings
from gridrender.scheduler.tokens import CLIP_MERGES, CLIP_VOCAB

from . import builtin
from .clip import PromptEncoder
from .compiled import EAGER, Compiled, enabled, use_cache_dir
from .components import Extras, upcast_vae
from .sigmas import ModelSigmas, alphas_cumprod, rescale_zero_terminal_snr

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quiet_libraries() -> None:
    """diffusers/transformers print progress bars and advice meant for notebooks."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    # transformers leaves these unannotated (diffusers' are exempt in pyproject: untyped_calls_exclude).
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)


def cache_root() -> Path:
    return Settings().cache_root()


def default_device() -> torch.device:
    wanted = Settings().device
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    """A resident pipeline and what rendering with it needs, built once."""

    pipe: Any  # a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline
    model: ModelSpec
    dtype: str
    load_seconds: float
    encoder: PromptEncoder
    scheduler_config: dict[str, Any]  # the model's own (prediction and noise schedule as the model says them)
    sigmas: ModelSigmas | None  # None: the model's noise schedule is not one A1111's samplers know
    unet: Callable[..., Any]  # pipe.unet, compiled where compiling is on
    decode: Callable[..., Any]  # pipe.vae.decode, likewise
    extras: Extras = field(default_factory=Extras)  # merged LoRAs, other VAEs, embedding vectors

    def vae_config_folder(self) -> Path:
        """A folder with the model's VAE config, for loading a single-file VAE offline."""
        model = self.model
        if model.kind == "folder":
            return Path(model.location) / "vae"
        if model.kind == "builtin":
            return builtin_folder(model.location) / "vae"
        return single_file_config(model.config or "sd15") / "vae"

    @property
    def xl(self) -> bool:
        return self.model.family == SDXL

    @classmethod
    def wrap(cls, pipe: Any, model: ModelSpec, dtype: str, load_seconds: float, compile_mode: str | None = None) -> Loaded:
        # What the model (or the job's override of it) says, whatever the shipped or saved config said.
        config = {
            **dict(pipe.scheduler.config),
            "prediction_type": model.prediction,
            "rescale_betas_zero_snr": model.zero_terminal_snr,
        }
        try:
            cumprod = alphas_cumprod(config)
            sigmas = ModelSigmas(
                rescale_zero_terminal_snr(cumprod) if model.zero_terminal_snr else cumprod, xl=model.family == SDXL
            )
        except (KeyError, ValueError):
            sigmas = None
        upcast_vae(pipe.vae, xl=model.family == SDXL)
        unet, decode = pipe.unet, pipe.vae.decode
        if compile_mode:
            unet, decode = Compiled(unet, "UNet", compile_mode), Compiled(decode, "VAE decoder", compile_mode)
        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        return cls(pipe, model, dtype, load_seconds, encoder, config, sigmas, unet, decode)

    @property
    def v_prediction(self) -> bool:
        return self.model.prediction == V_PREDICTION

    @property
    def compiled(self) -> bool:
        """Whether calls are compiled: then shapes should stay static (short batches padded)."""
        return isinstance(self.unet, Compiled) and self.unet.state != EAGER

    def compile_state(self) -> dict[str, str]:
        """What a record says about compilation: the mode each module ran in."""
        return {
            name: (module.state if isinstance(module, Compiled) else EAGER)
            for name, module in (("unet", self.unet), ("vae_decode", self.decode))
        }


# A resident pipeline's key: the model's identity as sorted (name, value) pairs, and the dtype.
PipelineKey = tuple[tuple[tuple[str, Any], ...], str]


class PipelineCache:
    """The resident pipelines of one worker process (normally exactly one)."""

    def __init__(self, device: torch.device | None = None, keep: int = 1, compile_mode: str | None = None):
        """`compile_mode`: None decides from GRIDRENDER_COMPILE and the device; "eager" never compiles."""
        quiet_libraries()
        settings = Settings()
        self.device = device or default_device()
        self.keep = keep
        self.loaded: dict[PipelineKey, Loaded] = {}
        self.loads = 0
        if compile_mode is None:
            compile_mode = settings.compile_mode if enabled(self.device, settings) else EAGER
        self.compile_mode = None if compile_mode == EAGER else compile_mode
        if self.compile_mode:
            log.info(
                "compiling the UNet and VAE decoder (mode %s); kernels cached in %s", self.compile_mode, use_cache_dir(settings)
            )

    def get(self, model: ModelSpec, dtype: str) -> Loaded:
        key = (json_key(model), dtype)
        if key in self.loaded:
            return self.loaded[key]
        while len(self.loaded) >= self.keep:  # one GPU holds one SD pipeline comfortably
            self.loaded.pop(next(iter(self.loaded)))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        start = time.perf_counter()
        check_weights(model)  # every (re)load: the file may have been replaced since it was hashed
        pipe = load(model, DTYPES[dtype], self.device)
        check_weights(model)  # and not while it was read
        self.loads += 1
        loaded = Loaded.wrap(pipe, model, dtype, time.perf_counter() - start, self.compile_mode)
        log.info("model load #%d: %s (%s) on %s in %.2fs", self.loads, model.source, dtype, self.device, loaded.load_seconds)
        self.loaded[key] = loaded
        return loaded

    def put(self, model: ModelSpec, dtype: str, pipe: Any) -> Loaded:
        """Make an already built pipeline resident (benchmarks with random full-size weights)."""
        loaded = Loaded.wrap(make_resident(pipe, self.device), model, dtype, 0.0, self.compile_mode)
        self.loaded[(json_key(model), dtype)] = loaded
        return loaded


def json_key(model: ModelSpec) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(model.identity().items()))


def load(model: ModelSpec, dtype: torch.dtype, device: torch.device) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.family == SDXL:
        cls: Any = StableDiffusionXLPipeline
        common: dict[str, Any] = dict(torch_dtype=dtype, add_watermarker=False)
    else:
        # No safety checker (it blanks research grids) and so no feature extractor: folders
        # that list them in model_index.json but lack their files load all the same.
        cls = StableDiffusionPipeline
        common = dict(torch_dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        if model.kind == "builtin":
            pipe = cls.from_pretrained(builtin_folder(model.location), local_files_only=True, **common)
        elif model.kind == "folder":
            pipe = cls.from_pretrained(model.location, local_files_only=True, **common)
        elif model.kind == "file":
            pipe = cls.from_single_file(
                model.location, config=str(single_file_config(model.config or "sd15")), local_files_only=True, **common
            )
        elif model.kind == "hub":
            pipe = cls.from_pretrained(model.location, revision=model.revision, **common)
        else:
            raise ModelError(f"unknown model kind {model.kind!r}")
    except ModelError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {model.source!r}: {exc}") from exc
    return make_resident(pipe, device)


def make_resident(pipe: Any, device: torch.device) -> Any:
    """Quiet, on the device, and tuned for it: every pipeline goes through here."""
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device.type == "cuda":
        tune_for_cuda()
    return pipe


def tune_for_cuda() -> None:
    """Only settings a measurement justified (BENCHMARKS.md, H100, SD 1.5 fp16 batch 8).

    cuDNN autotuning: 5.16 -> 5.24 img/s. Not set: channels_last (4.53, -13%), TF32
    (5.14; fp16 matmuls do not use it), an explicit SDPA processor (diffusers' default).
    """
    torch.backends.cudnn.benchmark = True


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
    """A diffusers config folder (configs + tokenizers, no weights) for `from_single_file`, made offline.

    The shipped configs with CLIP's shipped vocabulary in every tokenizer folder; a
    builtin's shapes are the builtin's own folder (its byte-level tokenizer).
    """
    if name in BUILTINS:
        return builtin_folder(name)
    folder = cache_root() / "configs" / name
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        shutil.copytree(config_dir(name), tmp, dirs_exist_ok=True)
        for tokenizer in tmp.glob("tokenizer*"):
            shutil.copy(CLIP_VOCAB, tokenizer / "vocab.json")
            shutil.copy(CLIP_MERGES, tokenizer / "merges.txt")
        (tmp / ".complete").write_text("")
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
