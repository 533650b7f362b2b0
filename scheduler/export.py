"""Dataset export: `imagefolder` (Hugging Face datasets) and `webdataset` tar shards."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from .errors import InputError
from .finalize import read_manifest
from .grid import PARAM_KEYS
from .storage import Store, cell_png

FORMATS = ("imagefolder", "webdataset")
SHARD_SIZE = 1000  # samples per tar shard


def _rows(store: Store, name: str) -> list[dict]:
    done = store.done_cells()
    return [
        {"cell_id": line["cell_id"], **{k: line[k] for k in PARAM_KEYS}}
        for line in read_manifest(store, name)
        if line["cell_id"] in done
    ]


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
        _imagefolder(store, rows, dest)
    else:
        _webdataset(store, rows, dest, name)
    return len(rows)


def _imagefolder(store: Store, rows: list[dict], dest: Path) -> None:
    """Images plus metadata.jsonl: `load_dataset("imagefolder", data_dir=dest)` reads the params as columns."""
    with open(dest / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for row in rows:
            file_name = f"{row['cell_id']}.png"
            (dest / file_name).write_bytes(store.get(cell_png(row["cell_id"])))
            meta.write(json.dumps({"file_name": file_name, **row}, ensure_ascii=False) + "\n")


def _webdataset(store: Store, rows: list[dict], dest: Path, name: str) -> None:
    """Tar shards of `<key>.png` + `<key>.json` pairs, as the webdataset package reads them."""
    for shard, start in enumerate(range(0, len(rows), SHARD_SIZE)):
        with tarfile.open(dest / f"{name}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows[start : start + SHARD_SIZE]:
                key = row["cell_id"]
                _add(tar, f"{key}.png", store.get(cell_png(key)))
                _add(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
