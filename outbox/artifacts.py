"""The artifact store: bytes under write-once keys. `ARTIFACT_STORE` chooses the backend:

- `file` (default): a directory (ARTIFACT_DIR). One machine only: other nodes cannot read it.
- `postgres`: the `artifacts` table of the pipeline's own database. The worker writes a stage's
  artifacts in the transaction that commits its result, so both commit together or not at all,
  and every replica on every node reads them with nothing else to run.
- any fsspec URL (`s3://bucket/prefix`, `gs://...`, `memory://...`), with its fsspec driver.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Iterator, Protocol

from outbox import config

KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ArtifactError(Exception):
    pass


class ArtifactNotFound(ArtifactError, KeyError):
    def __str__(self) -> str:
        return f"artifact not found: {self.args[0]}"


class ArtifactExists(ArtifactError):
    pass


class ArtifactTooLarge(ArtifactError):
    pass


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_PATTERN.match(key) or ".." in key.split("/"):
        raise ArtifactError(f"invalid artifact key {key!r}")
    return key


def artifact_key(tenant: str, job_id: str, variant_id: str | None, stage: str, attempt: int, name: str) -> str:
    """Keys carry job, variant, stage and attempt: a stale attempt writes beside, never over,
    what a newer attempt committed."""
    return check_key(f"{tenant}/{job_id}/{variant_id or 'job'}/{stage}/a{attempt}/{name}")


def asset_key(tenant: str, asset_id: str, filename: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename).lstrip("._") or "image"
    return check_key(f"{tenant}/assets/{asset_id}/{safe}")


class ArtifactStore(Protocol):
    # True: the worker writes artifacts in the completion transaction (INSERT_ARTIFACT below)
    # instead of calling put() before it.
    in_database: bool
    max_bytes: int

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def keys(self, older_than_s: float = 0.0) -> Iterator[str]: ...


def check_size(store: ArtifactStore, key: str, data: bytes) -> None:
    if len(data) > store.max_bytes:
        raise ArtifactTooLarge(f"artifact {key} is {len(data)} bytes, over the limit of {store.max_bytes} "
                               "(ARTIFACT_MAX_BYTES)")


class FileStore:
    """A directory. Fine on one machine; replicas on other nodes cannot read it."""

    in_database = False

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        check_size(self, key, data)
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        try:
            # link() fails if the key exists: write-once even between processes.
            os.link(tmp, path)
        except FileExistsError:
            raise ArtifactExists(f"artifact {key} already exists (keys are write-once)") from None
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactNotFound(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, older_than_s: float = 0.0) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        if not self.root.is_dir():
            return
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and path.stat().st_mtime <= cutoff:
                yield path.relative_to(self.root).as_posix()


INSERT_ARTIFACT = ("INSERT INTO artifacts (key, data, byte_size) VALUES (%s, %s, %s) "
                   "ON CONFLICT (key) DO NOTHING")  # write-once: a second write never replaces


class PostgresStore:
    """The `artifacts` table. put() here is for writes outside a completion (job submission)."""

    in_database = True

    def __init__(self, url: str, max_bytes: int = DEFAULT_MAX_BYTES):
        from psycopg_pool import ConnectionPool

        from outbox.db import KEEPALIVE_KWARGS

        self.max_bytes = max_bytes
        # Stage threads read artifacts concurrently: a small pool rather than one connection.
        self.pool = ConnectionPool(url, min_size=0, max_size=4, open=True,
                                   kwargs={"autocommit": True, "prepare_threshold": None, **KEEPALIVE_KWARGS})

    def put(self, key: str, data: bytes) -> None:
        check_size(self, check_key(key), data)
        with self.pool.connection() as conn:
            if conn.execute(INSERT_ARTIFACT, (key, data, len(data))).rowcount == 0:
                raise ArtifactExists(f"artifact {key} already exists (keys are write-once)")

    def get(self, key: str) -> bytes:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT data FROM artifacts WHERE key = %s", (check_key(key),)).fetchone()
        if row is None:
            raise ArtifactNotFound(key)
        return bytes(row[0])

    def delete(self, key: str) -> None:
        with self.pool.connection() as conn:
            conn.execute("DELETE FROM artifacts WHERE key = %s", (key,))

    def keys(self, older_than_s: float = 0.0) -> Iterator[str]:
        with self.pool.connection() as conn:
            rows = conn.execute("SELECT key FROM artifacts WHERE created_at <= now() - make_interval(secs => %s) "
                                "ORDER BY key", (older_than_s,)).fetchall()
        for (key,) in rows:
            yield key

    def close(self) -> None:
        self.pool.close()


class FsspecStore:
    """Any fsspec filesystem by URL. Object stores have no create-if-absent, so write-once is an
    exists() check; keys carry the attempt, so two writers of one key never exist by design."""

    in_database = False

    def __init__(self, url: str, max_bytes: int = DEFAULT_MAX_BYTES):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise config.ConfigError("ARTIFACT_STORE is a URL but fsspec is not installed") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as exc:
            raise config.ConfigError(f"ARTIFACT_STORE={url!r}: {exc}") from None
        self.root = root.rstrip("/")
        self.max_bytes = max_bytes

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def put(self, key: str, data: bytes) -> None:
        check_size(self, key, data)
        path = self._path(key)
        if self.fs.exists(path):
            raise ArtifactExists(f"artifact {key} already exists (keys are write-once)")
        self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise ArtifactNotFound(key) from None

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def keys(self, older_than_s: float = 0.0) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            stamp = info.get("created") or info.get("mtime") or info.get("LastModified")
            seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else stamp
            # No age known: only an explicit "any age" sweep may take it.
            if (seconds is None and older_than_s > 0) or (seconds is not None and seconds > cutoff):
                continue
            if path.startswith(self.root + "/"):
                yield path[len(self.root) + 1:]


def open_store(database_url: str | None = None) -> ArtifactStore:
    kind = os.environ.get("ARTIFACT_STORE", "file").strip() or "file"
    max_bytes = int(config.env_float("ARTIFACT_MAX_BYTES", DEFAULT_MAX_BYTES, minimum=1))
    if kind == "file":
        root = Path(os.environ.get("ARTIFACT_DIR") or config.home_dir() / "artifacts")
        return FileStore(root, max_bytes)
    if kind == "postgres":
        if database_url is None:
            from outbox.db import resolve_url

            database_url = resolve_url()
        return PostgresStore(database_url, max_bytes)
    if "://" in kind:
        return FsspecStore(kind, max_bytes)
    raise config.ConfigError(f"ARTIFACT_STORE={kind!r}: use file, postgres, or an fsspec URL (s3://..., memory://...)")
