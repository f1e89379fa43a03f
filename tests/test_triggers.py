"""The triggers: enqueue on (step, done), the old channels' payloads, fan-in, unique enqueue."""
from __future__ import annotations

import json
import threading

import psycopg

from outbox import db
from tests.helpers import claim, complete, fail, insert_job, run_variant_stages

VARIANT_STAGES = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval", "iou_eval"]


def tasks_of(conn, job_id):
    return conn.execute("SELECT stage, status, job_variants_id::text AS vid FROM stage_tasks WHERE job_id = %s ORDER BY id",
                        (job_id,)).fetchall()


def test_outside_writer_with_plain_sql_starts_the_variant(conn):
    job_id, vids = insert_job(conn, variants=1, step="user_img_input", status="running")
    assert tasks_of(conn, job_id) == []
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'img_gen' WHERE job_variants_id = %s", (vids[0],))
    assert tasks_of(conn, job_id) == [{"stage": "vlm_analyze", "status": "queued", "vid": vids[0]}]
    job = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert job == {"status": "running", "current_step": "vlm_analyze"}


def test_insert_at_img_gen_done_enqueues_and_unknown_steps_are_ignored(conn):
    job_id, vids = insert_job(conn, variants=2)
    assert [t["stage"] for t in tasks_of(conn, job_id)] == ["vlm_analyze", "vlm_analyze"]
    # Steps the engine does not own neither enqueue nor get rewritten.
    conn.execute("UPDATE jobs SET current_step = 'ab_vote', status = 'done' WHERE job_id = %s", (job_id,))
    assert len(tasks_of(conn, job_id)) == 2
    assert conn.execute("SELECT current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()["current_step"] == "ab_vote"


def test_duplicate_updates_enqueue_once(conn):
    job_id, vids = insert_job(conn, variants=1, step="img_gen", status="running")
    for _ in range(5):
        conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vids[0],))
        conn.execute("UPDATE jobs_variants SET status = 'running' WHERE job_variants_id = %s", (vids[0],))
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vids[0],))
    assert len(tasks_of(conn, job_id)) == 1


def test_payloads_keep_the_old_fields_and_same_value_updates_are_silent(conn, db_url):
    listener = db.connect(db_url)
    listener.execute("LISTEN job_variant_state_changed")
    listener.execute("LISTEN job_state_changed")
    job_id, vids = insert_job(conn, tenant="tenant-7", variants=1)
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vids[0],))  # same value
    notes = list(listener.notifies(timeout=0.5))
    variant_notes = [json.loads(n.payload) for n in notes if n.channel == "job_variant_state_changed"]
    job_notes = [json.loads(n.payload) for n in notes if n.channel == "job_state_changed"]
    assert len(variant_notes) == 1
    assert set(variant_notes[0]) == {"job_variants_id", "job_id", "current_step", "status", "img_asset_id",
                                     "tenant_id", "updated_at"}
    assert variant_notes[0]["tenant_id"] == "tenant-7" and variant_notes[0]["current_step"] == "img_gen"
    assert set(job_notes[-1]) == {"job_id", "current_step", "status", "tenant_id", "updated_at"}
    assert job_notes[-1]["current_step"] == "vlm_analyze" and job_notes[-1]["status"] == "running"
    listener.close()


def test_claim_then_complete_shows_running_then_done_and_enqueues_next(conn, db_url):
    listener = db.connect(db_url)
    listener.execute("LISTEN job_variant_state_changed")
    job_id, vids = insert_job(conn, variants=1)
    list(listener.notifies(timeout=0.2))
    [task] = claim(conn)
    assert complete(conn, task)
    seen = [(p["current_step"], p["status"]) for p in
            (json.loads(n.payload) for n in listener.notifies(timeout=0.5))]
    assert seen == [("vlm_analyze", "running"), ("vlm_analyze", "done")]
    assert [t["stage"] for t in tasks_of(conn, job_id)] == ["vlm_analyze", "yolo_detect"]
    listener.close()


def test_updated_at_is_kept_by_the_database(conn):
    job_id, vids = insert_job(conn, variants=1)
    before = conn.execute("SELECT updated_at FROM jobs_variants WHERE job_variants_id = %s", (vids[0],)).fetchone()
    conn.execute("UPDATE jobs_variants SET status = 'running' WHERE job_variants_id = %s", (vids[0],))
    after = conn.execute("SELECT updated_at FROM jobs_variants WHERE job_variants_id = %s", (vids[0],)).fetchone()
    assert after["updated_at"] > before["updated_at"]


