"""The job file as a pydantic model (`extra="forbid"`), one part per concern."""

from .components import ComponentFields, LoraEntry
from .fields import MAX_SEED, RANDOM_SEED
from .model import Job
from .output import NAME_PATTERN, SHEET_AXES, OutputFields, SheetLayout
from .prompts import PromptFields, PromptSamples
from .sampling import SamplingFields, SeedRange

__all__ = [
    "MAX_SEED",
    "NAME_PATTERN",
    "RANDOM_SEED",
    "SHEET_AXES",
    "ComponentFields",
    "Job",
    "LoraEntry",
    "OutputFields",
    "PromptFields",
    "PromptSamples",
    "SamplingFields",
    "SeedRange",
    "SheetLayout",
]
