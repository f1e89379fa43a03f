"""Job submission and status queries."""
from __future__ import annotations

import hashlib
import mimetypes
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from psycopg import Connection
from psycopg.types.json import Jsonb

# The tenant rule lives with the artifact keys (outbox.artifacts): the worker and every store check
# the same one. Re-exported here for callers that import it from this module.
from outbox import graph as stage_graph
from outbox.artifacts import TENANT_PATTERN, ArtifactStore, InvalidTenant, asset_key, check_tenant  # noqa: F401

MAX_COPY_CHARS = 2000
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# The format found in the bytes, not guessed from the name: a JPEG named .png is still a JPEG.


class InvalidInput(ValueError):
    """Input refused at the edge, before anything is written."""


class NotFound(LookupError):
    pass


def validate_tenant(tenant: str) -> str:
    try:
        return check_tenant(tenant)
    except InvalidTenant as exc:
        raise InvalidInput(str(exc)) from None


def validate_text(text: str, what: str, max_chars: int = MAX_COPY_CHARS) -> str:
    if "\x00" in text:
        raise InvalidInput(f"{what} contains a NUL byte, which PostgreSQL text cannot hold")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid UTF-8") from None
    if not text.strip():
        raise InvalidInput(f"{what} is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"{what} is {len(text)} characters; the limit is {max_chars}")
    return text


def validate_uuid(value: str, what: str = "id") -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInput(f"{what} {value!r} is not a UUID") from None


@dataclass(frozen=True)
class Submitted:
    job_id: str
    variant_ids: list[str]
    asset_ids: list[str]


def submit_job(conn: Connection, store: ArtifactStore, images: list[Path], ad_copy: str, tenant: str = "default",
               variants: int | None = None, extra: dict | None = None,
               check_image: Callable[[bytes], str] | None = None) -> Submitted:
    """Stores the images, then in one transaction writes image_assets, jobs, job_inputs and one
    variant per image (or `variants`, cycling through the images) at (img_gen, done): the
    triggers take it from there.

    check_image(bytes) -> MIME type, raising ValueError with the reason, is how the caller says
    what the stages will accept (cli.py passes stages.imaging.image_mime: PNG, JPEG or WebP, the
    pixel limit MAX_IMAGE_PIXELS, the minimum side and aspect ratio, a full decode); it runs on
    every image before anything is written, so a bad file is refused at once instead of failing
    in a worker. It is a parameter because outbox/ knows nothing of images (DESIGN.md). Paths: a directory is refused as one; a symbolic link is followed only
    when its target (after every link in the chain) lies inside the directory the link is in,
    so `submit uploads/x.png` cannot be made to read, say, ~/.ssh/id_rsa through a planted link."""
    validate_tenant(tenant)
    validate_text(ad_copy, "ad copy")
    if not images:
        raise InvalidInput("give at least one image")
    count = variants if variants is not None else len(images)
    if count < 1:
        raise InvalidInput("a job needs at least one variant")
    blobs = []
    for path in images:
        path = Path(path)
        source = image_source(path)
        size = source.stat().st_size
        if size == 0:
            raise InvalidInput(f"image file is empty: {path}")
        if size > MAX_IMAGE_BYTES:
            raise InvalidInput(f"image file {path} is {size} bytes; the limit is {MAX_IMAGE_BYTES}")
        try:
            data = source.read_bytes()
        except OSError as exc:  # e.g. no read permission
            raise InvalidInput(f"cannot read image {path}: {exc.strerror or exc}") from None
        try:
            mime = check_image(data) if check_image else None
        except ValueError as exc:
            raise InvalidInput(f"image {path}: {exc}") from None
        blobs.append((path, data, mime))
    asset_ids, keys = [], []
    for path, data, _mime in blobs:
        asset_id = str(uuid.uuid4())
        key = asset_key(tenant, asset_id, path.name)
        store.put(key, data)
        asset_ids.append(asset_id)
        keys.append(key)
    job_id = str(uuid.uuid4())
    variant_ids = [str(uuid.uuid4()) for _ in range(count)]
    with conn.transaction():
        for (path, data, mime), asset_id, key in zip(blobs, asset_ids, keys):
            conn.execute(
                "INSERT INTO image_assets (image_asset_id, tenant_id, uri, mime_type, byte_size, sha256) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (asset_id, tenant, key, mime or mimetypes.guess_type(path.name)[0], len(data),
                 hashlib.sha256(data).hexdigest()))
        conn.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step) VALUES (%s, %s, 'running', 'img_gen')",
                     (job_id, tenant))
        conn.execute("INSERT INTO job_inputs (job_id, ad_copy, extra) VALUES (%s, %s, %s)",
                     (job_id, ad_copy, Jsonb(extra or {})))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, creation_order, status, current_step) "
                "VALUES (%s, %s, %s, %s, 'done', 'img_gen')",
                [(vid, job_id, asset_ids[i % len(asset_ids)], i + 1) for i, vid in enumerate(variant_ids)])
    return Submitted(job_id, variant_ids, asset_ids)


