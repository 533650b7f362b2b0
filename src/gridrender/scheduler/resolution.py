"""A job's components resolved: every model, VAE, LoRA, embedding, upscaler and init image it names.

Resolution checks each against the model it will run on and collects every problem on
its job-file key, so `validate` reports them all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from . import families, hires, models
from .components import Component, resolve_embeddings, resolve_init_image, resolve_lora, resolve_upscaler, resolve_vae
from .errors import ModelError, Problem
from .hires import InitImage
from .job import Job
from .models import ModelSpec
from .prompts import LoraTag, lora_tags, search_replace
from .settings import Settings

P = ParamSpec("P")
T = TypeVar("T")
Key = TypeVar("Key")


@dataclass
class Components:
    """Every model and component the job names, resolved: what cells hold as values."""

    models: dict[str, ModelSpec]  # job-file source -> model
    vaes: dict[str | None, Component | None] = field(default_factory=lambda: {None: None})
    loras: dict[str, Component] = field(default_factory=dict)  # `loras:` paths and <lora:NAME:W> names
    embeddings: dict[str, Component] = field(default_factory=dict)  # trigger word -> embedding
    upscalers: dict[str, Component] = field(default_factory=dict)  # hires upscaler model files
    init_images: dict[str, InitImage] = field(default_factory=dict)  # img2img: source -> image

    def to_dict(self) -> dict[str, Any]:
        def components(pairs: Iterable[tuple[str | None, Component | InitImage | None]]) -> list[list[Any]]:
            return [[k, v.to_dict() if v else None] for k, v in pairs]

        return {
            "models": [[k, m.to_dict()] for k, m in self.models.items()],
            "vaes": components(self.vaes.items()),
            "loras": components(self.loras.items()),
            "embeddings": components(self.embeddings.items()),
            "upscalers": components(self.upscalers.items()),
            "init_images": components(self.init_images.items()),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Components:
        def components(pairs: list[list[Any]]) -> dict[str, Component]:  # none is None: only found ones are kept
            return {k: Component.from_dict(v) for k, v in pairs}

        return cls(
            {k: ModelSpec.from_dict(m) for k, m in data["models"]},
            {k: Component.from_dict(v) if v else None for k, v in data["vaes"]},
            components(data["loras"]),
            components(data["embeddings"]),
            components(data.get("upscalers", [])),
            {k: InitImage.from_dict(v) for k, v in data.get("init_images", [])},
        )

    def identity(self) -> dict[str, dict[str, Any]]:
        return {
            "models": {k: m.identity() for k, m in self.models.items()},
            "vaes": {str(k): v.identity() if v else None for k, v in self.vaes.items()},
            "loras": {k: v.identity() for k, v in self.loras.items()},
            "embeddings": {k: v.identity() for k, v in self.embeddings.items()},
            "upscalers": {k: v.identity() for k, v in self.upscalers.items()},
            "init_images": {k: v.identity() for k, v in self.init_images.items()},
        }


def resolve_components(job: Job, settings: Settings, notes: list[Problem] | None = None) -> Components:
    """Every model, VAE, LoRA (listed or tagged) and embedding of the job; all problems at once.

    `notes` receives warnings: the LoRA keys A1111 would not match, the layers it leaves alone.
    """
    resolver = _Resolver(job, settings, notes)
    resolved_models = resolver.models()
    first = next(iter(resolved_models.values()))
    vaes = resolver.vaes(first)
    loras = resolver.loras(list(resolved_models.values()))
    if any(_has_lora_tag(n) for n in job.negative_prompt):
        resolver.problems.append(job.problem("negative_prompt", "<lora:…> tags go in the prompt, not the negative prompt"))
    embeddings = resolver.attempt("embeddings", resolve_embeddings, job.embeddings, first, settings) if job.embeddings else {}
    upscalers = resolver.upscalers()
    init_images = {
        source: resolver.attempt(f"init_images.{i}", resolve_init_image, source) for i, source in enumerate(job.init_images or [])
    }
    if resolver.problems:
        raise job.error(list(dict.fromkeys(resolver.problems)))
    return Components(resolved_models, vaes, _found(loras), embeddings or {}, _found(upscalers), _found(init_images))


class _Resolver:
    """Resolves a job's components one key at a time, collecting each problem on its key rather than stopping."""

    def __init__(self, job: Job, settings: Settings, notes: list[Problem] | None):
        self.job, self.settings, self.notes = job, settings, notes
        self.problems: list[Problem] = []
        self.said: list[str] = []  # what resolve_lora noted, in order; `notes` gets each on its key

    def attempt(self, key: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """fn's result, or None with its ModelError a problem on `key`."""
        try:
            return fn(*args, **kwargs)
        except ModelError as exc:
            self.problems.append(self.job.problem(key, str(exc)))
            return None

    def models(self) -> dict[str, ModelSpec]:
        """Job-file source -> model, with the job's prediction settings; any model not found ends here."""
        job = self.job
        found = {
            source: self.attempt(
                f"model.{i}" if len(job.model) > 1 else "model", models.resolve, source, job.revision, self.settings
            )
            for i, source in enumerate(job.model)
        }
        if self.problems:
            raise job.error(self.problems)
        return {k: with_job_prediction(v, job) for k, v in found.items() if v is not None}

    def vaes(self, first: ModelSpec) -> dict[str | None, Component | None]:
        vaes: dict[str | None, Component | None] = {None: None}
        for i, source in enumerate(self.job.vae):
            if source is not None:
                key = f"vae.{i}" if len(self.job.vae) > 1 else "vae"
                vaes[source] = self.attempt(key, resolve_vae, source, first, self.settings)
        return vaes

    def lora(self, key: str, source: str, model: ModelSpec) -> Component | None:
        before = len(self.said)
        found = self.attempt(key, resolve_lora, source, model, self.settings, self.said)
        if self.notes is not None:
            self.notes.extend(self.job.problem(key, note) for note in self.said[before:])
        return found

    def loras(self, resolved_models: list[ModelSpec]) -> dict[str, Component | None]:
        """The `loras:` list's, then those the prompts' <lora:NAME:W> tags name; each checked against every model."""
        loras: dict[str, Component | None] = {}
        for i, entry in enumerate(self.job.loras):
            for model in resolved_models:
                loras[entry.path] = self.lora(f"loras.{i}.path", entry.path, model)
        listed = {found.name for found in loras.values() if found is not None}  # named as the infotext's tags name them
        for tags in self.prompt_tags(listed):
            for tag in tags:
                if tag.name not in loras:
                    for model in resolved_models:
                        loras[tag.name] = self.lora("prompts", tag.name, model)
        return loras

    def prompt_tags(self, listed: set[str]) -> Iterator[list[LoraTag]]:
        """Each prompt's LoRA tags; one that cannot be read, or names a LoRA twice, is a problem."""
        for sr in self.job.values_of("prompt_sr"):
            for text in self.job.values_of("prompts"):
                try:
                    tags = lora_tags(search_replace(text, sr))
                except ValueError as exc:
                    self.problems.append(self.job.problem("prompts", str(exc)))
                    continue
                if twice := _named_twice(tags, listed):
                    self.problems.append(self.job.problem("prompts", twice))
                yield tags

    def upscalers(self) -> dict[str, Component | None]:
        """Hires upscalers that are model files (the others are built in)."""
        names = self.job.hires.upscaler if self.job.hires else []
        return {
            name: self.attempt(f"hires.upscaler.{i}", resolve_upscaler, name, self.settings)
            for i, name in enumerate(names)
            if hires.is_model_file(name)
        }


def _found(resolved: dict[Key, T | None]) -> dict[Key, T]:
    """The entries that resolved (those that did not are problems, raised before this is used)."""
    return {k: v for k, v in resolved.items() if v is not None}


def _named_twice(tags: list[LoraTag], listed: set[str]) -> str | None:
    """Why a prompt names a LoRA A1111 would apply differently than written, or None.

    A1111 loads one network per name (networks.load_networks): a name's every mention applies
    with its last mention's weights, so `<lora:x:0.5> <lora:x:1>` is x twice at 1.
    """
    names = [tag.name for tag in tags]
    for tag in tags:
        if names.count(tag.name) > 1:
            return (
                f"{tag.written}: LoRA {tag.name!r} is named twice in the prompt; A1111 would apply it twice "
                "with the last tag's weights: name each LoRA once"
            )
        if tag.name in listed:
            return (
                f"{tag.written}: LoRA {tag.name!r} is also in `loras:`; A1111 would apply it twice with one "
                "mention's weights: name each LoRA in one place"
            )
    return None


def _has_lora_tag(text: str) -> bool:
    try:
        return bool(lora_tags(text))
    except ValueError:
        return True


def with_job_prediction(model: ModelSpec, job: Job) -> ModelSpec:
    """The model with the job's `prediction:` and `noise_schedule:` over what its files say."""
    found = families.Prediction(model.prediction, model.zero_terminal_snr)
    return model.with_prediction(families.overridden(found, job.prediction, job.noise_schedule))
