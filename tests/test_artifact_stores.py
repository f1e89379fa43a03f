"""One conformance suite, run against every artifact store backend."""
from __future__ import annotations

import uuid

import pytest

from outbox.artifacts import (ArtifactError, ArtifactExists, ArtifactNotFound, ArtifactTooLarge, FileStore,
                              FsspecStore, PostgresStore, artifact_key, open_store)


@pytest.fixture(params=["file", "postgres", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield FileStore(tmp_path / "artifacts", max_bytes=1000)
    elif request.param == "postgres":
        url = request.getfixturevalue("db_url")
        s = PostgresStore(url, max_bytes=1000)
        yield s
        s.close()
    else:
        yield FsspecStore(f"memory://adflow-{uuid.uuid4().hex}", max_bytes=1000)


def key(name="overlay.png", attempt=1):
    return artifact_key("acme", str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), "overlay", attempt, name)


def test_put_get_delete(store):
    store.put(key(), b"\x89PNG data")
    assert store.get(key()) == b"\x89PNG data"
    store.delete(key())
    with pytest.raises(ArtifactNotFound) as missing:
        store.get(key())
    assert key() in str(missing.value)  # the error names the key
    store.delete(key())  # deleting twice is fine


def test_keys_are_write_once(store):
    store.put(key(), b"first")
    with pytest.raises(ArtifactExists):
        store.put(key(), b"second")
    assert store.get(key()) == b"first"
    store.put(key(attempt=2), b"second")  # a newer attempt writes beside it
    assert store.get(key(attempt=2)) == b"second"


def test_size_limit_is_enforced(store):
    with pytest.raises(ArtifactTooLarge, match="over the limit"):
        store.put(key(), b"x" * 1001)
    with pytest.raises(ArtifactNotFound):
        store.get(key())


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/key", "a//b", "a/../b", "", "a b"])
def test_invalid_keys_are_refused(store, bad):
    with pytest.raises(ArtifactError):
        store.put(bad, b"x")


def test_keys_lists_what_was_written(store):
    store.put(key("a.png"), b"a")
    store.put(key("b.json"), b"b")
    assert sorted(store.keys()) == sorted([key("a.png"), key("b.json")])
    assert list(store.keys(older_than_s=3600)) == []  # nothing is an hour old


def test_open_store_chooses_by_environment(monkeypatch, tmp_path, db_url):
    monkeypatch.setenv("ARTIFACT_STORE", "memory://chosen")
    assert isinstance(open_store(), FsspecStore)
    monkeypatch.setenv("ARTIFACT_STORE", "postgres")
    s = open_store(db_url)
    assert isinstance(s, PostgresStore) and s.in_database
    s.close()
    monkeypatch.setenv("ARTIFACT_STORE", "file")
    monkeypatch.setenv("ARTIFACT_DIR", str(tmp_path / "x"))
    assert isinstance(open_store(), FileStore)
    monkeypatch.setenv("ARTIFACT_STORE", "ftp-ish")
    with pytest.raises(ValueError, match="ARTIFACT_STORE"):
        open_store()