def image_source(path: Path) -> Path:
    """The file to read for an image argument: the path itself, or a symbolic link's target when
    that lies inside the link's own directory (see submit_job); else InvalidInput naming why."""
    if path.is_symlink():
        target = path.resolve()
        folder = path.parent.resolve()
        if not target.is_relative_to(folder):
            raise InvalidInput(f"image {path} is a symbolic link to {target}, outside {folder}: refused "
                               "(links are followed only within their own directory)")
        path = target  # read what was checked, not the link again
    if path.is_dir():
        raise InvalidInput(f"image path is a directory, not a file: {path}")
    if not path.exists():
        raise InvalidInput(f"image file not found: {path}")
    if not path.is_file():
        raise InvalidInput(f"image path is not a regular file: {path}")
    return path


# A task as `status JOB`, the report and the console show it (alias t: stage_tasks).
TASK_COLUMNS = ("t.id, t.job_variants_id::text AS variant_id, t.stage, t.status, t.attempts, t.max_attempts, "
                "t.last_error, t.error_details, t.lease_owner, t.lease_expires_at, t.created_at, t.started_at, "
                "t.finished_at, t.run_after, outbox_attempts(t) AS attempt_log")


def job_detail(conn: Connection, job_id: str) -> dict:
    """The job row, its variants and its tasks in pipeline order. `state` (the job's and each
    variant's) is the database's rule (migration 0004): a variant is done only at its last stage,
    a job only at its last job stage; `status` and `current_step` are the rows' own columns."""
    job_id = validate_uuid(job_id, "job id")
    job = conn.execute("SELECT job_id::text, tenant_id, status, current_step, "
                       "outbox_job_state(status, current_step) AS state, created_at, updated_at, "
                       "expected_variants, variants_closed_at FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    if job is None:
        raise NotFound(f"no job {job_id}")
    job["variants"] = conn.execute(
        "SELECT job_variants_id::text AS variant_id, creation_order, status, current_step, "
        "outbox_variant_state(status, current_step) AS state, selected, updated_at "
        "FROM jobs_variants WHERE job_id = %s ORDER BY creation_order", (job_id,)).fetchall()
    job["tasks"] = conn.execute(
        f"SELECT {TASK_COLUMNS}, v.creation_order "
        "FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage "
        "LEFT JOIN jobs_variants v ON v.job_variants_id = t.job_variants_id "
        "WHERE t.job_id = %s ORDER BY g.position, v.creation_order NULLS FIRST", (job_id,)).fetchall()
    return job


def find_task(conn: Connection, subject_id: str, stage: str) -> dict:
    """The task of `stage` for a variant id or a job id (for run-stage)."""
    subject_id = validate_uuid(subject_id, "variant or job id")
    try:
        graph = stage_graph.read(conn).get(stage)
    except stage_graph.UnknownStage as exc:
        raise InvalidInput(str(exc)) from None
    if graph.level == "variant":
        owner = conn.execute("SELECT job_id::text FROM jobs_variants WHERE job_variants_id = %s", (subject_id,)).fetchone()
        if owner is None:
            raise NotFound(f"{stage} is a variant stage and there is no variant {subject_id}")
        task = conn.execute("SELECT id, status FROM stage_tasks WHERE job_variants_id = %s AND stage = %s",
                            (subject_id, stage)).fetchone()
    else:
        owner = conn.execute("SELECT job_id::text FROM jobs WHERE job_id = %s", (subject_id,)).fetchone()
        if owner is None:
            raise NotFound(f"{stage} is a job stage and there is no job {subject_id}")
        task = conn.execute("SELECT id, status FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL "
                            "AND stage = %s", (subject_id, stage)).fetchone()
    if task is None:
        raise InvalidInput(f"{stage} is not enqueued for {subject_id}: its previous step "
                           f"({graph.after_step}) has not finished")
    return task


@dataclass(frozen=True)
class Cancelled:
    already: bool  # the job was cancelled before: only its leftovers were ended now
    tasks: int  # tasks ended cancelled by this call


def cancel_job(conn: Connection, job_id: str) -> Cancelled:
    """Cancels a job in one transaction (outbox_cancel): the job and its unfinished variants end
    `cancelled`, and so do its queued and running tasks (a running stage's completion is then
    refused). Cancelling a cancelled job is a no-op that ends any task it still has queued."""
    import psycopg

    job_id = validate_uuid(job_id, "job id")
    try:
        with conn.transaction():
            row = conn.execute("SELECT * FROM outbox_cancel(%s)", (job_id,)).fetchone()
    except psycopg.errors.NoDataFound:
        raise NotFound(f"no job {job_id}") from None
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:
        raise InvalidInput(exc.diag.message_primary) from None
    return Cancelled(row["already_cancelled"], row["tasks"])


def fail_job(conn: Connection, job_id: str, reason: str) -> int:
    """Ends a job nobody will finish as failed, with `reason` on every task it still had queued
    or running (outbox_fail_job, one transaction); a finished job is left as it is. Returns the
    tasks it ended."""
    import psycopg

    job_id = validate_uuid(job_id, "job id")
    try:
        with conn.transaction():
            return conn.execute("SELECT outbox_fail_job(%s, %s) AS n", (job_id, reason)).fetchone()["n"]
    except psycopg.errors.NoDataFound:
        raise NotFound(f"no job {job_id}") from None
