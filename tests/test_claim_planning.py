"""The claim stays an ordered walk of a few index entries, whatever the statistics make the
planner believe, and no worker operation pays for JIT compilation (bench/claim_history.py
measures the speed; these tests pin the reasons it holds)."""
from __future__ import annotations

import re

import psycopg

from outbox import completion, jobs, migrate, queue
from tests.helpers import claim, insert_job

QUEUED = 5000


def worker_functions() -> set[str]:
    """Every SQL function the Python side calls: the workers' operations, completion, cancel, rescue."""
    source = "\n".join(open(m.__file__).read() for m in (queue, jobs, completion))
    return set(re.findall(r"\b(outbox_[a-z0-9_]+)\(", source))


def test_no_worker_operation_is_jit_compiled(conn):
    names = worker_functions()
    assert {"outbox_claim_v2", "outbox_complete_claim_v2", "outbox_fail", "outbox_cancel"} <= names
    rows = conn.execute("SELECT proname, coalesce(proconfig, '{}') AS config FROM pg_proc "
                        "WHERE proname = ANY (%s)", (sorted(names),)).fetchall()
    assert {r["proname"] for r in rows} == names
    assert [r["proname"] for r in rows if "jit=off" not in r["config"]] == []


def tuples_read(conn, table="stage_tasks", how="seq_tup_read + coalesce(idx_tup_fetch, 0)") -> int:
    """Rows of `table` this transaction has read so far."""
    return conn.execute(f"SELECT {how} AS n FROM pg_stat_xact_user_tables WHERE relname = %s", (table,)).fetchone()["n"]


def test_a_claim_reads_a_few_rows_of_one_large_jobs_long_queue(conn):
    # One job with thousands of variants: the jobs table's statistics then say that a check
    # against cancelled jobs could remove every queued row, the misjudgement that made the
    # planner read and sort the whole queue on every claim (migration 0002).
    insert_job(conn, variants=QUEUED)
    conn.execute("ANALYZE")
    per_claim = []
    for _ in range(8):  # past the fifth call, where the cached plan may turn generic
        with conn.transaction():
            before = tuples_read(conn)
            assert len(claim(conn, stages=["vlm_analyze"], limit=8)) == 8
            per_claim.append(tuples_read(conn) - before)
    assert max(per_claim) < 200, per_claim


def test_a_plan_made_while_the_results_table_was_empty_still_uses_its_index(conn):
    # The claim keeps one generic plan per session. Made on a fresh install, with stage_results
    # empty, it must not scan that table once per claimed task when it has grown.
    insert_job(conn, variants=600)
    conn.execute("ANALYZE")
    assert len(claim(conn, stages=["vlm_analyze"], limit=8)) == 8  # the plan is made here
    conn.execute("""INSERT INTO stage_results (task_id, job_id, job_variants_id, stage, attempt, result)
                    SELECT id, job_id, job_variants_id, 'earlier', 1, '{}' FROM stage_tasks WHERE status = 'queued'""")
    for _ in range(6):
        with conn.transaction():
            assert len(claim(conn, stages=["vlm_analyze"], limit=8)) == 8
            assert tuples_read(conn, "stage_results", "seq_tup_read") == 0


def test_downgrade_to_0001_restores_its_claim(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "0001")
    with psycopg.connect(empty_db_url) as c:
        config, body = c.execute("SELECT proconfig, prosrc FROM pg_proc WHERE proname = 'outbox_claim'").fetchone()
        assert config == ["enable_bitmapscan=off"]
        assert "NOT EXISTS (SELECT 1 FROM jobs cj" in body
        assert c.execute("SELECT count(*) FROM pg_proc WHERE 'jit=off' = ANY (proconfig)").fetchone()[0] == 0
        language = c.execute("SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
                             "WHERE p.proname = 'outbox_next_deadline'").fetchone()[0]
        assert language == "sql"
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as c:
        assert "jit=off" in c.execute("SELECT proconfig FROM pg_proc WHERE proname = 'outbox_claim'").fetchone()[0]
