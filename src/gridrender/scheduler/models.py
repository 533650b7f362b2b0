"""Which model a job means, and its identity, resolved without loading it.

The scheduler must know a model's identity (it is part of every cell id), its family
(SD 1.x or SDXL, `families.py`) and its number of CLIP layers (to validate `clip_skip`)
without torch: all come from config files, safetensors headers and the Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import families
from .errors import ModelError, ModelInputError
from .families import SD1, SDXL, Prediction
from .settings import Settings
from .weightfiles import file_sha256, folder_sha256, safetensors_shapes

CONFIG_ROOT = Path(__file__).parent / "modelconfigs"
BUILTINS = {"tiny": "tiny-v1", "tiny-sdxl": "tiny-sdxl-v1"}  # name -> version; bump the version when its weights change
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSpec:
    source: str  # as written in the job file
    kind: str  # builtin | folder | file | hub
    location: str  # builtin name, absolute path, or hub id
    revision: str | None  # resolved hub commit, or the builtin's version
    sha256: str | None  # of a single file, or of a folder's files
    clip_layers: int  # of the (first) text encoder
    config: str | None = None  # shipped config folder a single file is loaded with
    family: str = SD1  # families.SD1 | families.SDXL
    clip_layers_2: int | None = None  # SDXL's second text encoder (OpenCLIP bigG)
    prediction: str = families.EPSILON  # what the UNet predicts: epsilon | v_prediction
    zero_terminal_snr: bool = False  # A1111's "Zero Terminal SNR" noise schedule

    def identity(self) -> dict[str, Any]:
        """What makes two references the same model, independent of where it lies.

        A prediction type or noise schedule other than the files' own (a job's override)
        is part of it: the same weights render other images.
        """
        if self.kind in ("builtin", "hub"):
            identity: dict[str, Any] = {"kind": self.kind, "name": self.location, "revision": self.revision}
        else:
            identity = {"kind": "weights", "sha256": self.sha256}
        if self.prediction != families.EPSILON:
            identity["prediction"] = self.prediction
        if self.zero_terminal_snr:
            identity["zero_terminal_snr"] = True
        return identity

    @property
    def max_clip_skip(self) -> int:
        """The largest `clip_skip`: every encoder must have that many layers."""
        return min(self.clip_layers, self.clip_layers_2 or self.clip_layers)

    def encoder_layers(self) -> list[int]:
        """Layers of each text encoder, in the order their states are concatenated."""
        return [self.clip_layers] if self.clip_layers_2 is None else [self.clip_layers, self.clip_layers_2]

    def with_prediction(self, found: Prediction) -> ModelSpec:
        return replace(self, prediction=found.prediction, zero_terminal_snr=found.zero_terminal_snr)

    def short_hash(self) -> str:
        """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
        if self.sha256:
            return self.sha256[:10]
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What a cell's record says about its model; `identity` is what reproduce compares."""
        return {
            "source": self.source,
            "kind": self.kind,
            "identity": self.identity(),
            "revision": self.revision,
            "sha256": self.sha256,
            "hash": self.short_hash(),
            "config": self.config,
            "clip_layers": self.clip_layers,
            "family": self.family,
            "clip_layers_2": self.clip_layers_2,
            "prediction": self.prediction,
            "zero_terminal_snr": self.zero_terminal_snr,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**data)


def resolve(source: str, revision: str | None = None, settings: Settings | None = None) -> ModelSpec:
    settings = settings or Settings()
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTINS:
            raise ModelInputError(f"unknown builtin model {source!r}; builtins: " + ", ".join(f"builtin:{n}" for n in BUILTINS))
        return _from_configs(ModelSpec(source, "builtin", name, BUILTINS[name], None, 0), CONFIG_ROOT / name)
    path = _find_local(source, settings)
    if path is not None:
        if path.is_dir():
            return _resolve_folder(source, path)
        return _resolve_file(source, path)
    if _HUB_ID.match(source) and not source.endswith(SINGLE_FILE_SUFFIXES):
        return _resolve_hub(source, revision)
    raise ModelInputError(f"no model file or folder {source!r} (looked in the working directory and GRIDRENDER_MODEL_DIR)")


