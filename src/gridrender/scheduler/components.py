"""VAEs, LoRAs and textual-inversion embeddings: found, hashed and checked against the model.

Without torch: a file's identity is its sha256, and whether it fits the model is read
from safetensors headers (tensor names and shapes) and the model's configs. A file
that does not fit is an input error at `validate`, never a failed render at night.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelInputError, StorageError
from .families import SDXL
from .layers import LayerTable, layer_table
from .lorafiles import LoraFit, fit_lora
from .models import ModelSpec, model_config
from .settings import Settings
from .weightfiles import file_sha256, folder_sha256, safetensors_data_sha256, safetensors_header, safetensors_shapes

if TYPE_CHECKING:
    from .hires import InitImage

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
LORA_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VECTORS_BY_WIDTH = 2  # an embedding tensor's rank when it holds several vectors: (vectors, width)


@dataclass(frozen=True)
class Component:
    """A VAE, a LoRA or an embedding: where it lies, what it is (sha256), how it is called."""

    kind: str  # "vae" | "lora" | "embedding"
    name: str  # label: file stem, folder name, hub id; an embedding's trigger word
    source: str  # as written in the job file (or the <lora:> tag's name)
    location: str  # absolute path, or hub id
    sha256: str | None  # of the file, or of the folder's files
    revision: str | None = None  # hub VAEs: the resolved commit
    vectors: int = 0  # embeddings: tokens it occupies in a prompt
    a1111_hash: str | None = None  # LoRAs: the hash A1111 and civitai know them by (of the tensor data)

    def identity(self) -> dict[str, str | None]:
        if self.sha256:
            return {"kind": self.kind, "sha256": self.sha256}
        return {"kind": self.kind, "hub": self.location, "revision": self.revision}

    def identity_key(self) -> str:
        """The identity as one string: the sha256, or hub id @ revision."""
        return self.sha256 or f"{self.location}@{self.revision}"

    def short_hash(self) -> str:
        """A1111's hash for infotext: 10 hex digits for VAEs, 12 for LoRAs (of A1111's own hash) and embeddings."""
        digest = self.a1111_hash or self.identity_key()
        return digest[: 10 if self.kind == "vae" else 12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Component:
        return cls(**data)

    def record(self) -> dict[str, Any]:
        return {**self.to_dict(), "identity": self.identity(), "hash": self.short_hash()}


@dataclass(frozen=True)
class LoraUse:
    """A LoRA as a cell applies it: A1111's text-encoder and UNet multipliers (`<lora:NAME:TE:UNET>`)."""

    lora: Component
    te: float
    unet: float
    mention: str  # the name the prompt (or the infotext) calls it by

    def identity(self) -> list[Any]:
        return [self.lora.identity()["sha256"], self.te, self.unet]

    def public(self) -> dict[str, Any]:
        """As records and manifests show it: the path and weight, and the UNet weight where it differs."""
        shown: dict[str, Any] = {"path": self.lora.source, "weight": self.te}
        if self.unet != self.te:
            shown["unet_weight"] = self.unet
        return shown

    def pack(self) -> list[Any]:
        return [self.lora.to_dict(), self.te, self.unet, self.mention]

    @classmethod
    def unpack(cls, data: list[Any]) -> LoraUse:
        lora_data, te, *later = data  # packs written before UNet weights and mentions lack them
        lora = Component.from_dict(lora_data)
        unet = float(later[0]) if later else float(te)
        mention = str(later[1]) if len(later) > 1 else lora.name
        return cls(lora, float(te), unet, mention)


def _find(source: str, base: str | None, what: str) -> Path:
    candidates = [Path(source).expanduser()]
    if base and not Path(source).is_absolute():
        candidates.append(Path(base).expanduser() / source)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise ModelInputError(f"no {what} {source!r} (looked in the working directory{' and ' + base if base else ''})")


def _read_shapes(path: Path, what: str) -> dict[str, list[int]]:
    try:
        return safetensors_shapes(path)
    except OSError as exc:
        raise ModelInputError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


# -- VAE ----------------------------------------------------------------------------------


