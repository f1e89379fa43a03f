"""Whole jobs through real worker processes with the test stages."""
from __future__ import annotations

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests.workerproc import WorkerProcess, wait_for_jobs


def submit(conn, image, copy="Fresh coffee, 20% off", variants=3):
    return submit_job(conn, open_store(), [image], copy, tenant="acme", variants=variants)


def test_whole_job_through_several_worker_processes(conn, db_url, home, tiny_png, tmp_path):
    jobs = [submit(conn, tiny_png).job_id for _ in range(5)]
    workers = [WorkerProcess(db_url, tmp_path / f"w{i}.log", "--concurrency", "4") for i in range(3)]
    try:
        states = wait_for_jobs(db_url, jobs, timeout=120)
    finally:
        codes = [w.stop() for w in workers]
    assert set(states.values()) == {"done"}
    assert codes == [0, 0, 0]
    rows = conn.execute("SELECT stage, count(*) AS n FROM stage_results GROUP BY stage").fetchall()
    counts = {r["stage"]: r["n"] for r in rows}
    assert counts == {**{s: 15 for s in ("vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge",
                                          "ocr_eval", "readability_eval", "iou_eval")},
                      "ad_copy_gen_kor": 5, "instagram_feed_gen": 5}
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE status <> 'done'").fetchone()["n"] == 0
    # Each stage saw the results of every earlier stage of its variant.
    seen = conn.execute("SELECT result->'seen' AS seen FROM stage_results WHERE stage = 'iou_eval' LIMIT 1").fetchone()
    assert seen["seen"] == sorted(["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval",
                                   "readability_eval"])
