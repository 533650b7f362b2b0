"""Per-job files from what storage holds: manifest.jsonl (one line per cell), sheets, gallery.

The manifest streams out a line at a time. A cell's status comes from its chunk's
progress record; only the cells of incomplete chunks are checked one by one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import layout
from .gallery import render_gallery
from .job import Job
from .ledger import Ledger
from .plan import Plan
from .settings import Settings
from .sheets import build_sheets
from .storage import NotFound, Store


def stored_plan(store: Store, name: str) -> Plan:
    """The job as its last submit or run expanded it, without the model files or this host's wildcards."""
    return Ledger(store, name).plan()


def manifest_lines(store: Store, plan: Plan, verify: bool = False) -> Iterator[dict[str, Any]]:
    """One line per cell, in expansion order, with `status` done or missing.

    A complete chunk's record answers for its cells; `verify` checks every cell
    anyway (worth it where sheets read every image regardless).
    """
    with Ledger(store, plan.job.name) as ledger:
        done = ledger.progress(plan.partition)
        for chunk in plan.chunks():
            record = done.get(chunk.id)
            if not verify and record is not None and record.stored == len(chunk.cells):
                stored = [True] * len(chunk.cells)
            else:
                stored = ledger.present(chunk.cells)
            for cell, is_stored in zip(chunk.cells, stored, strict=True):
                yield {
                    "cell_id": cell.id,
                    "status": "done" if is_stored else "missing",
                    "image": layout.cell_image(cell.id),
                    "record": layout.cell_record(cell.id),
                    **cell.params(),
                    **cell.rendered(),
                }


def read_manifest(store: Store, name: str) -> Iterator[dict[str, Any]]:
    for line in store.lines(layout.manifest(name)):
        if line.strip():
            yield json.loads(line)


@dataclass
class Finalized:
    done: int
    total: int
    sheets: int = 0
    note: str = ""


def finalize(store: Store, name: str, settings: Settings | None = None) -> Finalized:
    """Manifest, sheets and gallery from what storage holds; works mid-job too.

    Never renders: cells not stored yet are placeholders on the sheets.
    """
    settings = settings or Settings()
    plan = stored_plan(store, name)
    kept: list[dict[str, Any]] = []  # the lines sheets and the gallery draw, at most sheet_max_cells
    counts = {"done": 0, "total": 0}

    def encoded() -> Iterator[bytes]:
        for line in manifest_lines(store, plan, verify=plan.total <= settings.sheet_max_cells):
            counts["total"] += 1
            counts["done"] += line["status"] == "done"
            if len(kept) < settings.sheet_max_cells:
                kept.append(line)
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()

    store.put_lines(layout.manifest(name), encoded())
    note, sheets = "", []
    if counts["total"] <= settings.sheet_max_cells:
        sheets = build_sheets(store, name, kept, _layout(plan.job))
        for sheet in sheets:
            store.put(layout.sheet(name, sheet.name), sheet.png, "image/png")
    else:
        note = (
            f"sheets skipped: {counts['total']:,} cells is over GRIDRENDER_SHEET_MAX_CELLS "
            f"({settings.sheet_max_cells:,}); the gallery lists the first {len(kept):,} cells"
        )
    page = render_gallery(name, kept, sheets, note)
    store.put(layout.gallery(name), page, "text/html; charset=utf-8")
    return Finalized(counts["done"], counts["total"], len(sheets), note)


def _layout(job: Job) -> dict[str, Any] | None:
    return job.sheet.model_dump() if job.sheet else None


def exists(store: Store, name: str) -> bool:
    try:
        return store.exists(layout.job_file(name))
    except NotFound:
        return False