def _find_local(source: str, settings: Settings) -> Path | None:
    candidates = [Path(source).expanduser()]
    if settings.model_dir and not Path(source).is_absolute():
        candidates.append(Path(settings.model_dir).expanduser() / source)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    return None


def _resolve_folder(source: str, path: Path) -> ModelSpec:
    if not (path / "model_index.json").is_file():
        raise ModelInputError(f"{source!r} is not a diffusers pipeline folder (needs model_index.json)")
    return _from_configs(ModelSpec(source, "folder", str(path), None, folder_sha256(path), 0), path)


def _from_configs(spec: ModelSpec, folder: Path, read: Callable[[str], Path] | None = None) -> ModelSpec:
    """Family, CLIP layers and prediction of a diffusers layout (a folder, a builtin, a hub snapshot)."""
    read = read or (lambda name: folder / name)
    index = _read_json(read("model_index.json"), spec.source)
    family = families.folder_family(index, spec.source)
    layers = _clip_layers_from_config(read("text_encoder/config.json"))
    layers_2 = _clip_layers_from_config(read("text_encoder_2/config.json")) if family == SDXL else None
    try:
        scheduler = _read_json(read("scheduler/scheduler_config.json"), spec.source)
    except ModelError:
        scheduler = {}
    found = families.scheduler_prediction(scheduler)
    return replace(spec, clip_layers=layers, family=family, clip_layers_2=layers_2).with_prediction(found)


def _read_json(path: Path, source: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"cannot read {path.name} of {source!r}: {exc}") from None
    return data


def _resolve_file(source: str, path: Path) -> ModelSpec:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelInputError(f"{source!r}: a single-file model must end in .safetensors or .ckpt")
    if path.suffix == ".ckpt":
        # A pickled .ckpt cannot be inspected without torch (nor safely); SD 1.x is the common case.
        return ModelSpec(source, "file", str(path), None, file_sha256(path), 12, "sd15")
    shapes = safetensors_shapes(path)
    try:
        family = families.checkpoint_family(shapes)
    except ModelInputError as exc:
        raise ModelInputError(f"{source!r} {exc}") from None
    spec = _match_config(source, path, shapes, family)
    return spec.with_prediction(families.checkpoint_prediction(shapes))


def _match_config(source: str, path: Path, shapes: dict[str, list[int]], family: str) -> ModelSpec:
    """The shipped config whose text encoders and UNet match the checkpoint's widths and depths."""
    conv_in = shapes.get(families.UNET + "input_blocks.0.0.weight", [0])[0]
    encoders: tuple[tuple[int, int], ...]
    if family == SDXL:
        encoders = families.xl_encoders(shapes)
    else:
        prefix = next((p for p in families.SD1_TEXT if p + "embeddings.token_embedding.weight" in shapes), families.SD1_TEXT[0])
        width = shapes.get(prefix + "embeddings.token_embedding.weight", [0, 0])[1]
        encoders = ((int(width), families.encoder_layers(shapes, prefix, r"encoder\.layers\.(\d+)\.")),)
    for config_dir in sorted(d for d in CONFIG_ROOT.iterdir() if (d / "model_index.json").is_file()):
        index = json.loads((config_dir / "model_index.json").read_text())
        if families.folder_family(index, config_dir.name) != family:
            continue
        unet = json.loads((config_dir / "unet" / "config.json").read_text())
        names = ["text_encoder", "text_encoder_2"][: len(encoders)]
        configs = [json.loads((config_dir / n / "config.json").read_text()) for n in names]
        if unet["block_out_channels"][0] == conv_in and all(
            c["hidden_size"] == w and (c["num_hidden_layers"] == n or not n) for c, (w, n) in zip(configs, encoders, strict=True)
        ):
            layers = [n or c["num_hidden_layers"] for c, (_, n) in zip(configs, encoders, strict=True)]
            return ModelSpec(
                source,
                "file",
                str(path),
                None,
                file_sha256(path),
                layers[0],
                config_dir.name,
                family,
                layers[1] if family == SDXL else None,
            )
    what = "SDXL" if family == SDXL else "SD 1.x"
    raise ModelInputError(
        f"{source!r} is an {what} checkpoint whose text encoders and UNet (widths "
        f"{[w for w, _ in encoders]}, conv_in {conv_in}) match no shipped config (scheduler/modelconfigs)"
    )


