"""The outbox operations: claim, lease fencing, retry, permanent failure, rescue, replay."""
from __future__ import annotations

import threading
import time

from outbox import db, queue
from tests.helpers import claim, complete, fail, insert_job


def test_concurrent_claimers_never_hold_a_task_twice(conn, db_url):
    for _ in range(50):
        insert_job(conn, variants=4)  # 200 claimable tasks
    claimers, got, errors = 8, {}, []

    def claimer(i):
        c = db.connect(db_url)
        try:
            while True:
                rows = claim(c, owner=f"w{i}", limit=3)
                if not rows:
                    return
                for row in rows:
                    if row["id"] in got:
                        errors.append(f"task {row['id']} claimed by w{i} and {got[row['id']]}")
                    got[row["id"]] = f"w{i}"
        finally:
            c.close()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 200
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE status = 'running' AND attempts = 1").fetchone()["n"] == 200


def test_stale_worker_result_is_dropped(conn):
    insert_job(conn, variants=1)
    [first] = claim(conn, owner="old", lease=0.01)
    time.sleep(0.05)
    rescued = conn.execute(queue.RESCUE_EXPIRED, (100,)).fetchall()
    assert [r["outcome"] for r in rescued] == ["requeued"]
    [second] = claim(conn, owner="new")
    assert second["id"] == first["id"] and second["attempt"] == 2
    assert complete(conn, first, owner="old") is False
    assert complete(conn, second, owner="new") is True
    assert complete(conn, second, owner="new") is False  # a second completion is refused too
    rows = conn.execute("SELECT attempt FROM stage_results WHERE task_id = %s", (first["id"],)).fetchall()
    assert rows == [{"attempt": 2}]


def test_retry_then_success_and_attempts_are_counted_at_claim(conn):
    insert_job(conn, variants=1)
    [task] = claim(conn)
    assert fail(conn, task, error="transient", retry_in=30) == "retry"
    row = conn.execute("SELECT status, attempts, last_error, run_after > now() + interval '20 s' AS later "
                       "FROM stage_tasks WHERE id = %s", (task["id"],)).fetchone()
    assert row == {"status": "queued", "attempts": 1, "last_error": "transient", "later": True}
    assert claim(conn) == []  # not before run_after
    seconds = conn.execute(queue.NEXT_DEADLINE, (["vlm_analyze"], "w1")).fetchone()["seconds"]
    assert 20 < seconds <= 30
    conn.execute("UPDATE stage_tasks SET run_after = now() WHERE id = %s", (task["id"],))
    [again] = claim(conn)
    assert again["attempt"] == 2
    assert complete(conn, again)


def test_exhausted_attempts_fail_the_task_and_the_variant(conn):
    job_id, [vid] = insert_job(conn, variants=1)
    for attempt in (1, 2, 3):
        [task] = claim(conn)
        assert task["attempt"] == attempt
        outcome = fail(conn, task, error=f"failure {attempt}")
        conn.execute("UPDATE stage_tasks SET run_after = now() WHERE id = %s", (task["id"],))
    assert outcome == "failed"
    variant = conn.execute("SELECT status, current_step FROM jobs_variants WHERE job_variants_id = %s", (vid,)).fetchone()
    assert variant == {"status": "failed", "current_step": "vlm_analyze"}
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job_id,)).fetchone()["status"] == "failed"


def test_permanent_failure_is_immediate_and_replay_resets_attempts(conn):
    job_id, [vid] = insert_job(conn, variants=1)
    [task] = claim(conn)
    assert fail(conn, task, error="bad input", permanent=True) == "failed"
    assert queue.replay_failed(conn, dry_run=True)[0]["id"] == task["id"]
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (task["id"],)).fetchone()["status"] == "failed"
    replayed = queue.replay_failed(conn, job_id=job_id, stage="vlm_analyze")
    assert [r["id"] for r in replayed] == [task["id"]]
    row = conn.execute("SELECT status, attempts FROM stage_tasks WHERE id = %s", (task["id"],)).fetchone()
    assert row == {"status": "queued", "attempts": 0}
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job_id,)).fetchone()["status"] == "running"
    [again] = claim(conn)
    assert again["attempt"] == 1 and complete(conn, again)
    assert queue.replay_failed(conn) == []


