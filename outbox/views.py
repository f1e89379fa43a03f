"""One place for the queries the CLI, the report and the web console show: finding a job by a
short reference, listing jobs, workers and failed tasks, and the state of a job or a variant.

The state rules themselves live in SQL (migration 0004: outbox_job_state, outbox_variant_state)
so that these queries, the watcher (outbox/watch.py), the pruner (outbox/retention.py) and the
database's own functions agree on what "done" means. Every function takes an open psycopg
connection with dict rows (outbox.db.connect) and returns plain dicts with datetime values;
`jsonable` turns them into what `--json` prints."""
from __future__ import annotations

import re
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

from psycopg import Connection

from outbox import graph as stage_graph
from outbox.jobs import InvalidInput, NotFound, job_detail as _job_detail, validate_tenant, validate_uuid

AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(value: str) -> timedelta:
    """An age as operators type it (90m, 12h, 30d): the CLI's --since/--older-than and the web
    console's filters read it the same way."""
    value = value.strip()
    if value[-1:] in AGE_UNITS and value[:-1].isdigit():
        return timedelta(seconds=int(value[:-1]) * AGE_UNITS[value[-1]])
    raise InvalidInput(f"age {value!r}: give a number and a unit, e.g. 90m, 12h, 30d")

JOB_STATES = ("open", "done", "failed", "cancelled")
# What outbox_variant_state returns. "queued" covers a variant that has not started and one that
# waits between two stages: neither is done.
VARIANT_STATES = ("queued", "running", "done", "failed", "cancelled")
MIN_PREFIX = 4
MAX_LIMIT = 1000


class UnknownJob(NotFound):
    """No job matches the reference (a NotFound, so callers that know only NotFound map it too)."""

    def __init__(self, ref: str, tenant: str | None = None, message: str | None = None):
        self.ref, self.tenant = ref, tenant
        of = f" of tenant {tenant}" if tenant else ""
        super().__init__(message or f"no job{of} matches {ref!r}")


class AmbiguousJob(LookupError):
    """A prefix that more than one job starts with."""

    def __init__(self, ref: str, candidates: list[str]):
        self.ref, self.candidates = ref, candidates
        shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
        super().__init__(f"{ref!r} is the start of more than one job ({shown}): give more characters")


# ---------------------------------------------------------------------------------- job states
def job_state(conn: Connection, status: str | None, current_step: str | None) -> str:
    """open, done, failed or cancelled, by the database's rule (outbox_job_state)."""
    return conn.execute("SELECT outbox_job_state(%s, %s) AS state", (status, current_step)).fetchone()["state"]


def is_finished(state: str) -> bool:
    """Whether a job in this state (job_state's answer) will change no more on its own."""
    return state != "open"


# ------------------------------------------------------------------------------ finding a job
HEX = re.compile(r"^[0-9a-f]+$")


def resolve_job(conn: Connection, ref: str, tenant: str | None = None) -> str:
    """The full id of the job `ref` names: a full uuid, a unique prefix of one (at least 4 hex
    digits; dashes are ignored), or `latest` (the newest job, of `tenant` if given). Raises
    InvalidInput for something that is none of these, UnknownJob, or AmbiguousJob."""
    ref = (ref or "").strip()
    if tenant is not None:
        validate_tenant(tenant)
    if ref.lower() == "latest":
        row = conn.execute("SELECT job_id::text FROM jobs WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
                           "ORDER BY created_at DESC, job_id DESC LIMIT 1", {"tenant": tenant}).fetchone()
        if row is None:
            raise UnknownJob(ref, tenant, "there are no jobs" + (f" of tenant {tenant}" if tenant else "")
                             + " yet: submit one with `cli.py submit` (or run `cli.py demo`)")
        return row["job_id"]
    digits = ref.lower().replace("-", "")
    if not digits or not HEX.match(digits) or len(digits) > 32:
        raise InvalidInput(f"job {ref!r} is not a UUID, a prefix of one ({MIN_PREFIX}+ hex digits) or 'latest'")
    if len(digits) == 32:
        job_id = validate_uuid(ref, "job id")
        found = conn.execute("SELECT 1 FROM jobs WHERE job_id = %s AND (%s::text IS NULL OR tenant_id = %s)",
                             (job_id, tenant, tenant)).fetchone()
        if found is None:
            raise UnknownJob(ref, tenant)
        return job_id
    if len(digits) < MIN_PREFIX:
        raise InvalidInput(f"job {ref!r}: a prefix needs at least {MIN_PREFIX} hex digits")
    # The ids a prefix covers are one range of the primary key: an index range scan, where a
    # LIKE on job_id::text would read every job.
    low, high = (str(uuid.UUID(digits.ljust(32, fill))) for fill in "0f")
    rows = conn.execute("SELECT job_id::text FROM jobs WHERE job_id BETWEEN %s AND %s "
                        "AND (%s::text IS NULL OR tenant_id = %s) ORDER BY created_at DESC LIMIT 11",
                        (low, high, tenant, tenant)).fetchall()
    if not rows:
        raise UnknownJob(ref, tenant)
    if len(rows) > 1:
        raise AmbiguousJob(ref, [r["job_id"] for r in rows])
    return rows[0]["job_id"]


