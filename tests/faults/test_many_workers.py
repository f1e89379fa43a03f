"""Scenario 10: sixteen worker processes on this machine against one database."""
from __future__ import annotations

import time

from tests.faults.harness import Fleet, check_invariants, jobs, log_problems, report, submit_jobs, wait_for_jobs


def test_sixteen_workers_claim_nothing_twice(conn, pg_server, db_url, home, tiny_png, tmp_path):
    pg_log_start = pg_server.log_path.stat().st_size
    fleet = Fleet(db_url, tmp_path, 16)
    try:
        fleet.wait_ready(timeout=120)
        started = time.monotonic()
        job_ids = submit_jobs(conn, tiny_png, jobs(30))
        wait_for_jobs(db_url, job_ids, timeout=180)
        elapsed = time.monotonic() - started
    finally:
        codes = fleet.stop()
    assert codes == [0] * 16
    summary = check_invariants(conn, fleet.record_dir, job_ids, exactly_once=True)
    logs = fleet.logs()
    assert not log_problems(logs), log_problems(logs)
    with open(pg_server.log_path, errors="replace") as log:
        log.seek(pg_log_start)
        server_log = log.read()
    assert "deadlock detected" not in server_log
    workers_used = len({t["result_pid"] for t in summary.by_task.values()})
    assert workers_used >= 8
    report("10 sixteen workers", workers=16, workers_that_ran_stages=workers_used, run_s=elapsed,
           tasks_per_s=summary.tasks / elapsed, summary=str(summary))