def test_replay_filters(conn):
    for _ in range(2):
        insert_job(conn, variants=1)
    tasks = claim(conn)
    for task in tasks:
        fail(conn, task, permanent=True)
    job_a = str(tasks[0]["job_id"])
    assert [r["id"] for r in queue.replay_failed(conn, job_id=job_a, dry_run=True)] == [tasks[0]["id"]]
    assert queue.replay_failed(conn, stage="planner", dry_run=True) == []
    from datetime import datetime, timedelta, timezone

    assert queue.replay_failed(conn, since=datetime.now(timezone.utc) + timedelta(hours=1), dry_run=True) == []


def test_lease_expiry_after_max_attempts_fails_instead_of_looping(conn):
    """A stage that kills its worker: attempts still count at claim; the rescue ends it."""
    insert_job(conn, variants=1)
    for attempt in (1, 2, 3):
        [task] = claim(conn, owner=f"dead{attempt}", lease=0.01)
        time.sleep(0.03)
        [rescued] = conn.execute(queue.RESCUE_EXPIRED, (100,)).fetchall()
    assert rescued["outcome"] == "failed"
    row = conn.execute("SELECT status, attempts, last_error FROM stage_tasks WHERE id = %s", (task["id"],)).fetchone()
    assert row["status"] == "failed" and row["attempts"] == 3 and "lease expired" in row["last_error"]


def test_heartbeat_extends_only_own_leases_and_hand_back_requeues(conn):
    insert_job(conn, variants=2)
    a, b = claim(conn, owner="w1", limit=1)[0], claim(conn, owner="w2", limit=1)[0]
    alive = [r["id"] for r in conn.execute(queue.HEARTBEAT, ("w1", [a["id"], b["id"]], 60)).fetchall()]
    assert alive == [a["id"]]
    back = [r["id"] for r in conn.execute(queue.HAND_BACK, ("w1", [a["id"], b["id"]])).fetchall()]
    assert back == [a["id"]]
    row = conn.execute("SELECT status, lease_owner, attempts FROM stage_tasks WHERE id = %s", (a["id"],)).fetchone()
    assert row == {"status": "queued", "lease_owner": None, "attempts": 1}


def test_deadline_is_null_when_nothing_waits(conn):
    assert conn.execute(queue.NEXT_DEADLINE, (["vlm_analyze"], "w1")).fetchone()["seconds"] is None
    insert_job(conn, variants=1)
    claim(conn, owner="other", lease=5)
    seconds = conn.execute(queue.NEXT_DEADLINE, (["planner"], "w1")).fetchone()["seconds"]
    assert 0 < seconds <= 5
    assert conn.execute(queue.NEXT_DEADLINE, (["planner"], "other")).fetchone()["seconds"] is None


def test_retry_delay_grows_with_jitter_and_cap():
    delays = [queue.retry_delay(a, 2.0, 60.0) for a in (1, 2, 3, 4, 10)]
    assert 1.0 <= delays[0] <= 2.0 and 2.0 <= delays[1] <= 4.0 and 4.0 <= delays[2] <= 8.0
    assert 30.0 <= delays[4] <= 60.0
    assert len({round(queue.retry_delay(3, 2.0, 60.0), 6) for _ in range(20)}) > 1


def test_a_task_that_lost_its_worker_runs_its_last_attempt_alone(conn):
    """Crash isolation: after its worker died under it, a task's last attempt is claimed only by
    a worker with nothing in flight, alone; busy workers claim nothing meanwhile and are told."""
    insert_job(conn, variants=1)
    for attempt in (1, 2):
        [task] = claim(conn, owner=f"dead{attempt}", lease=0.01)
        time.sleep(0.03)
        assert [r["outcome"] for r in conn.execute(queue.RESCUE_EXPIRED, (100,)).fetchall()] == ["requeued"]
    insert_job(conn, variants=2)  # innocent work, queued behind the suspect
    rows = []
    assert claim(conn, owner="busy", alone=False, rows_out=rows) == []
    assert queue.suspect_waiting(rows)
    rows = []
    [alone] = claim(conn, owner="idle", alone=True, rows_out=rows)
    assert alone["id"] == task["id"] and alone["attempt"] == 3 and alone["alone"] is True
    assert not queue.suspect_waiting(rows)
    others = claim(conn, owner="busy", alone=False)
    assert len(others) == 2 and not any(r["alone"] for r in others)
    row = conn.execute("SELECT expired_leases FROM stage_tasks WHERE id = %s", (task["id"],)).fetchone()
    assert row["expired_leases"] == 2


