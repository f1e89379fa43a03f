"""Small SQL helpers shared by the engine tests."""
from __future__ import annotations

import time
import uuid


def insert_job(conn, tenant="acme", copy="Buy one, get one free", variants=3, step="img_gen", status="done") -> tuple[str, list[str]]:
    """A job as an outside writer would create it, with plain SQL, one statement at a time: the job
    says how many variants it will have, which closes its variant set once they are written."""
    job_id = str(uuid.uuid4())
    conn.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step, expected_variants) "
                 "VALUES (%s, %s, 'running', 'img_gen', %s)", (job_id, tenant, variants or None))
    conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, %s)", (job_id, copy))
    vids = [str(uuid.uuid4()) for _ in range(variants)]
    for i, vid in enumerate(vids):
        conn.execute("INSERT INTO jobs_variants (job_variants_id, job_id, creation_order, status, current_step) "
                     "VALUES (%s, %s, %s, %s, %s)", (vid, job_id, i + 1, status, step))
    return job_id, vids


def claim(conn, owner="w1", stages=None, limit=10, lease=30.0, task_id=None, alone=True, rows_out=None):
    """alone: the claimer has nothing in flight (it may take a task that must run alone)."""
    stages = stages or ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval",
                        "readability_eval", "iou_eval", "ad_copy_gen_kor", "instagram_feed_gen"]
    from outbox.queue import CLAIM

    rows = conn.execute(CLAIM,
                        (owner, stages, limit, lease, task_id, alone)).fetchall()
    if rows_out is not None:
        rows_out.extend(rows)
    return [r for r in rows if r["id"] is not None]


def complete(conn, task, owner="w1", result=None) -> bool:
    from psycopg.types.json import Jsonb

    return conn.execute("SELECT outbox_complete(%s, %s, %s, %s) AS ok",
                        (task["id"], owner, task["attempt"], Jsonb(result or {"ok": True}))).fetchone()["ok"]


def fail(conn, task, owner="w1", error="boom", permanent=False, retry_in=0.0) -> str:
    return conn.execute("SELECT outbox_fail(%s, %s, %s, %s, NULL, %s, %s) AS o",
                        (task["id"], owner, task["attempt"], error, permanent, retry_in)).fetchone()["o"]


def run_variant_stages(conn, owner="w1"):
    """Claims and completes everything claimable until nothing is left."""
    done = 0
    while True:
        tasks = claim(conn, owner, limit=100)
        if not tasks:
            return done
        for task in tasks:
            assert complete(conn, task, owner)
            done += 1


def wait_until(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition",
               detail=lambda: ""):
    """Polls predicate until it returns something truthy (returned), or fails the test, with
    detail() (a log, say) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s\n{detail()}")
        time.sleep(interval)
