"""The engine's operations as a worker and an outside writer perform them, over one backend: a
connection path (straight to PostgreSQL, or through PgBouncer in transaction mode) and a claim
API (this release's outbox_claim_v2, or the previous release's outbox_claim, which workers keep
calling during a rolling update). The conformance tests speak only to this class, so a new
backend (another pooler, a changed SQL function, another API version) is one more entry in
BACKENDS and must pass every promise unchanged."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from outbox import graph as stage_graph
from outbox import queue


@dataclass(frozen=True)
class Backend:
    name: str
    claim_sql: str  # the claim statement, outbox_claim's six arguments
    pooled: bool  # statements through PgBouncer (transaction mode); LISTEN always direct


BACKENDS = (
    Backend("direct", queue.CLAIM, pooled=False),
    Backend("previous-release-claim", "SELECT * FROM outbox_claim(%s, %s, %s, %s, %s, %s)", pooled=False),
    Backend("pgbouncer", queue.CLAIM, pooled=True),
)


class Engine:
    """One backend on one database. `url` is where statements go; `direct_url` is PostgreSQL
    itself (LISTEN, and the checks that read the tables)."""

    def __init__(self, backend: Backend, url: str, direct_url: str):
        self.backend, self.url, self.direct_url = backend, url, direct_url
        self.conn = self.connect()
        self.graph = stage_graph.read(self.conn)

    def connect(self) -> psycopg.Connection:
        # No server-side prepared statements: a transaction pooler hands each transaction to
        # any server connection (outbox/db.py does the same for the workers' pools).
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, prepare_threshold=None)

    def close(self) -> None:
        self.conn.close()

    # --- an outside writer
    def submit(self, variants: int = 2, conn=None) -> tuple[str, list[str]]:
        """A job as the image generator writes it, one plain statement at a time."""
        c = conn or self.conn
        job_id = str(uuid.uuid4())
        c.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step, expected_variants) "
                  "VALUES (%s, 'acme', 'running', 'img_gen', %s)", (job_id, variants))
        c.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'Fresh lemonade, 2 for $5')", (job_id,))
        vids = [str(uuid.uuid4()) for _ in range(variants)]
        for i, vid in enumerate(vids):
            c.execute("INSERT INTO jobs_variants (job_variants_id, job_id, creation_order, status, current_step) "
                      "VALUES (%s, %s, %s, 'done', 'img_gen')", (vid, job_id, i + 1))
        return job_id, vids

    # --- a worker
    def claim(self, owner: str, limit: int = 10, stages: list[str] | None = None, lease_s: float = 30.0,
              conn=None) -> list[dict]:
        rows = (conn or self.conn).execute(self.backend.claim_sql, (owner, stages or self.graph.names(), limit,
                                                                    lease_s, None, True)).fetchall()
        return [r for r in rows if r["id"] is not None]

    def complete(self, owner: str, tasks: list[dict], conn=None) -> list[int]:
        """The completer's group commit (outbox_complete_many): the ids accepted."""
        items = Jsonb([{"id": t["id"], "attempt": t["attempt"], "result": {"stage": t["stage"]}} for t in tasks])
        return (conn or self.conn).execute("SELECT outbox_complete_many(%s, %s) AS ids", (owner, items)).fetchone()["ids"]

    def fail(self, owner: str, task: dict, error: str = "boom", permanent: bool = False, retry_in_s: float = 0.0) -> str:
        return self.conn.execute(queue.FAIL, (task["id"], owner, task["attempt"], error, Jsonb({}), permanent,
                                              retry_in_s)).fetchone()["outcome"]

    def rescue(self) -> list[dict]:
        return self.conn.execute(queue.RESCUE_EXPIRED, (100,)).fetchall()

    def cancel(self, job_id: str) -> dict:
        return self.conn.execute("SELECT * FROM outbox_cancel(%s)", (job_id,)).fetchone()

    def run_until_idle(self, owner: str, limit: int = 10, conn=None) -> int:
        """Claims and completes until nothing is claimable; returns the tasks completed."""
        done = 0
        while tasks := self.claim(owner, limit, conn=conn):
            done += len(self.complete(owner, tasks, conn=conn))
        return done

    # --- what the database says (always read straight from PostgreSQL)
    def read(self, sql: str, args: tuple = ()) -> list[dict]:
        with psycopg.connect(self.direct_url, autocommit=True, row_factory=dict_row) as c:
            return c.execute(sql, args).fetchall()

    def job_state(self, job_id: str) -> str:
        return self.read("SELECT outbox_job_state(status, current_step) AS s FROM jobs WHERE job_id = %s",
                         (job_id,))[0]["s"]

    def tasks(self, job_id: str) -> list[dict]:
        return self.read("SELECT id, job_variants_id::text AS variant_id, stage, status, attempts, "
                         "outbox_attempts(t) AS attempt_log FROM stage_tasks t WHERE job_id = %s ORDER BY id", (job_id,))