def test_full_chain_fans_in_once_and_finishes_the_job(conn):
    job_id, vids = insert_job(conn, variants=3)
    run_variant_stages(conn)
    job = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert job == {"status": "done", "current_step": "instagram_feed_gen"}
    stages = [t["stage"] for t in tasks_of(conn, job_id)]
    assert stages.count("ad_copy_gen_kor") == 1 and stages.count("instagram_feed_gen") == 1
    assert len(stages) == 3 * 8 + 2


def test_failed_variant_does_not_block_the_job_and_all_failed_fails_it(conn):
    job_id, vids = insert_job(conn, variants=2)
    [task] = claim(conn, limit=1)
    assert fail(conn, task, permanent=True) == "failed"
    run_variant_stages(conn)
    job = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    assert job == {"status": "done", "current_step": "instagram_feed_gen"}

    job2, _ = insert_job(conn, variants=2)
    for task in claim(conn):
        assert fail(conn, task, permanent=True) == "failed"
    job = conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job2,)).fetchone()
    assert job["status"] == "failed"
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL",
                        (job2,)).fetchone()["n"] == 0


def test_variants_done_at_img_gen_do_not_look_finished(conn):
    job_id, _ = insert_job(conn, variants=3)  # all (img_gen, done): the old count thought "finished"
    assert conn.execute("SELECT current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()["current_step"] == "vlm_analyze"
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE stage = 'ad_copy_gen_kor'").fetchone()["n"] == 0


def test_fan_in_race_exactly_one_job_stage_each_time(conn, db_url):
    """All variants finish at the same moment in separate connections, many times."""
    repetitions, width = 40, 4
    conns = [db.connect(db_url, autocommit=False) for _ in range(width)]
    try:
        for _ in range(repetitions):
            job_id, vids = insert_job(conn, variants=width, step="readability_eval", status="done")
            barrier = threading.Barrier(width)
            errors = []

            # As the engine writes them: the iou_eval task's state, then the variant's.
            def finish(c, vid):
                try:
                    c.execute("UPDATE stage_tasks SET status = 'running' WHERE job_variants_id = %s", (vid,))
                    c.execute("UPDATE jobs_variants SET current_step = 'iou_eval', status = 'running' WHERE job_variants_id = %s", (vid,))
                    c.commit()
                    barrier.wait()
                    c.execute("UPDATE stage_tasks SET status = 'done' WHERE job_variants_id = %s", (vid,))
                    c.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vid,))
                    c.commit()
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(exc)
                    c.rollback()

            threads = [threading.Thread(target=finish, args=(c, v)) for c, v in zip(conns, vids)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            n = conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND stage = 'ad_copy_gen_kor'",
                             (job_id,)).fetchone()["n"]
            assert n == 1
            job = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
            assert job == {"status": "done", "current_step": "iou_eval"}
    finally:
        for c in conns:
            c.close()


def test_a_task_claimed_in_the_transaction_that_enqueued_it_wakes_nobody(conn, db_url):
    """Migration 0005: the wake-up goes out at commit, for a task still queued then. A completion
    that claims the next stage it enqueued (the worker's completer does) sends none; a completion
    that leaves it queued sends one, and so does an outside writer's enqueue."""
    listener = db.connect(db_url)
    listener.execute("LISTEN outbox_stage_tasks")
    job_id, _ = insert_job(conn, variants=1)
    assert [n.payload for n in listener.notifies(timeout=0.5)] == ["vlm_analyze"]  # the outside writer's
    [task] = claim(conn, stages=["vlm_analyze"])
    with conn.transaction():
        assert complete(conn, task)
        [nxt] = claim(conn, stages=["yolo_detect"])
    assert nxt["stage"] == "yolo_detect"
    assert list(listener.notifies(timeout=0.5)) == []  # claimed before the commit: nobody to wake
    assert complete(conn, nxt)
    assert [n.payload for n in listener.notifies(timeout=0.5)] == ["planner"]  # left queued: a wake-up
    assert [t["status"] for t in tasks_of(conn, job_id)] == ["done", "done", "queued"]
    listener.close()
