"""Across machines and months: shared artifact stores, cancel, retention."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import psycopg
import pytest

from outbox.artifacts import FileStore, PostgresStore, open_store
from outbox.jobs import Cancelled, InvalidInput, NotFound, cancel_job, submit_job
from outbox.retention import prune
from tests.helpers import claim, complete, insert_job, wait_until
from tests.workerproc import WorkerProcess, wait_for_jobs, wait_for_task


def test_private_file_stores_fail_clearly_and_postgres_store_completes(conn, db_url, home, tiny_png, tmp_path,
                                                                      monkeypatch):
    # Each worker on its own "node": its own, unshared file directory.
    monkeypatch.setenv("ARTIFACT_DIR", str(tmp_path / "submitter"))
    job = submit_job(conn, open_store(), [tiny_png], "Copy ARTIFACTS", tenant="acme", variants=2).job_id
    workers = [WorkerProcess(db_url, tmp_path / f"f{i}.log", "--retry-base", "0.05",
                             env={"ARTIFACT_DIR": str(tmp_path / f"node{i}")}) for i in range(2)]
    try:
        assert wait_for_jobs(db_url, [job]) == {job: "failed"}
    finally:
        for w in workers:
            w.stop()
    errors = {r["last_error"] for r in conn.execute(
        "SELECT last_error FROM stage_tasks WHERE job_id = %s AND status = 'failed'", (job,))}
    assert errors and all("artifact not found: acme/" in e for e in errors)

    monkeypatch.setenv("ARTIFACT_STORE", "postgres")
    store = open_store(db_url)
    job = submit_job(conn, store, [tiny_png], "Copy ARTIFACTS", tenant="acme", variants=2).job_id
    # Split the graph as GPU and CPU pools would: each stage's artifact is read on the other node.
    split = ["vlm_analyze,yolo_detect,planner,overlay",
             "vlm_judge,ocr_eval,readability_eval,iou_eval,ad_copy_gen_kor,instagram_feed_gen"]
    workers = [WorkerProcess(db_url, tmp_path / f"p{i}.log", "--stages", split[i],
                             env={"ARTIFACT_STORE": "postgres", "ARTIFACT_DIR": str(tmp_path / f"node{i}")})
               for i in range(2)]
    try:
        assert wait_for_jobs(db_url, [job]) == {job: "done"}
    finally:
        for w in workers:
            w.stop()
    pids = {r["pid"] for r in conn.execute("SELECT (result->>'pid')::int AS pid FROM stage_results WHERE job_id = %s", (job,))}
    assert len(pids) == 2  # both workers ran stages of the job
    final = conn.execute("SELECT (result->>'read_bytes')::int AS n FROM stage_results "
                         "WHERE job_id = %s AND stage = 'instagram_feed_gen'", (job,)).fetchone()
    assert final["n"] > 0
    # every artifact a result names exists, written in the completion transaction
    keys = [r["k"] for r in conn.execute(
        "SELECT a.value AS k FROM stage_results r, jsonb_each_text(r.result->'artifacts') a WHERE r.job_id = %s", (job,))]
    assert len(keys) == 2 * 8 + 2
    assert conn.execute("SELECT count(*) AS n FROM artifacts WHERE key = ANY (%s)", (keys,)).fetchone()["n"] == len(keys)
    store.close()


def test_cancel_queued_job(conn):
    job_id, vids = insert_job(conn, variants=3)
    [task] = claim(conn, limit=1)
    assert cancel_job(conn, job_id).tasks == 3  # two queued + one running
    rows = conn.execute("SELECT status, count(*) AS n FROM stage_tasks WHERE job_id = %s GROUP BY status", (job_id,)).fetchall()
    assert rows == [{"status": "cancelled", "n": 3}]
    assert not complete(conn, task)  # the running stage's completion is refused
    statuses = {r["status"] for r in conn.execute("SELECT status FROM jobs_variants WHERE job_id = %s", (job_id,))}
    assert statuses == {"cancelled"}
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job_id,)).fetchone()["status"] == "cancelled"
    # nothing new is enqueued for it, even by an outside writer: a variant that started cannot be
    # re-signalled at all, and one that never started can, but starts nothing
    started = conn.execute("SELECT job_variants_id::text AS v FROM jobs_variants WHERE job_id = %s "
                           "AND current_step = 'vlm_analyze'", (job_id,)).fetchone()["v"]
    with pytest.raises(psycopg.errors.CheckViolation, match=f"variant {started}.*already started"):
        conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'img_gen' WHERE job_id = %s", (job_id,))
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'img_gen' WHERE job_id = %s "
                 "AND job_variants_id <> %s", (job_id, started))
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s", (job_id,)).fetchone()["n"] == 3
    from outbox import queue

    assert queue.replay_failed(conn, job_id=job_id) == []


def test_cancel_errors(conn):
    with pytest.raises(NotFound):
        cancel_job(conn, "00000000-0000-0000-0000-000000000000")
    with pytest.raises(InvalidInput, match="not a UUID"):
        cancel_job(conn, "nope")
    job_id, _ = insert_job(conn, variants=1)
    from tests.helpers import run_variant_stages

    run_variant_stages(conn)
    with pytest.raises(InvalidInput, match="already finished"):
        cancel_job(conn, job_id)
    job2, _ = insert_job(conn, variants=1)
    assert cancel_job(conn, job2) == Cancelled(already=False, tasks=1)
    assert cancel_job(conn, job2) == Cancelled(already=True, tasks=0)  # a no-op that says so


def test_cancel_while_workers_run_commits_no_result_after(conn, db_url, home, tiny_png, tmp_path):
    jobs = [submit_job(conn, open_store(), [tiny_png], "Slow SLEEP:yolo_detect:0.3 SLEEP:planner:0.3",
                       tenant="acme", variants=3).job_id for _ in range(4)]
    workers = [WorkerProcess(db_url, tmp_path / f"w{i}.log", "--concurrency", "4") for i in range(2)]
    try:
        # Both workers have started a yolo_detect (lease_owner stays on a finished task).
        wait_until(lambda: conn.execute(
            "SELECT count(DISTINCT lease_owner) AS n FROM stage_tasks WHERE stage = 'yolo_detect' "
            "AND status IN ('running', 'done') AND job_id = ANY (%s::uuid[])", (jobs,)).fetchone()["n"] == 2,
            timeout=60, what="both workers running yolo_detect")
        for job in jobs:
            cancel_job(conn, job)
        cancelled_at = conn.execute("SELECT clock_timestamp() AS t").fetchone()["t"]
        time.sleep(1.5)
    finally:
        for w in workers:
            w.stop()
    late = conn.execute("SELECT count(*) AS n FROM stage_results WHERE job_id = ANY (%s::uuid[]) AND created_at > %s",
                        (jobs, cancelled_at)).fetchone()["n"]
    assert late == 0
    left = conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = ANY (%s::uuid[]) "
                        "AND status IN ('queued', 'running')", (jobs,)).fetchone()["n"]
    assert left == 0


def test_cancel_racing_the_fan_in(conn, db_url):
    """Exactly one of: the job stage is never enqueued (cancel first), or the cancel finds the
    job-level task and cancels it before it can start (fan-in first). Never both, never a job
    stage that runs."""
    from outbox import db

    for _ in range(20):
        job_id, vids = insert_job(conn, variants=2, step="readability_eval", status="done")
        # Written as the engine writes them: the task's state, then the variant's, in one transaction.
        conn.execute("UPDATE stage_tasks SET status = 'running' WHERE job_id = %s", (job_id,))
        conn.execute("UPDATE jobs_variants SET current_step = 'iou_eval', status = 'running' WHERE job_id = %s", (job_id,))
        with conn.transaction():
            conn.execute("UPDATE stage_tasks SET status = 'done' WHERE job_variants_id = %s", (vids[0],))
            conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vids[0],))
        other = db.connect(db_url)
        barrier = threading.Barrier(2)
        outcome = {}

        def finish():
            barrier.wait()
            with other.transaction():
                other.execute("UPDATE stage_tasks SET status = 'done' WHERE job_variants_id = %s", (vids[1],))
                other.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vids[1],))

        def cancel():
            barrier.wait()
            try:
                cancel_job(db.connect(db_url), job_id)
                outcome["cancel"] = "ok"
            except InvalidInput as exc:
                outcome["cancel"] = str(exc)

        threads = [threading.Thread(target=finish), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        other.close()
        assert outcome["cancel"] == "ok"
        job_tasks = conn.execute("SELECT status FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL",
                                 (job_id,)).fetchall()
        assert job_tasks in ([], [{"status": "cancelled"}])
        assert claim(conn, stages=["ad_copy_gen_kor"]) == []


def test_prune_removes_old_finished_jobs_and_orphans_only(conn, db_url, home, tiny_png, tmp_path, monkeypatch):
    monkeypatch.setenv("ARTIFACT_DIR", str(tmp_path / "art"))
    store = open_store()
    old = [submit_job(conn, store, [tiny_png], "Copy ARTIFACTS", tenant="acme", variants=2).job_id for _ in range(3)]
    workers = [WorkerProcess(db_url, tmp_path / "w.log", "--grace", "0.5", env={"ARTIFACT_DIR": str(tmp_path / "art")})]
    try:
        wait_for_jobs(db_url, old)
        live = submit_job(conn, store, [tiny_png], "Live SLEEP:vlm_analyze:30", tenant="acme", variants=1).job_id
        wait_for_task(db_url, "vlm_analyze", timeout=30)
        # Age the old jobs (the database keeps updated_at itself, so bypass its trigger here).
        conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE jobs SET updated_at = now() - interval '40 days' WHERE job_id = ANY (%s::uuid[])", (old,))
        conn.execute("RESET session_replication_role")
        store.put("acme/00000000-0000-0000-0000-000000000009/job/ad_copy_gen_kor/a1/orphan.bin", b"orphan")
        dry = prune(conn, store, timedelta(days=30), batch=2, dry_run=True, orphan_grace=timedelta(0))
        assert (dry.jobs, dry.orphans) == (3, 1)
        assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 4
        report = prune(conn, store, timedelta(days=30), batch=2, orphan_grace=timedelta(0))
    finally:
        for w in workers:
            w.stop()
    assert report.jobs == 3 and report.batches == 2 and report.orphans == 1
    assert report.artifacts == 3 * (2 * 8 + 2) + 3  # every result artifact plus each job's image
    assert conn.execute("SELECT count(*) AS n FROM jobs").fetchone()["n"] == 1
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id <> %s", (live,)).fetchone()["n"] == 0
    remaining = sorted(store.keys())
    assert remaining and all(k.startswith(f"acme/{live}") or "/assets/" in k for k in remaining)
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (live,)).fetchone()["status"] == "running"
