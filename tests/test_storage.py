"""Stores: write-once cells, atomic writes, keys that cannot leave the root."""
from __future__ import annotations

import pytest

from scheduler.errors import StorageError
from scheduler.storage import LocalStore, MemoryStore, NotFound


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


def test_list_and_done_cells(store):
    store.put_new("cells/a.png", b"")
    store.put_new("cells/a.json", b"{}")
    store.put_new("cells/b.png", b"")  # an image without its record is not done
    assert sorted(store.list("cells/")) == ["cells/a.json", "cells/a.png", "cells/b.png"]
    assert store.done_cells() == {"a"}


def test_missing_key(store):
    with pytest.raises(NotFound):
        store.get("cells/nope.json")
    assert not store.exists("cells/nope.json")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "cells/../../x", "cells\\x", "cells/a\0b", "cells/ａ.png", "", "cells//x", "cells/.hidden"])
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
