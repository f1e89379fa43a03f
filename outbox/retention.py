"""Retention: finished jobs' rows and artifacts deleted in small batches (`cli.py prune`), and
orphan artifacts (written by attempts whose completion was rejected) swept."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from psycopg import Connection

from outbox.artifacts import ArtifactStore

FINISHED_JOBS = """
SELECT j.job_id FROM jobs j
WHERE j.updated_at < now() - %(age)s
  AND outbox_job_state(j.status, j.current_step) = ANY (%(states)s)
ORDER BY j.updated_at
LIMIT %(batch)s
FOR UPDATE SKIP LOCKED
"""
# Workers that stopped (or went quiet) before the cut-off and hold nothing: the rows `workers
# list` would show as stopped or dead for ever otherwise.
GONE_WORKERS = """
SELECT w.id FROM workers w
WHERE coalesce(w.stopped_at, w.started_at) < now() - %(age)s
  AND NOT outbox_worker_alive(w.id)
  AND NOT EXISTS (SELECT 1 FROM stage_tasks t WHERE t.status = 'running' AND t.lease_owner = w.id)
"""
JOB_ARTIFACT_KEYS = """
SELECT a.value AS key FROM stage_results r, jsonb_each_text(coalesce(r.result->'artifacts', '{}'::jsonb)) a
WHERE r.job_id = ANY (%s)
"""
# Image assets used by these jobs and by no other job.
JOB_ONLY_ASSETS = """
SELECT ia.image_asset_id, ia.uri FROM image_assets ia
WHERE ia.image_asset_id IN (SELECT img_asset_id FROM jobs_variants WHERE job_id = ANY (%(jobs)s))
  AND NOT EXISTS (SELECT 1 FROM jobs_variants v WHERE v.img_asset_id = ia.image_asset_id
                  AND NOT (v.job_id = ANY (%(jobs)s)))
"""
REFERENCED_KEYS = """
SELECT k FROM unnest(%s::text[]) k
WHERE EXISTS (SELECT 1 FROM image_assets WHERE uri = k)
   OR EXISTS (SELECT 1 FROM stage_results r, jsonb_each_text(coalesce(r.result->'artifacts', '{}'::jsonb)) a
              -- keys are tenant/job/...: the job id finds the few results to look at
              WHERE r.job_id = CASE WHEN split_part(k, '/', 2) ~ '^[0-9a-f-]{36}$'
                                    THEN split_part(k, '/', 2)::uuid END
                AND a.value = k)
"""


@dataclass
class PruneReport:
    jobs: int = 0
    assets: int = 0
    artifacts: int = 0
    orphans: int = 0
    workers: int = 0
    batches: int = 0
    job_ids: list[str] = field(default_factory=list)


def prune(conn: Connection, store: ArtifactStore, older_than: timedelta, batch: int = 1000,
          include_failed: bool = False, dry_run: bool = False, orphan_grace: timedelta = timedelta(hours=1)) -> PruneReport:
    """Deletes finished (done at the last job stage, or cancelled; failed with include_failed)
    jobs older than `older_than`, with their variants, inputs, tasks, results, job-only image
    assets and artifacts, `batch` jobs per transaction so workers are never blocked for long.
    Then removes orphan artifacts older than `orphan_grace` (younger ones may belong to a
    completion still in flight), and the rows of workers gone before `older_than`."""
    report = PruneReport()
    # A dry run deletes nothing, so it cannot page by deleting: it lists everything in one pass.
    states = ["done", "cancelled", "failed"] if include_failed else ["done", "cancelled"]
    params = {"age": older_than, "states": states, "batch": None if dry_run else batch}
    while True:
        with conn.transaction():
            jobs = [r["job_id"] for r in conn.execute(FINISHED_JOBS, params).fetchall()]
            if not jobs:
                break
            keys = [r["key"] for r in conn.execute(JOB_ARTIFACT_KEYS, (jobs,)).fetchall()]
            assets = conn.execute(JOB_ONLY_ASSETS, {"jobs": jobs}).fetchall()
            keys += [a["uri"] for a in assets if not a["uri"].startswith("file:")]
            report.jobs += len(jobs)
            report.assets += len(assets)
            report.artifacts += len(keys)
            report.job_ids += [str(j) for j in jobs]
            report.batches += 1
            if dry_run:
                break
            conn.execute("DELETE FROM jobs WHERE job_id = ANY (%s)", (jobs,))
            conn.execute("DELETE FROM image_assets WHERE image_asset_id = ANY (%s)", ([a["image_asset_id"] for a in assets],))
            if store.in_database:
                conn.execute("DELETE FROM artifacts WHERE key = ANY (%s)", (keys,))
        # Outside the database, delete after the commit: a crash in between leaves orphans for
        # the sweep below, never a result pointing at a missing artifact.
        if not store.in_database:
            for key in keys:
                store.delete(key)
    report.orphans = sweep_orphans(conn, store, orphan_grace, batch, dry_run)
    gone = [r["id"] for r in conn.execute(GONE_WORKERS, {"age": older_than}).fetchall()]
    if gone and not dry_run:
        conn.execute("DELETE FROM workers WHERE id = ANY (%s)", (gone,))
    report.workers = len(gone)
    return report


def sweep_orphans(conn: Connection, store: ArtifactStore, grace: timedelta, batch: int = 1000,
                  dry_run: bool = False) -> int:
    removed = 0
    candidates: list[str] = []

    def flush() -> int:
        referenced = {r["k"] for r in conn.execute(REFERENCED_KEYS, (candidates,)).fetchall()}
        orphans = [k for k in candidates if k not in referenced]
        if not dry_run:
            for key in orphans:
                store.delete(key)
        candidates.clear()
        return len(orphans)

    for key in store.keys(older_than_s=grace.total_seconds()):
        candidates.append(key)
        if len(candidates) >= batch:
            removed += flush()
    if candidates:
        removed += flush()
    return removed
