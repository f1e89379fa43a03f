"""The artifact store: bytes under write-once keys. `ARTIFACT_STORE` chooses the backend."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

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


def check_key(key: str) -> str:
    if not KEY_PATTERN.match(key) or ".." in key.split("/"):
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
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...


class FileStore:
    """A directory. Fine on one machine; replicas on other nodes cannot read it."""

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root).resolve()
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            raise ArtifactError(f"artifact {key} is {len(data)} bytes, over the limit of {self.max_bytes}")
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
        except FileNotFoundError:
            raise ArtifactNotFound(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


def open_store() -> ArtifactStore:
    kind = os.environ.get("ARTIFACT_STORE", "file").strip() or "file"
    max_bytes = int(config.env_float("ARTIFACT_MAX_BYTES", DEFAULT_MAX_BYTES, minimum=1))
    if kind == "file":
        root = Path(os.environ.get("ARTIFACT_DIR") or config.home_dir() / "artifacts")
        return FileStore(root, max_bytes)
    raise config.ConfigError(f"ARTIFACT_STORE={kind!r}: supported here is 'file'")
