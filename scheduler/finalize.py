"""Per-job files: job.yaml (normalized), manifest.jsonl (one line per cell)."""
from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from .plan import Plan
from .storage import Store, cell_png, cell_record, job_key


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


def progress(store: Store, name: str) -> Progress:
    lines = read_manifest(store, name)
    done = store.done_cells()
    return Progress(sum(line["cell_id"] in done for line in lines), len(lines))


def finalize(store: Store, name: str) -> Progress:
    """Bring the manifest up to date with what storage holds; works mid-job too."""
    lines = read_manifest(store, name)
    done = store.done_cells()
    for line in lines:
        line["status"] = "done" if line["cell_id"] in done else "missing"
    _put_manifest(store, name, lines)
    return Progress(sum(line["status"] == "done" for line in lines), len(lines))
