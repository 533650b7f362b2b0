"""One shallow error tree: every failure gridrender expects has a type here.

The CLI maps `InputError` to exit code 2 and every other `GridrenderError` to 1.
"""

from __future__ import annotations

from dataclasses import dataclass


class GridrenderError(Exception):
    """Base of every error gridrender raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input, located as precisely as we can."""

    field: str  # dotted key path, e.g. "seeds.count"; "" for the document itself
    message: str
    line: int | None = None  # 1-based line in the job file

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        key = f"{self.field}: " if self.field else ""
        return f"{where}{key}{self.message}"


class InputError(GridrenderError):
    """Bad user input (job file, CLI argument, record). Exit code 2."""

    def __init__(self, problems: list[Problem] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + str(p) for p in self.problems)


class JobError(InputError):
    """A job file that cannot be parsed, validated or expanded."""


class ModelError(GridrenderError):
    """A model that cannot be found, resolved or loaded."""


class ModelInputError(ModelError, InputError):
    """A model reference in the job that can never work (missing file, unknown builtin)."""


class StorageError(GridrenderError):
    """Reading or writing the output store failed.

    `transient` marks failures worth retrying: a connection that broke, a 5xx,
    throttling. A missing bucket or a path that is a directory is not.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RenderError(GridrenderError):
    """A cell could not be rendered."""


class BrokerError(GridrenderError):
    """The broker (Redis) cannot be reached or refused us. Messages are redacted."""