# ------------------------------------------------------------------------------------ listing
# One row per job with its true state, where it is, and its variants counted by their true
# state. current_step: the job's own step once its job stages run or it finished; while its
# variants run, the earliest stage with a queued or running task of the job (the job row itself
# still says where the variant part started, which made `status JOB`'s header look stale).
JOB_ROWS = """
SELECT j.job_id::text, left(j.job_id::text, 8) AS short_id, j.tenant_id, j.status AS raw_status,
       outbox_job_state(j.status, j.current_step) AS status,
       CASE WHEN outbox_job_state(j.status, j.current_step) = 'open' AND NOT outbox_is_stage(j.current_step, 'job')
            THEN coalesce((SELECT t.stage FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage
                           WHERE t.job_id = j.job_id AND t.status IN ('queued', 'running')
                           ORDER BY g.position LIMIT 1), j.current_step)
            ELSE j.current_step END AS current_step,
       j.current_step AS raw_step, j.created_at, j.updated_at,
       coalesce(v.variants, 0) AS variants, coalesce(v.queued, 0) AS queued, coalesce(v.running, 0) AS running,
       coalesce(v.done, 0) AS done, coalesce(v.failed, 0) AS failed, coalesce(v.cancelled, 0) AS cancelled
FROM jobs j
LEFT JOIN LATERAL (
    SELECT count(*) AS variants,
           count(*) FILTER (WHERE s.state = 'queued') AS queued,
           count(*) FILTER (WHERE s.state = 'running') AS running,
           count(*) FILTER (WHERE s.state = 'done') AS done,
           count(*) FILTER (WHERE s.state = 'failed') AS failed,
           count(*) FILTER (WHERE s.state = 'cancelled') AS cancelled
    FROM (SELECT outbox_variant_state(jv.status, jv.current_step) AS state
          FROM jobs_variants jv WHERE jv.job_id = j.job_id) s
) v ON true
WHERE (%(job)s::uuid IS NULL OR j.job_id = %(job)s::uuid)
  AND (%(tenant)s::text IS NULL OR j.tenant_id = %(tenant)s::text)
  AND (%(status)s::text IS NULL OR outbox_job_state(j.status, j.current_step) = %(status)s::text)
  AND (%(stage)s::text IS NULL OR EXISTS (
           SELECT 1 FROM stage_tasks st WHERE st.job_id = j.job_id AND st.stage = %(stage)s::text
           AND st.status IN ('queued', 'running', 'failed')))
  AND (%(since)s::float8 IS NULL OR j.created_at >= now() - make_interval(secs => %(since)s::float8))
ORDER BY j.created_at DESC, j.job_id DESC
LIMIT %(limit)s OFFSET %(offset)s
"""


def _job_row(row: dict) -> dict:
    counts = {state: row.pop(state) for state in VARIANT_STATES}
    row["variants_by_state"] = counts
    row["failed_variants"] = counts["failed"]
    return row


def steps(conn: Connection) -> list[str]:
    """The graph's stages in pipeline order: what list_jobs' `stage` takes."""
    return stage_graph.read(conn).names()


