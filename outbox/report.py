"""Everything a job report shows, read with SQL: the job and its copy, its variants with their
image asset, every task (attempts, times, errors) and every stage result. Plus the reader that turns
an asset uri or artifact key into bytes. Rendering lives in console/report.py."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from psycopg import Connection

from outbox import graph as stage_graph
from outbox.artifacts import ArtifactStore, read_asset
from outbox.jobs import TASK_COLUMNS, NotFound, validate_uuid



def latest_job_id(conn: Connection) -> str:
    row = conn.execute("SELECT job_id::text FROM jobs ORDER BY created_at DESC, job_id LIMIT 1").fetchone()
    if row is None:
        raise NotFound("there are no jobs yet: submit one with `cli.py submit` (or run `cli.py demo`)")
    return row["job_id"]


def gather(conn: Connection, job_id: str) -> dict:
    """The report's data for one job (finished or not), in plain dicts."""
    job_id = validate_uuid(job_id, "job id")
    job = conn.execute(
        "SELECT j.job_id::text, j.tenant_id, j.status, j.current_step, "
        "outbox_job_state(j.status, j.current_step) AS state, j.created_at, j.updated_at, "
        "i.ad_copy, i.extra FROM jobs j LEFT JOIN job_inputs i ON i.job_id = j.job_id WHERE j.job_id = %s",
        (job_id,)).fetchone()
    if job is None:
        raise NotFound(f"no job {job_id}")
    graph = stage_graph.read(conn).rows()
    variants = conn.execute(
        "SELECT v.job_variants_id::text AS variant_id, v.creation_order, v.status, v.current_step, "
        "outbox_variant_state(v.status, v.current_step) AS state, v.selected, "
        "v.updated_at, v.img_asset_id::text, a.uri AS asset_uri, a.mime_type AS asset_mime, "
        "a.byte_size AS asset_bytes FROM jobs_variants v LEFT JOIN image_assets a ON a.image_asset_id = v.img_asset_id "
        "WHERE v.job_id = %s ORDER BY v.creation_order, v.job_variants_id", (job_id,)).fetchall()
    tasks = conn.execute(
        f"SELECT {TASK_COLUMNS} FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage "
        "WHERE t.job_id = %s ORDER BY g.position, t.job_variants_id", (job_id,)).fetchall()
    results = conn.execute(
        "SELECT job_variants_id::text AS variant_id, stage, attempt, result, created_at FROM stage_results "
        "WHERE job_id = %s", (job_id,)).fetchall()
    by_variant = {v["variant_id"]: {**v, "tasks": {}, "results": {}} for v in variants}
    job_tasks: dict[str, dict] = {}
    job_results: dict[str, dict] = {}
    for task in tasks:
        (by_variant[task["variant_id"]]["tasks"] if task["variant_id"] else job_tasks)[task["stage"]] = task
    for row in results:
        (by_variant[row["variant_id"]]["results"] if row["variant_id"] else job_results)[row["stage"]] = row["result"]
    return {
        "job": job,
        "graph": graph,
        "variants": list(by_variant.values()),
        "job_tasks": job_tasks,
        "job_results": job_results,
        "generated_at": datetime.now(timezone.utc),
    }


def asset_reader(store: ArtifactStore, asset_root: Path, tenant: str) -> Callable[[str], bytes]:
    """Reads an image asset uri (an artifact key, or `file:` under ASSET_ROOT) or an artifact key,
    with the worker's checks (outbox.artifacts.read_asset): keys parsed by segment, `file:`
    paths kept inside ASSET_ROOT, and keys of tenants other than the job's refused.
    A refusal raises; the report shows it in place of the image."""
    root = Path(asset_root).resolve()

    def read(uri: str) -> bytes:
        return read_asset(store, root, uri, tenant)

    return read
