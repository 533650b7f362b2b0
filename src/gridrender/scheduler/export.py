"""Dataset export: `imagefolder` (Hugging Face datasets) and `webdataset` tar shards."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import layout
from .errors import InputError
from .finalize import manifest_lines, stored_plan
from .params import NAMES
from .storage import Store

FORMATS = ("imagefolder", "webdataset")
SHARD_SIZE = 1000  # samples per tar shard


RENDERED = ("rendered_prompt", "rendered_negative_prompt")


def _rows(store: Store, name: str) -> Iterator[dict[str, Any]]:
    """The job's stored cells with their parameters, streamed (statuses from progress records).

    `caption` is the prompt as rendered (Prompt S/R applied, `<lora:>` tags removed), not as written.
    """
    for line in manifest_lines(store, stored_plan(store, name)):
        if line["status"] == "done":
            yield {
                "cell_id": line["cell_id"],
                "caption": line["rendered_prompt"],
                **{k: line[k] for k in (*NAMES, *RENDERED) if k in line},
            }


def export(store: Store, name: str, fmt: str, dest: Path) -> int:
    """Write the job's stored cells to `dest`; returns how many were exported."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest} is not empty; export into a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    rows = _rows(store, name)
    if fmt == "imagefolder":
        return _imagefolder(store, rows, dest)
    return _webdataset(store, rows, dest, name)


def _imagefolder(store: Store, rows: Iterable[dict[str, Any]], dest: Path) -> int:
    """Images plus metadata.jsonl: `load_dataset("imagefolder", data_dir=dest)` reads the params as columns."""
    count = 0
    with open(dest / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for row in rows:
            file_name = f"{row['cell_id']}.png"
            (dest / file_name).write_bytes(store.get(layout.cell_image(row["cell_id"])))
            meta.write(json.dumps({"file_name": file_name, **row}, ensure_ascii=False) + "\n")
            count += 1
    return count


def _webdataset(store: Store, rows: Iterable[dict[str, Any]], dest: Path, name: str) -> int:
    """Tar shards of `<key>.png` + `<key>.json` pairs, as the webdataset package reads them."""
    count = 0
    iterator = iter(rows)
    for shard in itertools.count():
        batch = list(itertools.islice(iterator, SHARD_SIZE))
        if not batch:
            break
        with tarfile.open(dest / f"{name}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in batch:
                key = row["cell_id"]
                _add(tar, f"{key}.png", store.get(layout.cell_image(key)))
                _add(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode())
        count += len(batch)
    return count


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
