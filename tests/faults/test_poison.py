"""Scenario 2: a stage that kills its own process on a poisoned input (os._exit, SIGSEGV)."""
from __future__ import annotations

import re
import time

from tests.faults.harness import FAST, Fleet, check_invariants, jobs, report, submit_jobs, wait_for_jobs


def test_a_stage_that_kills_its_worker_fails_after_max_attempts_and_nothing_else_stalls(
        conn, db_url, home, tiny_png, tmp_path):
    """Three worker processes under one supervisor (which restarts a dead child, with backoff).
    Two poisoned jobs: one kills its worker with os._exit at planner, one with SIGSEGV at
    overlay, at every attempt. attempts counts at claim, so each poisoned task ends failed after
    max_attempts (3) expired leases, while every other job finishes."""
    good = submit_jobs(conn, tiny_png, jobs(30))
    poisoned = submit_jobs(conn, tiny_png, 1, variants=1, copy="Poison CRASH:planner")
    poisoned += submit_jobs(conn, tiny_png, 1, variants=1, copy="Poison SEGV:overlay")
    started = time.monotonic()
    fleet = Fleet(db_url, tmp_path, 1, args=("--processes", "3", *FAST), prefix="supervisor")
    try:
        states = wait_for_jobs(db_url, good + poisoned, timeout=180)
        elapsed = time.monotonic() - started
    finally:
        codes = fleet.stop()
    assert codes == [0]
    summary = check_invariants(conn, fleet.record_dir, good + poisoned, expect_failed=set(poisoned))
    assert {j: states[j] for j in poisoned} == {j: "failed" for j in poisoned}
    failed = summary.failed_tasks
    assert sorted((t["stage"], t["attempts"]) for t in failed) == [("overlay", 3), ("planner", 3)], failed
    for task in failed:
        assert "lease expired at attempt 3 of 3" in task["last_error"], task
    for task in failed:
        assert summary.by_task[(task["variant"], task["stage"])]["starts"] == 3  # executed at each attempt
    # Each poisoned attempt killed its process (137: os._exit, -11: SIGSEGV); the two poisoned
    # tasks may share a process at their first attempts, never at their last (it runs alone).
    deaths = re.findall(r"(?:died|exited) with (-11|137)", fleet[0].output())
    assert "-11" in deaths and "137" in deaths and 4 <= len(deaths) <= 6, deaths
    alone = re.findall(r"task \d+ \((\w+), .*this is its last attempt: it runs alone", fleet[0].output())
    assert {"planner", "overlay"} <= set(alone), alone
    report("2 poisoned input kills its worker", crashes=len(deaths), poisoned_tasks_failed_after_attempts=3,
           all_jobs_finished_s=elapsed, summary=str(summary))
