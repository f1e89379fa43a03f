"""Scenario 3: PostgreSQL restarted mid-run (fast and immediate shutdown), and taken away for a
while: workers reconnect with backoff, drain what was enqueued while they were away, continue,
and no result is written twice. This module runs its own PostgreSQL (the session's is shared)."""
from __future__ import annotations

import signal
import time

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import clone_database, own_server
from tests.faults.harness import (Fleet, check_invariants, jobs, log_problems, report, submit_jobs,
                                  wait_for_jobs, wait_until)

MODES = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}


@pytest.fixture(scope="module")
def own_pg(tmp_path_factory):
    # Not the session server's fast settings: synchronous_commit=off acknowledges a commit before
    # its WAL is written, so an immediate shutdown loses the last acknowledged commits (a claim
    # comes back, and the same attempt runs twice). fsync=off is kept: it matters only when the
    # operating system, not PostgreSQL, goes down.
    server = own_server(tmp_path_factory, "restart_template", {"fsync": "off", "synchronous_commit": "on"})
    yield server
    server.stop()


def connect(url):
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def results(url) -> int:
    with connect(url) as c:
        return c.execute("SELECT count(*) AS n FROM stage_results").fetchone()["n"]


def listeners(url) -> int:
    with connect(url) as c:
        return c.execute("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
                         "AND query LIKE 'LISTEN outbox_stage_tasks%%'").fetchone()["n"]


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_run(own_pg, mode, home, tiny_png, tmp_path):
    url = clone_database(own_pg, "restart_template")
    with connect(url) as conn:
        job_ids = submit_jobs(conn, tiny_png, jobs(30))
    fleet = Fleet(url, tmp_path, 3, env={"FAULTS_STAGE_SLEEP": "0.02,0.08"})
    try:
        fleet.wait_ready()
        wait_until(lambda: results(url) >= 150, 60, what="mid-run")
        before = results(url)
        down_at = time.monotonic()
        own_pg.restart(MODES[mode], down_s=1.0)
        up_at = time.monotonic()
        away = listeners(url)  # workers still backing off: what comes now is drained later
        with connect(url) as conn:
            late = submit_jobs(conn, tiny_png, jobs(10))
        for worker in fleet:
            worker.wait_ready(60, count=2)
        reconnected = time.monotonic() - up_at
        wait_until(lambda: results(url) > before, 60, what="progress after the restart")
        progress = time.monotonic() - up_at
        wait_for_jobs(url, job_ids + late, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0, 0, 0]
    with connect(url) as conn:
        summary = check_invariants(conn, fleet.record_dir, job_ids + late)
    logs = fleet.logs()
    assert "reconnect attempt" in logs
    problems = log_problems(logs, expected=("could not record the outcome",))
    assert not problems, problems
    report(f"3 PostgreSQL restart ({mode})", down_s=up_at - down_at, listeners_when_back=away,
           all_reconnected_after_s=reconnected, first_result_after_s=progress, summary=str(summary))


def test_short_outage_under_a_lone_worker_loses_nothing(own_pg, home, tiny_png, tmp_path):
    """The database goes away for 2.5 s while a lone worker's stages run: their completions
    fail, and their leases (10 s) outlive the outage. The worker must rescue its own orphaned
    tasks once their leases run out (before the fix it never did: the database leaves a worker's
    own leases out of the deadline it gives that worker, so the tasks stayed running forever)."""
    url = clone_database(own_pg, "restart_template")
    with connect(url) as conn:
        job_ids = submit_jobs(conn, tiny_png, 4, copy="Slow SLEEP:planner:1.5")
    fleet = Fleet(url, tmp_path, 1, args=("--lease", "10", "--retry-base", "0.05", "--retry-max", "0.2",
                                          "--concurrency", "4"))
    try:
        fleet.wait_ready()

        def planner_running():
            with connect(url) as c:
                return c.execute("SELECT count(*) AS n FROM stage_tasks WHERE stage = 'planner' "
                                 "AND status = 'running'").fetchone()["n"] >= 3
        wait_until(planner_running, 60, what="planner running")
        started = time.monotonic()
        own_pg.restart(signal.SIGINT, down_s=2.5)
        wait_for_jobs(url, job_ids, timeout=60)
        recovered = time.monotonic() - started
    finally:
        codes = fleet.stop()
    assert codes == [0]
    with connect(url) as conn:
        summary = check_invariants(conn, fleet.record_dir, job_ids)
    assert "could not record the outcome" in fleet.logs()
    assert "recovery: task" in fleet.logs()
    assert summary.reexecutions >= 1
    report("3b outage under a lone worker (lease 10 s)", outage_s=2.5, all_done_after_s=recovered,
           summary=str(summary))
