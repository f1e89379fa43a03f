"""Worker processes: retries, failures, reconnect, graceful shutdown, idleness, supervisor."""
from __future__ import annotations

import signal
import time

import psycopg
import pytest

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests.workerproc import WorkerProcess, wait_for_jobs, wait_for_task

FAST = ("--retry-base", "0.05", "--retry-max", "0.2")


def submit(conn, image, copy="Fresh coffee", variants=2):
    return submit_job(conn, open_store(), [image], copy, tenant="acme", variants=variants).job_id


def test_retry_then_success_and_permanent_failure_recorded(conn, db_url, home, tiny_png, tmp_path):
    ok = submit(conn, tiny_png, "Sale FLAKY:planner:2")
    bad = submit(conn, tiny_png, "Sale PERMANENT:overlay")
    worker = WorkerProcess(db_url, tmp_path / "w.log", *FAST)
    try:
        states = wait_for_jobs(db_url, [ok, bad])
    finally:
        assert worker.stop() == 0
    assert states == {ok: "done", bad: "failed"}
    attempts = conn.execute("SELECT attempts FROM stage_tasks WHERE job_id = %s AND stage = 'planner'", (ok,)).fetchall()
    assert [r["attempts"] for r in attempts] == [3, 3]
    failed = conn.execute("SELECT status, attempts, last_error FROM stage_tasks WHERE job_id = %s AND stage = 'overlay'",
                          (bad,)).fetchall()
    assert all(r["status"] == "failed" and r["attempts"] == 1 and "bad input planted" in r["last_error"] for r in failed)
    log = worker.output()
    assert "[TRIGGER] stage planner started" in log and "succeeded" in log and "retry in" in log
    assert "stage overlay failed for variant" in log and "(permanent)" in log


def listener_pids(conn, dbname):
    return [r["pid"] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN outbox_stage_tasks%%'", (dbname,))]


def test_reconnects_after_the_listening_backend_is_killed_and_drains(conn, db_url, home, tiny_png, tmp_path):
    worker = WorkerProcess(db_url, tmp_path / "w.log", *FAST)
    try:
        worker.wait_ready()
        dbname = db_url.rsplit("/", 1)[1]
        [pid] = listener_pids(conn, dbname)
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        job = submit(conn, tiny_png)  # committed while the listener is away
        states = wait_for_jobs(db_url, [job], timeout=60)
        assert states == {job: "done"}
        assert worker.output().count("LISTEN started") >= 2
        assert "reconnect attempt" in worker.output()
    finally:
        assert worker.stop() == 0


def test_sigterm_hands_back_what_cannot_finish_in_the_grace_period(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, "Slow SLEEP:vlm_analyze:30", variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", "--grace", "0.5")
    wait_for_task(db_url, "vlm_analyze")
    started = time.monotonic()
    assert worker.stop() == 0
    assert time.monotonic() - started < 10
    row = conn.execute("SELECT status, lease_owner, attempts FROM stage_tasks WHERE job_id = %s", (job,)).fetchone()
    assert row == {"status": "queued", "lease_owner": None, "attempts": 1}
    assert "handed back 1 unfinished task" in worker.output()


def test_sigterm_lets_in_flight_tasks_finish_within_grace(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, "Slow SLEEP:vlm_analyze:1", variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", "--grace", "20", "--stages", "vlm_analyze")
    wait_for_task(db_url, "vlm_analyze")
    assert worker.stop() == 0
    rows = conn.execute("SELECT stage, status FROM stage_tasks WHERE job_id = %s ORDER BY id", (job,)).fetchall()
    assert rows == [{"stage": "vlm_analyze", "status": "done"}, {"stage": "yolo_detect", "status": "queued"}]


def backend_activity(conn, dbname):
    return sorted((r["pid"], r["state_change"], r["xact_start"]) for r in conn.execute(
        "SELECT pid, state_change, xact_start FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,)))


def test_idle_workers_send_no_queries(conn, pg_server, db_url, home, tmp_path):
    workers = [WorkerProcess(db_url, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        time.sleep(1.0)
        dbname = db_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_server.url, autocommit=True, row_factory=psycopg.rows.dict_row) as admin:
            before = backend_activity(admin, dbname)
            time.sleep(3.0)
            after = backend_activity(admin, dbname)
        assert len(before) >= 4  # each worker: a listening connection and a pooled one
        assert before == after  # no backend ran a statement in those 3 s
    finally:
        for w in workers:
            assert w.stop() == 0


def test_spurious_notifications_cause_no_work(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", *FAST)
    try:
        wait_for_jobs(db_url, [job])
        for _ in range(50):
            conn.execute("SELECT pg_notify('outbox_stage_tasks', 'vlm_analyze')")
        time.sleep(0.5)
    finally:
        assert worker.stop() == 0
    assert conn.execute("SELECT count(*) AS n FROM stage_results").fetchone()["n"] == 10
    assert worker.output().count("[TRIGGER]") == 10


def test_supervisor_runs_n_processes_and_restarts_a_killed_one(conn, db_url, home, tiny_png, tmp_path):
    supervisor = WorkerProcess(db_url, tmp_path / "s.log", "--processes", "2")
    try:
        deadline = time.monotonic() + 60
        while supervisor.output().count("LISTEN started") < 2:
            assert time.monotonic() < deadline, supervisor.output()
            time.sleep(0.1)
        import re

        pids = [int(p) for p in re.findall(r"started \(pid (\d+)\)", supervisor.output())]
        import os

        os.kill(pids[0], signal.SIGKILL)
        supervisor.wait_for_log("died with -9; restarting")
        job = submit(conn, tiny_png)
        assert wait_for_jobs(db_url, [job]) == {job: "done"}
        deadline = time.monotonic() + 60
        while supervisor.output().count("LISTEN started") < 3:
            assert time.monotonic() < deadline, supervisor.output()
            time.sleep(0.1)
    finally:
        assert supervisor.stop() == 0


def test_listener_switched_off_runs_nothing(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", env={"ENABLE_JOB_STATE_LISTENER": "false"})
    try:
        worker.wait_for_log("disabled by ENABLE_JOB_STATE_LISTENER=false")
        time.sleep(0.5)
    finally:
        assert worker.stop() == 0
    assert conn.execute("SELECT status FROM stage_tasks WHERE job_id = %s", (job,)).fetchone()["status"] == "queued"


@pytest.mark.parametrize("after_s", [0.0, 0.05, 0.1, 0.2, 0.4, 0.8])
def test_sigterm_while_starting_ends_the_worker_cleanly(db_url, tmp_path, after_s):
    """A rolling update or a scale-down may stop a worker that is still importing or loading: it
    end at once, not ignore the signal (a SystemExit raised inside an import's callback was printed
    and dropped, and the worker then ran until SIGKILL). Exit 0, or killed by the SIGTERM itself
    when it came before the interpreter had any handler."""
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    time.sleep(after_s)
    worker.signal(signal.SIGTERM)
    assert worker.proc.wait(30) in (0, -signal.SIGTERM), worker.output()
    assert "Exception ignored" not in worker.output()
