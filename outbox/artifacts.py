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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from outbox import config

DEFAULT_MAX_BYTES = 64 * 1024 * 1024

# The tenant rule, here and only here: jobs.validate_tenant (submit), the worker's check of a
# claimed task's tenant and every key built or parsed below use it, and the migration's CHECK
# constraint on jobs.tenant_id spells the same regular expression. It lives in this module
# (which imports nothing of the engine) so that jobs.py and workers/runner.py import it without
# a cycle. Its characters are safe as one path segment in every store: no '/', no '..'.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
TENANT_RULE = "1-255 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
# Every other segment of a key follows the same character rule (255: a file name's limit).
SEGMENT_PATTERN = TENANT_PATTERN
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
ATTEMPT_PATTERN = re.compile(r"^a[1-9][0-9]{0,8}$")
ASSETS = "assets"
JOB_LEVEL = "job"  # the variant segment of a job-level stage's artifact


class ArtifactError(Exception):
    pass


class ArtifactNotFound(ArtifactError, KeyError):
    def __str__(self) -> str:
        return f"artifact not found: {self.args[0]}"


class ArtifactExists(ArtifactError):
    pass


class ArtifactTooLarge(ArtifactError):
    pass


class InvalidKey(ArtifactError, ValueError):
    """A key (or a tenant, a file: asset path) that no store may use. Retrying cannot make it
    valid: the engine turns it into a permanent stage error."""


class InvalidTenant(InvalidKey):
    pass


class TenantMismatch(ArtifactError, PermissionError):
    """A valid key of another tenant."""


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise InvalidTenant(f"invalid tenant id {tenant!r}: {TENANT_RULE}")
    return tenant


@dataclass(frozen=True)
class KeyParts:
    """A key split into its segments. Two shapes exist (docs/lifecycle.md):

    - asset:    tenant/assets/<asset id>/<file name>
    - artifact: tenant/<job uuid>/<variant uuid | "job">/<stage>/a<attempt>/<name>
    """

    tenant: str
    kind: str  # "asset" or "artifact"
    segments: tuple[str, ...]  # all of them, tenant first

    @property
    def key(self) -> str:
        return "/".join(self.segments)


def parse_key(key: object) -> KeyParts:
    """Splits a key by '/' and checks every segment and the shape as a whole: the one check of
    every store's put/get and of the worker's and the report's tenant checks. A key is a
    relative path made of plain names only, so '..', '.', empty segments (a//b, a leading or
    trailing '/', an absolute path), backslashes, NUL and any other character outside the
    segment rule are refused, whatever the backend would have made of them. The shape is
    checked too: the segment after the tenant is 'assets' or a job UUID, so a tenant
    'acme/evil' could never have written a key that tenant 'acme' owns."""
    if not isinstance(key, str):
        raise InvalidKey(f"invalid artifact key {key!r}: not a string")
    segments = tuple(key.split("/"))
    for segment in segments:
        if not SEGMENT_PATTERN.match(segment):
            raise InvalidKey(f"invalid artifact key {key!r}: segment {segment!r} is not 1-255 letters, digits, "
                             "'.', '_' or '-' starting with a letter or digit")
    try:
        check_tenant(segments[0])
    except InvalidTenant as exc:  # pragma: no cover - the segment rule is the tenant rule
        raise InvalidKey(f"invalid artifact key {key!r}: {exc}") from None
    if len(segments) == 4 and segments[1] == ASSETS:
        return KeyParts(segments[0], "asset", segments)
    if (len(segments) == 6 and UUID_PATTERN.match(segments[1])
            and (segments[2] == JOB_LEVEL or UUID_PATTERN.match(segments[2])) and ATTEMPT_PATTERN.match(segments[4])):
        return KeyParts(segments[0], "artifact", segments)
    raise InvalidKey(f"invalid artifact key {key!r}: expected tenant/assets/<asset id>/<file> or "
                     "tenant/<job id>/<variant id or 'job'>/<stage>/a<attempt>/<name>")


def check_key(key: object) -> str:
    return parse_key(key).key


def check_key_tenant(key: object, tenant: object) -> KeyParts:
    """The key, parsed, if it belongs to `tenant`: the parsed tenant segment must EQUAL it (a
    prefix test would let tenant 'acme' read 'acme/evil/...' or 'acme.x/...')."""
    tenant = check_tenant(tenant)
    parts = parse_key(key)
    if parts.tenant != tenant:
        raise TenantMismatch(f"artifact {key!r} belongs to another tenant: refused")
    return parts


def artifact_key(tenant: str, job_id: str, variant_id: str | None, stage: str, attempt: int, name: str) -> str:
    """Keys carry job, variant, stage and attempt: a stale attempt writes beside, never over,
    what a newer attempt committed."""
    check_tenant(tenant)
    return check_key(f"{tenant}/{job_id}/{variant_id or JOB_LEVEL}/{stage}/a{attempt}/{name}")


def asset_key(tenant: str, asset_id: str, filename: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename).lstrip("._-") or "image"
    if len(safe) > 200:  # a file name's limit is 255 bytes; keep the extension
        stem, dot, ext = safe.rpartition(".")
        safe = (stem[:200 - len(ext) - 1] + "." + ext[:16]) if dot and len(ext) <= 16 else safe[:200]
    check_tenant(tenant)
    return check_key(f"{tenant}/{ASSETS}/{asset_id}/{safe}")


def asset_path(asset_root: Path, relative: str) -> Path:
    """The file of a `file:` asset uri, which must lie inside ASSET_ROOT. The one path check of
    the worker and the report. resolve() follows symlinks, so a link that points outside the
    root is refused too; NUL (which open() refuses with a bare ValueError) and an absolute path
    (which would replace the root) are refused by name."""
    root = Path(asset_root).resolve()
    if not isinstance(relative, str) or not relative or "\x00" in relative or "\\" in relative \
            or relative.startswith("/"):
        raise InvalidKey(f"image path {relative!r} is not a relative path under the asset root: refused")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InvalidKey(f"image path {relative!r} is outside the asset root: refused")
    return path


def read_asset(store: "ArtifactStore", asset_root: Path, uri: str, tenant: str) -> bytes:
    """The bytes of an image asset uri: `file:<path under ASSET_ROOT>` or a store key, which
    must belong to `tenant`.
    Bad uris raise InvalidKey, another tenant's key TenantMismatch, a missing one
    ArtifactNotFound."""
    if isinstance(uri, str) and uri.startswith("file:"):
        path = asset_path(asset_root, uri[len("file:"):])
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(uri) from None
        except IsADirectoryError:
            raise InvalidKey(f"image path is a directory: {uri[5:]!r}") from None
    check_key_tenant(uri, tenant)
    return store.get(uri)


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
        # Not validated, on purpose: an exact-match DELETE cannot reach anything but that row, and
        # `prune` must be able to remove a bad key that plain SQL wrote into the table.
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