def _resolve_hub(source: str, revision: str | None) -> ModelSpec:
    commit = revision if revision and _COMMIT.match(revision) else _hub_commit(source, revision)
    spec = ModelSpec(source, "hub", source, commit, None, 0)
    return _from_configs(spec, Path(source), lambda name: _hub_file(source, commit, name))


def _hub_commit(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import HfApi, constants

    ref = revision or "main"
    ref_file = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / ref
    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().model_info(repo_id, revision=ref, timeout=10).sha
            if sha:
                return sha
        except (OSError, ValueError) as exc:  # network down, private repo, unknown id: fall back to the cache
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if ref_file.is_file():
        return ref_file.read_text().strip()
    raise ModelError(
        f"cannot resolve hub model {repo_id!r} at revision {ref!r}: the hub is unreachable ({reason}) "
        "and the model is not in the local Hugging Face cache. Download it once with network, "
        "or point `model:` at a local folder or .safetensors file."
    )


def _hub_file(repo_id: str, commit: str, filename: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=commit, local_files_only=constants.HF_HUB_OFFLINE))
    except (LocalEntryNotFoundError, OSError) as exc:  # not in the cache (offline), or the network failed
        raise ModelError(f"cannot read {filename} of hub model {repo_id!r} at {commit}: {exc}") from None
    except (EntryNotFoundError, RepositoryNotFoundError) as exc:
        raise ModelInputError(
            f"hub model {repo_id!r} at {commit} has no {filename}: not a diffusers SD pipeline ({type(exc).__name__})"
        ) from None


def _clip_layers_from_config(path: Path) -> int:
    try:
        return int(json.loads(path.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelInputError(f"cannot read the CLIP layer count from {path}: {exc}") from None


def check_weights(spec: ModelSpec) -> None:
    """A file or folder model still hashes to the sha256 it was submitted with; else a ModelError.

    Called before and after every load into a pipeline (a file replaced on disk mid-job must not
    put new weights under the old cell ids). Cheap while nothing changed: a stat per file.
    """
    if spec.kind not in ("file", "folder") or spec.sha256 is None:
        return
    path = Path(spec.location)
    try:
        digest = folder_sha256(path) if spec.kind == "folder" else file_sha256(path)
    except OSError as exc:
        raise ModelError(f"model {spec.source!r} ({path}) cannot be read: {exc}") from None
    if digest != spec.sha256:
        raise ModelError(
            f"model {spec.source!r} ({path}) changed on disk: sha256 {digest} != {spec.sha256} "
            "(the submitted one); its cells fail rather than render other weights under their ids"
        )


def config_dir(name: str) -> Path:
    return CONFIG_ROOT / name


def model_config(model: ModelSpec, component: str) -> dict[str, Any]:
    """A component's config.json (unet, vae, text_encoder) of the model, read without loading it."""
    if model.kind == "builtin":
        path = CONFIG_ROOT / model.location / component / "config.json"
    elif model.kind == "folder":
        path = Path(model.location) / component / "config.json"
    elif model.kind == "file":
        path = config_dir(model.config or "sd15") / component / "config.json"
    else:
        path = _hub_file(model.location, model.revision or "main", f"{component}/config.json")
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"cannot read {component}/config.json of {model.source}: {exc}") from None
    return config


def hub_vae(repo_id: str, revision: str | None = None) -> str:
    """The resolved commit of a hub VAE (a diffusers AutoencoderKL repository)."""
    commit = revision if revision and _COMMIT.match(revision) else _hub_commit(repo_id, revision)
    _hub_file(repo_id, commit, "config.json")
    return commit
