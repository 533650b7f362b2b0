"""Per-job files: job.yaml (normalized), manifest.jsonl (one line per cell)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from .gallery import render_gallery
from .plan import Plan
from .settings import Settings
from .sheets import build_sheets
from .storage import NotFound, Store, cell_png, cell_record, job_key


def job_yaml(plan: Plan) -> bytes:
    data = plan.job.normalized()
    data["dtype"] = plan.dtype
    header = (
        f"# normalized by gridrender: {len(plan.cells)} cells\n"
        f"# model identity: {json.dumps(plan.model.identity(), sort_keys=True)}\n"
    )
    return (header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).encode()


def write_job(store: Store, plan: Plan, done: set[str] | None = None) -> None:
    """job.yaml, and a manifest listing every cell (missing ones as such until finalize)."""
    store.put(job_key(plan.job.name, "job.yaml"), job_yaml(plan), "application/yaml")
    write_manifest(store, plan, done=store.done_cells() if done is None else done)


def manifest_lines(plan: Plan, done: set[str]) -> list[dict]:
    return [
        {
            "cell_id": cell.id,
            "status": "done" if cell.id in done else "missing",
            "image": cell_png(cell.id),
            "record": cell_record(cell.id),
            **cell.params(plan.model),
        }
        for cell in plan.cells
    ]


def write_manifest(store: Store, plan: Plan, done: set[str]) -> None:
    _put_manifest(store, plan.job.name, manifest_lines(plan, done))


def _put_manifest(store: Store, name: str, lines: list[dict]) -> None:
    body = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    store.put(job_key(name, "manifest.jsonl"), body.encode(), "application/x-ndjson")


def read_manifest(store: Store, name: str) -> list[dict]:
    raw = store.get(job_key(name, "manifest.jsonl")).decode()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


@dataclass
class Progress:
    done: int
    total: int

    @property
    def missing(self) -> int:
        return self.total - self.done


@dataclass
class Finalized(Progress):
    sheets: int = 0
    note: str = ""


def finalize(store: Store, name: str, settings: Settings | None = None) -> Finalized:
    """Manifest, sheets and gallery from what storage holds; works mid-job too.

    Never renders: cells not stored yet are placeholders on the sheets.
    """
    settings = settings or Settings()
    lines = read_manifest(store, name)
    done = store.done_cells()
    for line in lines:
        line["status"] = "done" if line["cell_id"] in done else "missing"
    _put_manifest(store, name, lines)
    note = ""
    sheets = []
    if len(lines) <= settings.sheet_max_cells:
        sheets = build_sheets(store, name, lines, _layout(store, name))
        for sheet in sheets:
            store.put(job_key(name, f"sheets/{sheet.name}"), sheet.png, "image/png")
    else:
        note = f"sheets skipped: {len(lines):,} cells is over GRIDRENDER_SHEET_MAX_CELLS ({settings.sheet_max_cells:,})"
    gallery_lines = lines[: settings.sheet_max_cells]
    if len(gallery_lines) < len(lines):
        note += f"; the gallery lists the first {len(gallery_lines):,} cells"
    store.put(job_key(name, "index.html"), render_gallery(name, gallery_lines, sheets, note), "text/html; charset=utf-8")
    count = sum(line["status"] == "done" for line in lines)
    return Finalized(count, len(lines), len(sheets), note)


def _layout(store: Store, name: str) -> dict | None:
    try:
        return (yaml.safe_load(store.get(job_key(name, "job.yaml"))) or {}).get("sheet")
    except NotFound:
        return None
