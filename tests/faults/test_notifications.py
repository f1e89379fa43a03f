"""Scenario 9: duplicate and spurious notifications (NOTIFY sent by hand, many times) cause no
extra work: every task still runs exactly once."""
from __future__ import annotations

import threading
import time

import psycopg

from tests.faults.harness import Fleet, check_invariants, jobs, log_problems, report, submit_jobs, wait_for_jobs

PAYLOADS = ["vlm_analyze", "planner", "iou_eval", "instagram_feed_gen", "", "no_such_stage", "x" * 7000,
            "'; DROP TABLE stage_tasks; --", '{"id": 1}', "vlm_analyze\x01"]


def spam(db_url: str, stop: threading.Event, sent: list[int]) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        while not stop.is_set():
            with c.transaction():
                for i, payload in enumerate(PAYLOADS):
                    c.execute("SELECT pg_notify('outbox_stage_tasks', %s)", (payload,))
                    c.execute("SELECT pg_notify('job_variant_state_changed', %s)", (payload,))
            for payload in PAYLOADS[:4]:
                c.execute("SELECT pg_notify('outbox_stage_tasks', %s)", (payload,))  # one transaction each
            sent[0] += 2 * len(PAYLOADS) + 4
            time.sleep(0.002)


def test_duplicate_and_spurious_notifications_cause_no_extra_work(conn, db_url, home, tiny_png, tmp_path):
    fleet = Fleet(db_url, tmp_path, 3)
    stop, sent = threading.Event(), [0]
    spammer = threading.Thread(target=spam, args=(db_url, stop, sent), daemon=True)
    try:
        fleet.wait_ready()
        spammer.start()
        job_ids = submit_jobs(conn, tiny_png, jobs(30))
        wait_for_jobs(db_url, job_ids, timeout=120)
        during = sent[0]
        time.sleep(1.0)  # and while idle
    finally:
        stop.set()
        spammer.join(10)
        codes = fleet.stop()
    assert codes == [0, 0, 0]
    summary = check_invariants(conn, fleet.record_dir, job_ids, exactly_once=True)
    logs = fleet.logs()
    assert logs.count("[TRIGGER]") == summary.tasks
    assert not log_problems(logs), log_problems(logs)
    report("9 spurious notifications", notifications_sent=sent[0], during_run=during, summary=str(summary))
