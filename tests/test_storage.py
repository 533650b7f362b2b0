"""Stores: write-once cells, atomic writes, keys that cannot leave the root."""

from __future__ import annotations

import pytest

from gridrender.scheduler.errors import StorageError
from gridrender.scheduler.storage import LocalStore, MemoryStore, NotFound


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    return LocalStore(tmp_path / "root") if request.param == "local" else MemoryStore()


def test_put_new_writes_once(store):
    assert store.put_new("cells/abc.png", b"first") is True
    assert store.put_new("cells/abc.png", b"second") is False
    assert store.get("cells/abc.png") == b"first"


def test_put_replaces(store):
    store.put("jobs/j/job.yaml", b"a")
    store.put("jobs/j/job.yaml", b"b")
    assert store.get("jobs/j/job.yaml") == b"b"


def test_list(store):
    store.put_new("cells/a.png", b"")
    store.put_new("cells/a.json", b"{}")
    store.put_new("cells/b.png", b"")
    store.put("jobs/j/job.yaml", b"")
    assert sorted(store.list("cells/")) == ["cells/a.json", "cells/a.png", "cells/b.png"]


def test_lines_stream_in_and_out(store):
    store.put_lines("jobs/j/manifest.jsonl", (f"{i}\n".encode() for i in range(1000)))
    assert [int(line) for line in store.lines("jobs/j/manifest.jsonl")] == list(range(1000))
    with pytest.raises(NotFound):
        list(store.lines("jobs/j/none.jsonl"))


def test_missing_key(store):
    with pytest.raises(NotFound):
        store.get("cells/nope.json")
    assert not store.exists("cells/nope.json")


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "/etc/passwd",
        "cells/../../x",
        "cells\\x",
        "cells/a\0b",
        "cells/ａ.png",  # noqa: RUF001  (a full-width a on purpose)
        "",
        "cells//x",
        "cells/.hidden",
    ],
)
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(StorageError):
        store.put_new(key, b"x")


def test_local_writes_leave_no_temp_files(tmp_path):
    store = LocalStore(tmp_path)
    store.put_new("cells/a.png", b"x" * 1000)
    store.put_new("cells/a.png", b"y")
    store.put("jobs/j/manifest.jsonl", b"z")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["cells/a.png", "jobs/j/manifest.jsonl"]


class Flaky(MemoryStore):
    """A store whose next `failures` calls raise the given error."""

    def __init__(self, failures: int, transient: bool):
        super().__init__()
        self.failures, self.transient, self.calls = failures, transient, 0

    def put_new(self, key, data, content_type="application/octet-stream"):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise StorageError("connection reset", transient=self.transient)
        return super().put_new(key, data, content_type)


def test_retrying_store_rides_out_transient_errors():
    from gridrender.scheduler.storage import RetryingStore

    inner = Flaky(3, transient=True)
    store = RetryingStore(inner, deadline=5, first_delay=0.01)
    assert store.put_new("cells/a.png", b"x") is True
    assert inner.calls == 4 and inner.get("cells/a.png") == b"x"


def test_retrying_store_gives_up_on_permanent_errors_at_once_and_on_transient_ones_at_the_deadline():
    from gridrender.scheduler.storage import RetryingStore

    permanent = Flaky(1, transient=False)
    with pytest.raises(StorageError):
        RetryingStore(permanent, deadline=5, first_delay=0.01).put_new("cells/a.png", b"x")
    assert permanent.calls == 1
    endless = Flaky(10**6, transient=True)
    with pytest.raises(StorageError):
        RetryingStore(endless, deadline=0.2, first_delay=0.01, max_delay=0.05).put_new("cells/a.png", b"x")
    assert 2 < endless.calls < 100
    with pytest.raises(NotFound):
        RetryingStore(MemoryStore(), deadline=5).get("cells/none.json")
