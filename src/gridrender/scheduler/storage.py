"""Where cells and job files live: a local folder, S3, or memory (tests), one shape.

The keys are `layout`'s. Cells are written once: `put_new` never replaces an
object that exists. Large job files (manifests) stream in and out line by line.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, ParamSpec, TypeVar

from typing_extensions import override

from .errors import StorageError

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_P = ParamSpec("_P")

S3_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(?P<key>.*))?$")


class NotFound(StorageError):
    """The key is not in the store."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// URL."""
    match = S3_URL.match(url)
    if not match:
        raise StorageError(f"{url!r} is not an s3://bucket/prefix URL")
    return match["bucket"], match["key"] or ""


_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_key(key: str) -> str:
    """Keys are relative, ASCII, '/'-separated names that cannot climb out of the root."""
    if unicodedata.normalize("NFKC", key) != key or not key.isascii():
        raise StorageError(f"unsafe storage key {key!r}: only ASCII names are allowed")
    parts = key.split("/")
    if not key or any(not _SAFE_SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise StorageError(f"unsafe storage key {key!r}")
    return key


class Store(ABC):
    """A flat key -> bytes store with write-once puts."""

    root: str

    @abstractmethod
    def put_new(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Write `key` unless it exists; True if this call wrote it."""

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write or replace `key` atomically (job files, manifests, sheets)."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys directly under `prefix` (a folder-like prefix ending in '/')."""
        return (key for key, _ in self.list_with_times(prefix))

    @abstractmethod
    def list_with_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modification time as a Unix timestamp) for keys directly under `prefix`."""

    def put_lines(self, key: str, lines: Iterable[bytes], content_type: str = "application/x-ndjson") -> None:
        """Write or replace `key` from a stream of lines, without holding them all in memory."""
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            for line in lines:
                spool.write(line)
            spool.seek(0)
            self._put_file(key, spool, content_type)

    def _put_file(self, key: str, file: IO[bytes], content_type: str) -> None:
        self.put(key, file.read(), content_type)

    def lines(self, key: str) -> Iterator[bytes]:
        """The lines of `key`, streamed."""
        yield from self.get(key).splitlines(keepends=True)

    def url(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}"


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]):
        self.path = Path(root).expanduser().resolve()
        self.root = str(self.path)

    def _file(self, key: str) -> Path:
        return self.path / check_key(key)

    def _write_temp_file(self, final: Path, data: bytes) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    @override  # local files keep no content type
    def put_new(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        final = self._file(key)
        tmp = self._write_temp(final, data)
        try:
            os.link(tmp, final)  # atomic create-if-absent: a reader sees all or nothing
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    @override
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        final = self._file(key)
        tmp = self._write_temp(final, data)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_temp(self, final: Path, data: bytes) -> Path:
        try:
            return self._write_temp_file(final, data)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._file(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.url(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc.strerror}") from None

    @override
    def put_lines(self, key: str, lines: Iterable[bytes], content_type: str = "application/x-ndjson") -> None:
        final = self._file(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                for line in lines:
                    f.write(line)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            raise StorageError(f"cannot write {final}: {exc.strerror}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def lines(self, key: str) -> Iterator[bytes]:
        try:
            with open(self._file(key), "rb") as f:
                yield from f
        except FileNotFoundError:
            raise NotFound(f"{self.url(key)} does not exist") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        folder = self.path / prefix
        if not folder.is_dir():
            return iter(())
        return (
            (f"{prefix}{entry.name}", entry.stat().st_mtime)
            for entry in os.scandir(folder)
            if entry.is_file() and not entry.name.startswith(".")
        )


class MemoryStore(Store):
    """A working in-memory store for tests and dry runs."""

    def __init__(self, root: str = "memory://"):
        self.root = root
        self.objects: dict[str, bytes] = {}
        self.times: dict[str, float] = {}
        self._lock = threading.Lock()

    @override  # memory keeps no content type
    def put_new(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        with self._lock:
            if check_key(key) in self.objects:
                return False
            self._write(key, data)
            return True

    @override
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        with self._lock:
            self._write(check_key(key), data)

    def _write(self, key: str, data: bytes) -> None:
        self.objects[key] = data
        self.times[key] = time.time()

    def get(self, key: str) -> bytes:
        try:
            return self.objects[check_key(key)]
        except KeyError:
            raise NotFound(f"{self.url(key)} does not exist") from None

    def exists(self, key: str) -> bool:
        return check_key(key) in self.objects

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        with self._lock:
            keys = [k for k in self.objects if k.startswith(prefix) and "/" not in k[len(prefix) :]]
            return iter([(k, self.times[k]) for k in keys])


class RetryingStore(Store):
    """Wraps a store so that transient failures are retried with backoff, up to a deadline.

    Workers hold rendered images while their uploads retry: an S3 outage shorter than
    the deadline costs time, never a second render. Only transient errors are retried;
    NotFound is an answer, not a failure.
    """

    def __init__(self, inner: Store, deadline: float = 600.0, first_delay: float = 0.5, max_delay: float = 20.0):
        self.inner, self.root = inner, inner.root
        self.deadline, self.first_delay, self.max_delay = deadline, first_delay, max_delay

    def _retry(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        give_up = time.monotonic() + self.deadline
        delay = self.first_delay
        while True:
            try:
                return fn(*args, **kwargs)
            except NotFound:
                raise
            except StorageError as exc:
                if not exc.transient or time.monotonic() + delay > give_up:
                    raise
                log.warning("%s; retrying in %.1fs", exc, delay)
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, self.max_delay)

    def put_new(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        return self._retry(self.inner.put_new, key, data, content_type)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._retry(self.inner.put, key, data, content_type)

    def get(self, key: str) -> bytes:
        return self._retry(self.inner.get, key)

    def exists(self, key: str) -> bool:
        return self._retry(self.inner.exists, key)

    def list_with_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        return iter(self._retry(lambda: list(self.inner.list_with_times(prefix))))

    def put_lines(self, key: str, lines: Iterable[bytes], content_type: str = "application/x-ndjson") -> None:
        self.inner.put_lines(key, lines, content_type)  # a stream cannot be replayed; callers retry whole

    def lines(self, key: str) -> Iterator[bytes]:
        return self.inner.lines(key)