def list_jobs(conn: Connection, tenant: str | None = None, status: str | None = None, stage: str | None = None,
              since_s: float | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
    """The newest jobs first. status: open, done, failed or cancelled (the job's true state);
    stage: jobs with a task of that stage queued, running or failed; since_s: created
    within the last since_s seconds. Each row: job_id, short_id, tenant_id, status,
    current_step (see JOB_ROWS), created_at, updated_at, variants, variants_by_state
    ({queued, running, done, failed, cancelled}), failed_variants; raw_status and raw_step are
    the job row's own columns."""
    if tenant is not None:
        validate_tenant(tenant)
    if status is not None and status not in JOB_STATES:
        raise InvalidInput(f"status {status!r}: use one of {', '.join(JOB_STATES)}")
    if stage is not None and stage not in (known := steps(conn)):
        raise InvalidInput(f"unknown stage {stage!r}; stages are: {', '.join(known)}")
    if since_s is not None and not since_s > 0:
        raise InvalidInput(f"since {since_s!r}: give a positive number of seconds")
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit {limit}: give 1 to {MAX_LIMIT}")
    if offset < 0:
        raise InvalidInput(f"offset {offset}: give 0 or more")
    rows = conn.execute(JOB_ROWS, {"job": None, "tenant": tenant, "status": status, "stage": stage,
                                   "since": since_s, "limit": limit, "offset": offset}).fetchall()
    return [_job_row(r) for r in rows]


def job_summary(conn: Connection, job_id: str) -> dict:
    """list_jobs' row for one job (UnknownJob when there is none)."""
    job_id = validate_uuid(job_id, "job id")
    row = conn.execute(JOB_ROWS, {"job": job_id, "tenant": None, "status": None, "stage": None, "since": None,
                                  "limit": 1, "offset": 0}).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    return _job_row(row)


def job_detail(conn: Connection, job_id: str) -> dict:
    """Everything `status JOB` shows: outbox.jobs.job_detail (variants with their state, tasks in
    pipeline order with lease owner and expiry) under list_jobs' header for the job (status is
    the true state, current_step where it is, variants_by_state, failed_variants)."""
    summary = job_summary(conn, job_id)
    detail = _job_detail(conn, summary["job_id"])
    detail.update({k: summary[k] for k in ("short_id", "status", "current_step", "raw_status", "raw_step",
                                          "variants_by_state", "failed_variants")})
    detail["variant_count"] = summary["variants"]
    return detail


# ------------------------------------------------------------------------------------ workers
# Registered workers and lease owners that never registered (a release before migration 0004,
# `cli.py run-stage`): both are what the database knows of who works. Alive: a backend carries
# the worker's id as its application_name (outbox_worker_alive; its listening connection stays
# open while it runs), so no worker writes anything to be seen alive. last_heartbeat: the latest
# lease renewal of the tasks it holds (expiry minus its lease).
WORKERS = """
WITH held AS (
    SELECT t.lease_owner, count(*) AS tasks, min(t.lease_expires_at) AS lease_expires_at,
           max(t.lease_expires_at) AS latest_expiry, array_agg(DISTINCT t.stage) AS stages
    FROM stage_tasks t WHERE t.status = 'running' AND t.lease_owner IS NOT NULL
    GROUP BY t.lease_owner
), everyone AS (
    SELECT w.id, w.host, w.pid, w.stages, w.lease_s, w.started_at, w.stopped_at, true AS registered
    FROM workers w
    WHERE w.stopped_at IS NULL OR w.stopped_at > now() - make_interval(secs => %(stopped_within)s::float8)
       OR EXISTS (SELECT 1 FROM held h WHERE h.lease_owner = w.id)
    UNION ALL
    SELECT h.lease_owner, NULL, NULL, h.stages, NULL, NULL, NULL, false
    FROM held h WHERE NOT EXISTS (SELECT 1 FROM workers w WHERE w.id = h.lease_owner)
), seen AS (
    SELECT e.*, outbox_worker_alive(e.id) AS connected FROM everyone e
)
SELECT e.id, e.host, e.pid, e.stages, e.registered, e.started_at, e.stopped_at,
       coalesce(h.tasks, 0) AS tasks, h.lease_expires_at,
       h.latest_expiry - make_interval(secs => e.lease_s) AS last_heartbeat,
       e.connected AND e.stopped_at IS NULL AS alive,
       CASE WHEN e.stopped_at IS NOT NULL THEN 'stopped'
            WHEN e.connected THEN 'alive'
            WHEN NOT e.registered THEN 'unregistered'
            ELSE 'dead' END AS state,
       CASE WHEN e.connected AND e.stopped_at IS NULL THEN now()
            ELSE greatest(e.stopped_at, h.latest_expiry - make_interval(secs => e.lease_s), e.started_at) END
           AS last_seen
FROM seen e
LEFT JOIN held h ON h.lease_owner = e.id
ORDER BY e.connected AND e.stopped_at IS NULL DESC, e.started_at DESC NULLS LAST, e.id
LIMIT %(limit)s
"""


def list_workers(conn: Connection, stopped_within_s: float = 3600.0, limit: int = 500) -> list[dict]:
    """Every worker the database knows: those registered (alive, or dead: registered, not stopped,
    no connection left, i.e. it went quiet), those that stopped within stopped_within_s, and lease
    owners that never registered. Each row: id, host, pid, stages, tasks (running tasks it holds),
    lease_expires_at (the nearest expiry of those), last_heartbeat, last_seen, started_at,
    stopped_at, alive, state (alive, dead, stopped, unregistered), registered."""
    if stopped_within_s < 0:
        raise InvalidInput(f"stopped_within_s {stopped_within_s!r}: give 0 or more")
    return conn.execute(WORKERS, {"stopped_within": stopped_within_s, "limit": limit}).fetchall()


def live_stages(conn: Connection) -> set[str]:
    """The stages some live worker claims. A lease owner that never registered (an older
    release) counts for the stages it holds unexpired leases of: it heartbeats, so it runs."""
    now = datetime.now(timezone.utc)
    return {stage for w in list_workers(conn, stopped_within_s=0)
            if w["alive"] or (not w["registered"] and w["lease_expires_at"] and w["lease_expires_at"] > now)
            for stage in w["stages"] or ()}


def unclaimed_stages(conn: Connection, job_id: str) -> list[str]:
    """The stages of the job's queued or running tasks that no live worker claims, in pipeline
    order: a job waiting on these waits until a worker for them starts."""
    rows = conn.execute("SELECT DISTINCT t.stage, g.position FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage "
                        "WHERE t.job_id = %s AND t.status IN ('queued', 'running') ORDER BY g.position",
                        (validate_uuid(job_id, "job id"),)).fetchall()
    if not rows:
        return []
    covered = live_stages(conn)
    return [r["stage"] for r in rows if r["stage"] not in covered]


# ------------------------------------------------------------------------------- failed tasks
FAILED_TASKS = """
SELECT t.id, t.job_id::text, left(t.job_id::text, 8) AS short_id, j.tenant_id,
       t.job_variants_id::text AS variant_id, v.creation_order, t.stage, t.attempts, t.max_attempts,
       t.last_error, t.error_details, t.created_at, t.started_at, t.finished_at
FROM stage_tasks t JOIN jobs j ON j.job_id = t.job_id
LEFT JOIN jobs_variants v ON v.job_variants_id = t.job_variants_id
WHERE t.status = 'failed'
  AND (%(tenant)s::text IS NULL OR j.tenant_id = %(tenant)s::text)
  AND (%(job)s::uuid IS NULL OR t.job_id = %(job)s::uuid)
ORDER BY t.finished_at DESC NULLS LAST, t.id DESC
LIMIT %(limit)s
"""


def failed_tasks(conn: Connection, tenant: str | None = None, job_id: str | None = None,
                 limit: int = 50) -> list[dict]:
    """Failed tasks, the latest first, with last_error and error_details."""
    if tenant is not None:
        validate_tenant(tenant)
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit {limit}: give 1 to {MAX_LIMIT}")
    job_id = validate_uuid(job_id, "job id") if job_id else None
    return conn.execute(FAILED_TASKS, {"tenant": tenant, "job": job_id, "limit": limit}).fetchall()


# --------------------------------------------------------------------------------- JSON output
def jsonable(value):
    """`value` with datetimes as ISO 8601 strings (and Decimals as numbers), for --json."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


# The queue gauges, per stage of the graph (zeros included), read by the workers' /metrics (and
# so KEDA), `cli.py status` and the console: tasks claimable now, retries waiting for their time,
# tasks running, and the oldest claimable task's age (NULL when none). Each count is its own
# lateral lookup that carries the status, so it walks a partial index (stage_tasks_claimable_idx
# for queued; the running set is small) and never the finished history.
QUEUE_SQL = """
SELECT g.stage, g.level, g.device, q.claimable, q.delayed, q.oldest_s, r.running
FROM stage_graph g
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE t.run_after <= now()) AS claimable,
           count(*) FILTER (WHERE t.run_after > now()) AS delayed,
           extract(epoch FROM now() - min(t.run_after) FILTER (WHERE t.run_after <= now()))::float8 AS oldest_s
    FROM stage_tasks t WHERE t.stage = g.stage AND t.status = 'queued') q
