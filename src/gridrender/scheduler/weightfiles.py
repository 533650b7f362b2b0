"""Weight files read without torch: a .safetensors header, and content hashes remembered on disk."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

from .errors import ModelInputError
from .settings import Settings

SAFETENSORS_LENGTH_BYTES = 8  # a .safetensors file opens with its JSON header's length, a little-endian u64
_MAX_HEADER_BYTES = 100 << 20  # far above any real header: a larger length means the file is something else


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a .safetensors header (8-byte length + JSON)."""
    return safetensors_header(path)[0]


def safetensors_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Tensor names and shapes, and the `__metadata__` strings, from a .safetensors header."""
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_LENGTH_BYTES)
        if len(head) < SAFETENSORS_LENGTH_BYTES:
            raise ModelInputError(f"{str(path)!r} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise ModelInputError(f"{str(path)!r} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise ModelInputError(f"{str(path)!r} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelInputError(f"{str(path)!r} is not a safetensors file (its header is not a table)")
    metadata = header.get("__metadata__") or {}
    return (
        {k: v["shape"] for k, v in header.items() if k != "__metadata__"},
        {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {},
    )


def file_sha256(path: Path) -> str:
    return _cached_hash(path, lambda: _hash_file(path))


def folder_sha256(path: Path) -> str:
    """A hash over every file's relative path and content hash (weights and configs)."""

    def compute() -> str:
        h = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest = _cached_hash(file, functools.partial(_hash_file, file))
            h.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
        return h.hexdigest()

    return compute()


def safetensors_data_sha256(path: Path) -> str:
    """The sha256 of a .safetensors file's tensor data (everything after the header), cached.

    The "addnet" hash kohya's sd-scripts and A1111 (modules/hashes.py,
    addnet_hash_safetensors) compute for LoRAs: editing the metadata leaves it alone.
    """
    return _cached_hash(path, lambda: _hash_data(path), kind="addnet")


def _hash_data(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(SAFETENSORS_LENGTH_BYTES))
        f.seek(SAFETENSORS_LENGTH_BYTES + size)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _hash_cache_file() -> Path:
    return Settings().cache_root() / "sha256.json"


_HASH_CACHE: dict[str, str] | None = None


def _cached_hash(path: Path, compute: Callable[[], str], kind: str = "sha256") -> str:
    """Hashing a 4 GB checkpoint takes seconds: remember it per (path, size, mtime, inode, ctime).

    Kept on disk too, so `validate`, `submit` and every worker do not hash it again. A file
    replaced or rewritten in place gets a new inode or ctime (which no tool sets back, unlike
    mtime), so a changed file is hashed again, never trusted from the cache.
    """
    # A process-wide cache read from disk on first use (tests reset it to None to act as a new process).
    global _HASH_CACHE  # noqa: PLW0603
    cache_file = _hash_cache_file()
    if _HASH_CACHE is None:
        try:
            _HASH_CACHE = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            _HASH_CACHE = {}
    assert _HASH_CACHE is not None
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}" + ("" if kind == "sha256" else f"|{kind}")
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = compute()
        try:  # best effort: a read-only home only costs the next process a re-hash
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(_HASH_CACHE))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return _HASH_CACHE[key]
