"""The outbox's operations as statements over the SQL functions of the migrations, plus the
retry policy and replay. One statement per operation: round trips are what cost."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime

from psycopg import Connection

WORKER_CHANNEL = "outbox_stage_tasks"
VARIANT_CHANNEL = "job_variant_state_changed"
JOB_CHANNEL = "job_state_changed"

# v2: the claim with its queue wait (migration 0006); outbox_claim answers the previous release.
CLAIM = "SELECT * FROM outbox_claim_v2(%s, %s, %s, %s, %s, %s)"
FAIL = "SELECT outbox_fail(%s, %s, %s, %s, %s, %s, %s) AS outcome"
RESCUE_EXPIRED = "SELECT * FROM outbox_rescue_expired(%s)"
NEXT_DEADLINE = "SELECT outbox_next_deadline(%s, %s) AS seconds"
HEARTBEAT = "SELECT outbox_heartbeat(%s, %s, %s) AS id"
HAND_BACK = "SELECT outbox_hand_back(%s, %s) AS id"
# A worker's two writes to the workers table (migration 0004), at start and at stop: nothing in
# between, so an idle worker stays silent; whether it is alive is read from pg_stat_activity.
REGISTER_WORKER = """
INSERT INTO workers (id, host, pid, stages, lease_s) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, stages = EXCLUDED.stages,
    lease_s = EXCLUDED.lease_s, started_at = now(), stopped_at = NULL"""
DEREGISTER_WORKER = "UPDATE workers SET stopped_at = now() WHERE id = %s"


INPUT_COLUMNS = ("ad_copy", "img_asset_id", "asset_uri", "asset_tenant", "results", "variants")


@dataclass(frozen=True)
class ClaimedTask:
    id: int
    job_id: str
    variant_id: str | None
    stage: str
    attempt: int
    max_attempts: int
    tenant_id: str
    inputs: dict = field(default_factory=dict, compare=False, repr=False)
    # Runs alone: its worker died under it before and this is its last attempt (outbox_claim).
    alone: bool = False
    # Seconds from the moment it became claimable (enqueued, or its retry time) to this claim.
    waited_s: float | None = None
    # When its job was created (the database's clock): the job's duration at its last stage.
    job_created_at: datetime | None = None

    @classmethod
    def from_row(cls, row: dict) -> "ClaimedTask":
        return cls(id=row["id"], job_id=str(row["job_id"]),
                   variant_id=str(row["job_variants_id"]) if row["job_variants_id"] else None,
                   stage=row["stage"], attempt=row["attempt"], max_attempts=row["max_attempts"],
                   alone=bool(row.get("alone")), waited_s=row.get("waited_s"),
                   job_created_at=row.get("job_created_at"),
                   tenant_id=row["tenant_id"], inputs={k: row[k] for k in INPUT_COLUMNS})

    @property
    def subject(self) -> str:
        return f"variant {self.variant_id}" if self.variant_id else f"job {self.job_id}"


def suspect_waiting(rows: list[dict]) -> bool:
    """True when the claim took nothing because a task waits to run alone: call again with
    p_alone once nothing is in flight (see outbox_claim)."""
    return any(r["id"] is None and r.get("suspect_waiting") for r in rows)


def split_claim(rows: list[dict]) -> tuple[list[ClaimedTask], float | None]:
    """The claimed tasks, and the seconds to the next deadline (None: nothing to wait for, or
    every slot asked for was filled)."""
    tasks = [ClaimedTask.from_row(r) for r in rows if r["id"] is not None]
    deadline = next((r["next_deadline_s"] for r in rows if r["id"] is None), None)
    return tasks, deadline


def retry_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, then scaled by a random
    factor in [0.5, 1] so retries of tasks that failed together spread out."""
    ceiling = min(cap_s, base_s * (2 ** max(attempt - 1, 0)))
    return ceiling * random.uniform(0.5, 1.0)


def replay_failed(conn: Connection, job_id: str | None = None, stage: str | None = None,
                  since: datetime | None = None, dry_run: bool = False, task_id: int | None = None,
                  tenant: str | None = None) -> list[dict]:
    """Puts failed tasks back in the queue with their attempts reset; their variant (or job) goes
    back to (stage, queued), and a job that failed at its fan-in (every variant failed) to running,
    so that the fan-in fires when the replayed variant finishes. A job that failed in a job stage
    stays failed when one of its variants is replayed: its job stages ran, without that variant
    (docs/semantics.md). Cancelled jobs are never revived."""
    select = """
        SELECT t.id, t.job_id, t.job_variants_id, t.stage, t.attempts, t.last_error, t.finished_at
        FROM stage_tasks t JOIN jobs j ON j.job_id = t.job_id
        WHERE t.status = 'failed' AND j.status <> 'cancelled'
          AND (%(job)s::uuid IS NULL OR t.job_id = %(job)s::uuid)
          AND (%(stage)s::text IS NULL OR t.stage = %(stage)s::text)
          AND (%(since)s::timestamptz IS NULL OR t.finished_at >= %(since)s::timestamptz)
          AND (%(task)s::bigint IS NULL OR t.id = %(task)s::bigint)
          AND (%(tenant)s::text IS NULL OR j.tenant_id = %(tenant)s::text)
        ORDER BY t.id
    """
    params = {"job": job_id, "stage": stage, "since": since, "task": task_id, "tenant": tenant}
    if dry_run:
        return conn.execute(select, params).fetchall()
    with conn.transaction():
        rows = conn.execute(select + " FOR UPDATE OF t", params).fetchall()
        ids = [row["id"] for row in rows]
        if not ids:
            return rows
        conn.execute("""
            UPDATE stage_tasks SET status = 'queued', attempts = 0, run_after = now(),
                   finished_at = NULL, lease_owner = NULL, lease_expires_at = NULL
            WHERE id = ANY (%s)""", (ids,))
        conn.execute("""
            UPDATE jobs_variants v SET status = 'queued', current_step = t.stage
            FROM stage_tasks t WHERE t.id = ANY (%s) AND v.job_variants_id = t.job_variants_id""", (ids,))
        conn.execute("""
            UPDATE jobs j SET status = CASE WHEN t.job_variants_id IS NULL THEN 'queued' ELSE 'running' END,
                   current_step = CASE WHEN t.job_variants_id IS NULL THEN t.stage ELSE j.current_step END
            FROM stage_tasks t
            WHERE t.id = ANY (%s) AND j.job_id = t.job_id
              AND (t.job_variants_id IS NULL OR (j.status = 'failed' AND NOT EXISTS (
                       SELECT 1 FROM stage_tasks jt WHERE jt.job_id = j.job_id AND jt.job_variants_id IS NULL)))""",
                     (ids,))
    return rows