def resolve_vae(source: str, model: ModelSpec, settings: Settings) -> Component:
    """A VAE folder (diffusers AutoencoderKL), a .safetensors file, or a hub id."""
    latent = int(model_config(model, "vae").get("latent_channels", 4))
    path = None
    try:
        path = _find(source, settings.model_dir, "VAE")
    except ModelInputError:
        if not (_HUB_ID.match(source) and not source.endswith(".safetensors")):
            raise
    if path is None:
        from .models import hub_vae

        revision = hub_vae(source)
        return Component("vae", source, source, source, None, revision)
    if path.is_dir():
        config_file = path / "config.json"
        import json

        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            raise ModelInputError(f"VAE folder {source!r} has no readable config.json") from None
        if config.get("_class_name") != "AutoencoderKL" or int(config.get("latent_channels", 4)) != latent:
            raise ModelInputError(f"{source!r} is not an AutoencoderKL with {latent} latent channels (the model's)")
        return Component("vae", path.name, source, str(path), folder_sha256(path))
    if path.suffix != ".safetensors":
        raise ModelInputError(f"{source!r}: a VAE file must be .safetensors (or give a diffusers VAE folder)")
    shapes = _read_shapes(path, "VAE")
    conv_in = next(
        (shapes[k] for k in ("decoder.conv_in.weight", "first_stage_model.decoder.conv_in.weight") if k in shapes), None
    )
    if conv_in is None:
        raise ModelInputError(f"{source!r} is not a VAE (no decoder.conv_in weights)")
    if conv_in[1] != latent:
        raise ModelInputError(f"{source!r} decodes {conv_in[1]} latent channels; the model makes {latent}")
    return Component("vae", path.stem, source, str(path), file_sha256(path))


# -- LoRA ---------------------------------------------------------------------------------


def resolve_lora(source: str, model: ModelSpec, settings: Settings, notes: list[str] | None = None) -> Component:
    """A LoRA file that fits the model (A1111's key matching), with its sha256 and A1111's hash.

    `notes` receives what `validate` should say about it: the keys A1111 would not
    match, the layers it would leave alone.
    """
    path = _find(source if source.endswith(LORA_SUFFIXES) else source + ".safetensors", settings.lora_dir, "LoRA")
    if path.suffix not in LORA_SUFFIXES:
        raise ModelInputError(f"{source!r}: a LoRA must be a .safetensors file")
    try:
        shapes, metadata = safetensors_header(path)
    except OSError as exc:
        raise ModelInputError(f"cannot read LoRA {str(path)!r}: {exc.strerror}") from None
    table = model_layers(model)
    fit = fit_lora(shapes, metadata, table)
    problem = fit.problem(table.family)
    if problem:
        raise ModelInputError(f"LoRA {path.name!r} does not fit {model.source}: {problem}")
    if notes is not None:
        notes += lora_notes(path.name, fit)
    return Component("lora", path.stem, source, str(path), file_sha256(path), a1111_hash=lora_hash(path, metadata))


def lora_notes(name: str, fit: LoraFit) -> list[str]:
    """What A1111 would log about a LoRA it loads: keys it didn't match, layers it leaves alone."""
    notes = []
    if fit.unmatched:
        notes.append(f"LoRA {name!r} {fit.didnt_match()} (A1111 skips them too)")
    notes += [f"LoRA {name!r}: {reason}" for reason in fit.skipped]
    return notes


def lora_hash(path: Path, metadata: dict[str, str]) -> str:
    """A1111's LoRA hash (network.py NetworkOnDisk): kohya's `sshs_model_hash` metadata, else the addnet hash."""
    return metadata.get("sshs_model_hash") or safetensors_data_sha256(path)


@functools.lru_cache(maxsize=16)
def model_layers(model: ModelSpec) -> LayerTable:
    """The model's layers as A1111 names them, from its configs (SDXL: both text encoders)."""
    unet = model_config(model, "unet")
    encoders = [model_config(model, "text_encoder")]
    if model.family == SDXL:
        encoders.append(model_config(model, "text_encoder_2"))
    try:
        return layer_table(unet, encoders)
    except (KeyError, ValueError) as exc:
        raise ModelInputError(f"cannot tell which layers of {model.source} a LoRA may change: {exc}") from None


# -- embeddings ---------------------------------------------------------------------------


