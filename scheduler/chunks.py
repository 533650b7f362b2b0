"""The task message: a chunk of cells that share a model and call parameters.

Compact on purpose: prompts are listed once per chunk and cells refer to them by
index, so a 100,000-cell grid is a few thousand small messages. The worker checks
every cell id against its parameters, so a tampered message cannot make it write
another cell's key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError
from .grid import Cell, cell_id
from .models import ModelSpec

CALL_KEYS = ("sampler", "steps", "guidance", "width", "height", "dtype")
_QUEUE_SAFE = re.compile(r"[^a-z0-9]+")


@dataclass
class Chunk:
    job: str
    submission: str
    output: str
    batch_size: int
    model: ModelSpec
    cells: list[Cell]

    def to_message(self) -> dict:
        first = self.cells[0]
        texts = list(dict.fromkeys(t for c in self.cells for t in (c.prompt, c.negative_prompt)))
        index = {t: i for i, t in enumerate(texts)}
        return {
            "v": 1,
            "job": self.job,
            "submission": self.submission,
            "output": self.output,
            "batch_size": self.batch_size,
            "model": self.model.to_dict(),
            "call": {k: getattr(first, k) for k in CALL_KEYS},
            "texts": texts,
            "cells": [[c.id, index[c.prompt], index[c.negative_prompt], c.clip_skip, c.seed] for c in self.cells],
        }

    @classmethod
    def from_message(cls, message: dict) -> "Chunk":
        try:
            if message.get("v") != 1:
                raise ValueError(f"unknown message version {message.get('v')!r}")
            model = ModelSpec.from_dict(message["model"])
            call, texts = message["call"], message["texts"]
            cells = []
            for claimed, prompt, negative, skip, seed in message["cells"]:
                params = dict(prompt=texts[prompt], negative_prompt=texts[negative], clip_skip=skip, seed=seed,
                              **{k: call[k] for k in CALL_KEYS})
                actual = cell_id(model, **params)
                if actual != claimed:
                    raise ValueError(f"cell {claimed!r} does not match its parameters (they hash to {actual})")
                cells.append(Cell(id=actual, **params))
            return cls(message["job"], message["submission"], message["output"], int(message["batch_size"]), model, cells)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"malformed task message: {exc}") from None


def queue_for(model: ModelSpec) -> str:
    """One queue per model, so a worker keeps one pipeline hot: gridrender.<name>-<hash>."""
    name = _QUEUE_SAFE.sub("-", model.source.rsplit("/", 1)[-1].lower().removesuffix(".safetensors")).strip("-")[:40]
    return f"gridrender.{name or 'model'}-{model.short_hash()[:8]}"
