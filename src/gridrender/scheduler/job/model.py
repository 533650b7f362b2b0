"""The job file's model: the parts by concern, and the views the rest of the scheduler reads."""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ConfigDict, PrivateAttr

from .. import yamlfile
from ..errors import JobError, Problem
from ..params import AXES, PARAMS
from .components import ComponentFields
from .fields import MAX_SEED, RANDOM_SEED, as_list
from .output import OutputFields, output_root
from .passes import PassFields
from .prompts import PromptFields
from .sampling import SamplingFields, SeedRange


class Job(SamplingFields, PromptFields, ComponentFields, PassFields, OutputFields):  # job.yaml lists OutputFields first
    """A job file. Axis keys take one value or a list; the grid is their product.

    Each key lives with its concern: prompts.py (texts), sampling.py (noise, sampler,
    shape), components.py (checkpoint, VAE, LoRAs, embeddings), passes.py (hires
    fix, img2img), output.py (name, output, sheets). A new key goes into the part it belongs to.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    _source: str = PrivateAttr(default="<job>")
    _lines: dict[yamlfile.Path, int] = PrivateAttr(default_factory=dict)

    def problem(self, field: str, message: str) -> Problem:
        """A problem found after parsing (e.g. against the model), located in the file."""
        return Problem(field, message, yamlfile.line_for(self._lines, tuple(field.split("."))))

    def error(self, problems: list[Problem]) -> JobError:
        return JobError(problems, self._source)

    # -- derived views -------------------------------------------------------------
    def values_of(self, key: str) -> Sequence[Any]:
        """The values the job lists under a job-file key, as a sequence (an axis)."""
        derived = _DERIVED_AXES.get(key)
        return derived(self) if derived else as_list(getattr(self, key))

    def axes(self) -> dict[str, Sequence[Any]]:
        """Every axis with the values the job lists, in expansion order (outermost first)."""
        return {axis.name: self.values_of(axis.key) for axis in AXES.values()}

    def grid_values(self) -> dict[str, Sequence[Any]]:
        """Values per parameter (per axis for width x height), as `grid.expand` takes them."""
        values: dict[str, Sequence[Any]] = {}
        for param in PARAMS:
            values[param.axis if param.key == "size" else param.name] = self.values_of(param.key)
        return values

    def cell_count(self) -> int:
        return math.prod(len(v) for v in self.axes().values())

    def with_random_seeds_drawn(self) -> Job:
        """Replace every seed -1 by a random seed, drawn once (recorded in job.yaml)."""
        if isinstance(self.seeds, SeedRange) or RANDOM_SEED not in self.seeds:
            return self
        taken = set(self.seeds)
        drawn: list[int] = []
        for seed in self.seeds:
            chosen = seed
            while chosen == RANDOM_SEED or (chosen in drawn):
                chosen = secrets.randbelow(MAX_SEED + 1)
                chosen = RANDOM_SEED if chosen in taken else chosen
            drawn.append(chosen)
        return self.model_copy(update={"seeds": drawn})

    def with_output(self, output: str | None) -> Job:
        """The job writing under another output root (the CLI's --output)."""
        if output is None:
            return self
        try:
            checked = output_root(output)
        except ValueError as exc:
            raise self.error([Problem("output", str(exc))]) from None
        job = self.model_copy(update={"output": checked})
        job._source, job._lines = self._source, self._lines
        return job

    def normalized(self) -> dict[str, Any]:
        """The job as job.yaml stores it: every key, axes as lists, no defaults hidden."""
        data = self.model_dump(mode="json", exclude_none=False)
        data["size"] = [list(s) for s in self.sizes]
        data.pop("width")
        data.pop("height")
        return data


# Job-file keys whose axis values are not the key's own value as a list.
_DERIVED_AXES: dict[str, Callable[[Job], Sequence[Any]]] = {
    "seeds": lambda job: job.seed_list,
    "size": lambda job: job.sizes,
    "prompts": lambda job: job._prompts or job.prompts,
    # every combination of the LoRAs' weights, applied together
    "loras": lambda job: list(itertools.product(*([(e.path, w) for w in e.weight] for e in job.loras))),
    "prompt_sr": lambda job: [None] if job.prompt_sr is None else [(job.prompt_sr[0], v) for v in job.prompt_sr],
    "embeddings": lambda _: [()],  # derived per cell from its texts
    "hires": lambda job: [None] if job.hires is None else job.hires.values(),
    "init_images": lambda job: [None] if job.init_images is None else list(job.init_images),
    "denoise": lambda job: [None] if job.init_images is None else list(job.denoise),
}