CROSS JOIN LATERAL (
    SELECT count(*) AS running FROM stage_tasks t WHERE t.stage = g.stage AND t.status = 'running') r
ORDER BY g.position"""


def queue_gauges(conn: Connection) -> list[dict]:
    return conn.execute(QUEUE_SQL).fetchall()


def overview(conn: Connection, failures: int = 20) -> dict:
    """`cli.py status` and the console's overview: jobs and variants by state, each stage's queue
    gauges (QUEUE_SQL) and ended counts, the latest failures, variant sets still open."""
    # Counted by their true state (migration 0004): a variant that has not started, or waits
    # between two stages, is queued, not done.
    jobs = conn.execute("SELECT outbox_job_state(status, current_step) AS status, count(*) AS n FROM jobs "
                        "GROUP BY 1 ORDER BY 1").fetchall()
    variants = conn.execute("SELECT outbox_variant_state(status, current_step) AS status, count(*) AS n "
                            "FROM jobs_variants GROUP BY 1 ORDER BY 1").fetchall()
    ended = {r["stage"]: r for r in conn.execute("""
        SELECT stage, count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled
        FROM stage_tasks WHERE status IN ('done', 'failed', 'cancelled') GROUP BY stage""")}
    stages = [{"stage": g["stage"], "level": g["level"], "device": g["device"],
               "queued": g["claimable"] + g["delayed"], "running": g["running"],
               **{k: ended.get(g["stage"], {}).get(k, 0) for k in ("done", "failed", "cancelled")},
               "oldest_queued_s": g["oldest_s"]} for g in queue_gauges(conn)]
    recent_failures = conn.execute("""
        SELECT t.id, t.job_id::text, t.job_variants_id::text AS variant_id, t.stage, t.attempts, t.finished_at,
               t.last_error
        FROM stage_tasks t WHERE t.status = 'failed' ORDER BY t.finished_at DESC NULLS LAST LIMIT %s""",
                                   (failures,)).fetchall()
    # Jobs the fan-in waits on because their variant set is still open (docs/semantics.md): the
    # generator has not written (img_gen, done) and no expected_variants count closed it. Only
    # jobs at the generator's step or in the pipeline: other steps of the shared table are not ours.
    open_sets = conn.execute("SELECT * FROM outbox_open_variant_sets(%s)", (failures,)).fetchall()
    return {"jobs": jobs, "variants": variants, "stages": stages, "failures": recent_failures,
            "open_variant_sets": open_sets}


# Per stage, what finished in the last hour (the console's overview; finished_at is set when a task
# ends done or failed).
LAST_HOUR_SQL = """
    SELECT g.stage,
           count(t.id) FILTER (WHERE t.status = 'done') AS done,
           count(t.id) FILTER (WHERE t.status = 'failed') AS failed
    FROM stage_graph g
    LEFT JOIN stage_tasks t ON t.stage = g.stage AND t.finished_at >= now() - interval '1 hour'
                           AND t.status IN ('done', 'failed')
    GROUP BY g.stage, g.position ORDER BY g.position"""


def last_hour(conn: Connection) -> dict[str, dict]:
    """{stage: {"done": n, "failed": n}} for tasks that finished in the last hour."""
    return {r["stage"]: {"done": r["done"], "failed": r["failed"]} for r in conn.execute(LAST_HOUR_SQL)}
