"""The task message: a chunk of cells that share a model and call parameters.

Compact on purpose: call parameters are given once, texts are listed once and cells
refer to them by index, so a 100,000-cell grid is a few thousand small messages.
The worker recomputes every cell id from its parameters, so a tampered message
cannot make it write another cell's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .grid import Cell, cell_id
from .params import CALL, PARAMS, PER_CELL

VERSION = 2


@dataclass
class ChunkMessage:
    job: str
    submission: str
    output: str
    batch_size: int
    partition: str  # names the job's split into chunks; progress records live under it
    chunk: str  # the chunk's id: its progress record's name
    cells: list[Cell]  # the cells to render (all of the chunk, or those missing at submit)
    present: int = 0  # cells of the chunk that the submit found stored already
    retry: str | None = None  # the `gridrender retry` that sent it: earlier copies of the chunk are dropped

    def to_message(self) -> dict[str, Any]:
        first = self.cells[0]
        texts = list(dict.fromkeys(getattr(c, p.name) for c in self.cells for p in PER_CELL if p.text))
        index = {t: i for i, t in enumerate(texts)}
        rows = [
            [c.id, *(index[getattr(c, p.name)] if p.text else p.pack(getattr(c, p.name)) for p in PER_CELL)] for c in self.cells
        ]
        return {
            "v": VERSION,
            "job": self.job,
            "submission": self.submission,
            "output": self.output,
            "batch_size": self.batch_size,
            "partition": self.partition,
            "chunk": self.chunk,
            "present": self.present,
            "call": {p.name: p.pack(getattr(first, p.name)) for p in CALL},
            "texts": texts,
            "cells": rows,
            **({"retry": self.retry} if self.retry else {}),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ChunkMessage:
        try:
            if message.get("v") != VERSION:
                raise ValueError(f"unknown message version {message.get('v')!r}")
            call = {p.name: p.unpack(message["call"][p.name]) for p in CALL}
            texts = message["texts"]
            cells = []
            for claimed, *row in message["cells"]:
                if len(row) != len(PER_CELL):
                    raise ValueError(f"cell {claimed!r} has {len(row)} values, expected {len(PER_CELL)}")
                per_cell = {p.name: texts[v] if p.text else p.unpack(v) for p, v in zip(PER_CELL, row, strict=True)}
                values = tuple({**call, **per_cell}[p.name] for p in PARAMS)
                actual = cell_id(values)
                if actual != claimed:
                    raise ValueError(f"cell {claimed!r} does not match its parameters (they hash to {actual})")
                cells.append(Cell(values, actual))
            if not cells:
                raise ValueError("no cells")
            return cls(
                message["job"],
                message["submission"],
                message["output"],
                int(message["batch_size"]),
                message["partition"],
                message["chunk"],
                cells,
                int(message.get("present", 0)),
                str(message["retry"]) if message.get("retry") else None,
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise InputError(f"malformed task message: {exc}") from None