def _embedding_vectors(file: Path, shapes: dict[str, list[int]], model: ModelSpec) -> int:
    """How many vectors an embedding file holds, checked against the model's text encoder widths.

    SD 1.x: one tensor of the encoder's width. SDXL: `clip_l` and `clip_g`, one per encoder.
    """
    widths = [int(model_config(model, "text_encoder")["hidden_size"])]
    if model.family == SDXL:
        widths.append(int(model_config(model, "text_encoder_2")["hidden_size"]))
    if "clip_l" in shapes and "clip_g" in shapes:
        if model.family != SDXL:
            raise ModelInputError(
                f"embedding {file.stem!r} is an SDXL embedding (clip_l + clip_g); {model.source} is an SD 1.x model"
            )
        for key, width in zip(("clip_l", "clip_g"), widths, strict=True):
            if shapes[key][-1] != width:
                raise ModelInputError(
                    f"embedding {file.stem!r}: {key} has width {shapes[key][-1]}; {model.source}'s encoder has {width}"
                )
        if shapes["clip_l"][0] != shapes["clip_g"][0]:
            raise ModelInputError(f"embedding {file.stem!r}: clip_l and clip_g hold different numbers of vectors")
        return int(shapes["clip_l"][0]) if len(shapes["clip_l"]) == _VECTORS_BY_WIDTH else 1
    tensors = [s for s in shapes.values() if len(s) in (1, 2)]
    if len(tensors) != 1:
        raise ModelInputError(f"{str(file)!r} is not a textual-inversion embedding (one tensor, or clip_l + clip_g)")
    if model.family == SDXL:
        raise ModelInputError(
            f"embedding {file.stem!r} is an SD 1.x embedding (one tensor); {model.source} is SDXL, "
            "whose embeddings hold clip_l and clip_g"
        )
    shape = tensors[0] if len(tensors[0]) == _VECTORS_BY_WIDTH else [1, tensors[0][0]]
    if shape[1] != widths[0]:
        raise ModelInputError(f"embedding {file.stem!r} has width {shape[1]}; {model.source}'s text encoder has {widths[0]}")
    return int(shape[0])


def resolve_embeddings(sources: list[str], model: ModelSpec, settings: Settings) -> dict[str, Component]:  # noqa: ARG001  (one signature for every resolver)
    """Trigger word (file stem) -> embedding, from files and folders (A1111's convention).

    Paths are relative to the working directory only, not to a settings folder (README).
    """
    found: dict[str, Component] = {}
    for source in sources:
        path = _find(source, None, "embedding file or folder")
        files = sorted(p for p in path.rglob("*") if p.suffix in EMBEDDING_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            if file.suffix not in EMBEDDING_SUFFIXES:
                raise ModelInputError(f"{str(file)!r}: an embedding must be .safetensors, .pt or .bin")
            vectors = 0
            if file.suffix == ".safetensors":
                vectors = _embedding_vectors(file, _read_shapes(file, "embedding"), model)
            if file.stem in found:
                raise ModelInputError(f"two embeddings are called {file.stem!r}: {found[file.stem].location} and {file}")
            found[file.stem] = Component("embedding", file.stem, source, str(file), file_sha256(file), vectors=vectors)
    return found


# -- hires upscaler models and img2img init images ------------------------------------------


def resolve_upscaler(source: str, settings: Settings) -> Component:
    """An ESRGAN-family model file (spandrel reads .pth and .safetensors); its stem names it in infotext."""
    path = _find(source, settings.model_dir, "upscaler model")
    if not path.is_file():
        raise ModelInputError(f"upscaler {source!r} must be a model file (.pth or .safetensors)")
    return Component("upscaler", path.stem, source, str(path), file_sha256(path))


def read_image_source(location: str) -> bytes:
    """The bytes of a local image file or an s3:// object."""
    if location.startswith("s3://"):
        from .s3 import S3Store
        from .storage import parse_s3_url

        bucket, key = parse_s3_url(location)
        return S3Store(bucket).get(key)
    return Path(location).read_bytes()


def resolve_init_image(source: str) -> InitImage:
    """An img2img init image (a file or an s3:// key), hashed and checked to be an image."""
    import io

    from PIL import Image, UnidentifiedImageError

    from .hires import InitImage, image_sha256

    location = source if source.startswith("s3://") else str(Path(source).expanduser().resolve())
    try:
        data = read_image_source(location)
    except (OSError, StorageError) as exc:  # a missing file or object, a refused request
        raise ModelInputError(f"cannot read init image {source!r}: {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ModelInputError(f"{source!r} is not an image PIL can read: {exc}") from None
    return InitImage(source, location, image_sha256(data))
