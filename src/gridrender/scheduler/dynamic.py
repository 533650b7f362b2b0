"""Dynamic prompts for data sets: `{red|blue} car`, `__colors__` wildcards (the dynamicprompts library).

A prompt that uses the template syntax expands combinatorially into an axis, or, with
`prompt_samples: N`, into N variants drawn from a seed. Without a seed in the job file
the seed derives from the job's name and templates, and job.yaml records it: a
resubmit expands to the same prompts, so to the same cells.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import Problem
from .settings import Settings

_TEMPLATE = re.compile(r"\{[^{}]*\}|__[\w./-]+__")


def is_template(text: str) -> bool:
    return bool(_TEMPLATE.search(text))


def default_seed(name: str, templates: list[str]) -> int:
    return int.from_bytes(hashlib.sha256("\0".join([name, *templates]).encode()).digest()[:4], "big")


def expand(templates: list[str], count: int | None, seed: int, settings: Settings) -> tuple[list[str], list[Problem]]:
    """(prompts, problems): every template expanded, plain prompts as they are, duplicates dropped."""
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.wildcards import WildcardManager

    wildcards = WildcardManager(Path(settings.wildcard_dir).expanduser() if settings.wildcard_dir else None)
    prompts: list[str] = []
    problems = []
    for index, template in enumerate(templates):
        if not is_template(template):
            prompts.append(template)
            continue
        missing = [w for w in re.findall(r"__([\w./-]+)__", template) if not wildcards.get_values(w)]
        if missing:
            where = settings.wildcard_dir or "GRIDRENDER_WILDCARD_DIR (not set)"
            problems.append(Problem(f"prompts.{index}", f"no wildcard file for __{missing[0]}__ in {where}"))
            continue
        try:
            if count is None:
                variants = CombinatorialPromptGenerator(wildcards).generate(template, max_prompts=None)
            else:  # N different variants, in the order the seeded generator draws them
                drawn = RandomPromptGenerator(wildcards, seed=seed + index).generate(template, num_images=count * 20)
                variants = list(dict.fromkeys(str(v) for v in drawn))[:count]
        except Exception as exc:  # the template parser raises its own types; report them on the key
            problems.append(Problem(f"prompts.{index}", f"cannot expand the template: {exc}"))
            continue
        prompts.extend(str(v) for v in variants)
    return list(dict.fromkeys(prompts)), problems
