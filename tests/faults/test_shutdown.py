"""Scenario 8: graceful shutdown with SIGTERM under load; a rolling restart of every worker."""
from __future__ import annotations

import signal
import time

from tests.faults.harness import (Fleet, check_invariants, held_by, jobs, log_problems, report, submit_jobs,
                                  wait_for_jobs, wait_taken_over, wait_until)


def test_rolling_restart_under_load(conn, db_url, home, tiny_png, tmp_path):
    """Four workers; one after the other each gets SIGTERM while it runs stages, finishes what it
    holds (grace 5 s, far longer than a stage), exits 0 and is started again. No task is lost,
    none runs twice."""
    job_ids = submit_jobs(conn, tiny_png, jobs(30))
    fleet = Fleet(db_url, tmp_path, 4, env={"FAULTS_STAGE_SLEEP": "0.02,0.08"})
    stops = []
    try:
        fleet.wait_ready()
        for _ in range(jobs(1)):
            for worker in fleet:
                try:
                    wait_until(lambda: held_by(conn, worker.worker_id), 3, interval=0.01)
                except AssertionError:
                    pass  # idle: stop it all the same
                started = time.monotonic()
                worker.signal(signal.SIGTERM)
                assert worker.proc.wait(30) == 0
                stops.append(time.monotonic() - started)
                worker.start()
                worker.wait_ready()
        wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0] * 4
    summary = check_invariants(conn, fleet.record_dir, job_ids, exactly_once=True)
    logs = fleet.logs()
    assert logs.count("stopping (SIGTERM)") >= 8 and "handed back" not in logs
    assert not log_problems(logs), log_problems(logs)
    report("8 rolling restart (SIGTERM, grace 5 s)", restarts=len(stops), stop_max_s=max(stops),
           stop_mean_s=sum(stops) / len(stops), summary=str(summary))


def test_sigterm_hands_back_what_cannot_finish_in_the_grace_period(conn, db_url, home, tiny_png, tmp_path):
    """Slow stages and a short grace: the stopping worker hands its tasks back at once, another
    worker takes them without waiting for a lease to run out; nothing lost, one result each."""
    job_ids = submit_jobs(conn, tiny_png, jobs(2), copy="Slow SLEEP:planner:2")
    fleet = Fleet(db_url, tmp_path, 2, args=("--lease", "10", "--retry-base", "0.05", "--retry-max", "0.2",
                                            "--concurrency", "8", "--grace", "0.3"))
    try:
        fleet.wait_ready()
        def planners():  # the worker running the most slow planner stages (2 s each)
            holding = [(w, {i: t for i, t in held_by(conn, w.worker_id).items() if t["stage"] == "planner"})
                       for w in fleet]
            best = max(holding, key=lambda wh: len(wh[1]))
            return best if len(best[1]) >= 2 else None
        victim, held = wait_until(planners, 60, interval=0.01, what="planner running")
        victim.signal(signal.SIGTERM)
        started = time.monotonic()
        assert victim.proc.wait(30) == 0
        exited = time.monotonic() - started
        retaken = wait_taken_over(conn, held, timeout=30)
        wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0, 0]
    summary = check_invariants(conn, fleet.record_dir, job_ids)
    assert "handed back" in victim.output()
    assert retaken < 3  # not a lease expiry (10 s): the hand-back made them claimable at once
    for task in held.values():
        row = summary.by_task[(task["subject"], task["stage"])]
        assert row["status"] == "done" and row["attempts"] == task["attempt"] + 1
    report("8b SIGTERM hands back (grace 0.3 s)", handed_back=len(held), exit_s=exited, retaken_s=retaken,
           summary=str(summary))


def test_sigterm_while_starting_exits_cleanly(db_url, home, tmp_path):
    """SIGTERM at any moment of the start (imports, registry, connecting, LISTEN) ends the worker
    with 0, never by the signal: a rolling update may stop a worker that is still starting."""
    from tests.faults.harness import Worker

    codes = []
    for i, delay in enumerate((0.1, 0.2, 0.35, 0.5, 0.8)):
        worker = Worker(f"s{i}", db_url, tmp_path, tmp_path)
        time.sleep(delay)
        worker.signal(signal.SIGTERM)
        codes.append(worker.proc.wait(30))
    assert codes == [0] * len(codes), codes