def attempt_log(conn, task_id: int) -> list[dict]:
    return conn.execute("SELECT outbox_attempts(t) AS a FROM stage_tasks t WHERE id = %s", (task_id,)).fetchone()["a"]


def test_every_attempt_is_kept_with_its_worker_outcome_and_error(conn):
    insert_job(conn, variants=1)
    [first] = claim(conn, owner="w-a", lease=0.01)
    time.sleep(0.05)
    assert [r["outcome"] for r in conn.execute(queue.RESCUE_EXPIRED, (100,)).fetchall()] == ["requeued"]
    [second] = claim(conn, owner="w-b")
    assert fail(conn, second, owner="w-b", error="CUDA out of memory", retry_in=0) == "retry"
    [third] = claim(conn, owner="w-c")
    assert complete(conn, third, owner="w-c") is True
    log = attempt_log(conn, first["id"])
    assert [(e["attempt"], e["worker"], e["outcome"]) for e in log] == [
        (1, "w-a", "lease expired"), (2, "w-b", "retry"), (3, "w-c", "done")]
    assert "w-a stopped" in log[0]["error"] and log[1]["error"] == "CUDA out of memory" and log[2]["error"] is None
    assert all(e["started_at"] and e["ended_at"] and e["started_at"] <= e["ended_at"] for e in log)


def test_a_refused_completion_or_a_cancel_ends_the_attempt_as_cancelled(conn):
    job, _ = insert_job(conn, variants=2)
    running = claim(conn, owner="w1", limit=2)
    assert complete(conn, running[0]) is True  # the second one is still running at the cancel
    conn.execute("SELECT * FROM outbox_cancel(%s)", (job,))
    assert complete(conn, running[1]) is False
    assert [e["outcome"] for e in attempt_log(conn, running[1]["id"])] == ["cancelled"]
    assert [e["outcome"] for e in attempt_log(conn, running[0]["id"])] == ["done"]


def test_the_claim_says_how_long_each_task_waited(conn):
    insert_job(conn, variants=2)
    conn.execute("UPDATE stage_tasks SET run_after = now() - interval '7 s' WHERE status = 'queued'")
    rows = claim(conn, limit=2)
    assert len(rows) == 2 and all(7 <= r["waited_s"] < 60 for r in rows), rows
    # The previous release's claim keeps its columns (rolling updates: tests/test_rolling_upgrade.py).
    insert_job(conn, variants=1)
    [old] = conn.execute("SELECT * FROM outbox_claim('w2', ARRAY['vlm_analyze'], 1, 30) WHERE id IS NOT NULL").fetchall()
    assert "waited_s" not in old and old["stage"] == "vlm_analyze"


def test_failing_a_job_ends_its_unfinished_tasks_and_starts_no_job_stage(conn):
    from outbox import jobs

    job, _ = insert_job(conn, variants=3)
    [running] = claim(conn, limit=1)
    assert jobs.fail_job(conn, job, "workers gone") == 3
    tasks = conn.execute("SELECT status, last_error, attempt_log FROM stage_tasks WHERE job_id = %s", (job,)).fetchall()
    assert {t["status"] for t in tasks} == {"failed"} and {t["last_error"] for t in tasks} == {"workers gone"}
    assert sorted(len(t["attempt_log"]) for t in tasks) == [0, 0, 1]  # only the running one had an attempt
    state = conn.execute("SELECT outbox_job_state(status, current_step) AS s FROM jobs WHERE job_id = %s", (job,)).fetchone()
    assert state["s"] == "failed"
    assert conn.execute("SELECT count(*) AS n FROM jobs_variants WHERE job_id = %s AND status <> 'failed'",
                        (job,)).fetchone()["n"] == 0
    assert complete(conn, running) is False  # the late worker's result is refused
    assert jobs.fail_job(conn, job, "again") == 0  # a finished job is left as it is
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL",
                        (job,)).fetchone()["n"] == 0
