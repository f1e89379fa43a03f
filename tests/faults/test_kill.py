"""Scenarios 1 and 7: workers SIGKILLed while stages run, repeatedly; fan-in with the variants of
one job finishing on different workers while one of them is killed."""
from __future__ import annotations

import random
import time
from collections import Counter

from tests.faults.harness import (LEASE_S, SCALE, Fleet, check_invariants, held_by, jobs, log_problems, report,
                                  rescue_delays, submit_jobs, takeover_seconds, wait_for_jobs, wait_until)


def kill_one(conn, fleet: Fleet, victim) -> tuple[dict, float]:
    """SIGKILL, then what the dead worker still held (its leases are still in the table)."""
    worker_id = victim.worker_id
    at = time.time()
    victim.kill()
    return held_by(conn, worker_id), at


def test_sigkill_random_workers_repeatedly(conn, db_url, home, tiny_png, tmp_path):
    """Four workers; every 0.6 s new jobs arrive and a random worker is SIGKILLed mid-stage and
    started again. Survivors take the dead worker's tasks over once its lease runs out."""
    rng = random.Random(1)
    fleet = Fleet(db_url, tmp_path, 4, env={"FAULTS_STAGE_SLEEP": "0.02,0.1"})
    job_ids: list[str] = []
    kills: list[tuple[dict, float]] = []
    try:
        fleet.wait_ready()
        waves = 6 * SCALE
        for wave in range(waves):
            job_ids += submit_jobs(conn, tiny_png, jobs(30) // waves)
            time.sleep(rng.uniform(0.1, 0.6))
            ids = {w.worker_id: w for w in fleet if w.alive}
            running = [r["lease_owner"] for r in conn.execute(
                "SELECT lease_owner FROM stage_tasks WHERE status = 'running' AND lease_owner = ANY (%s)", (list(ids),))]
            victim = ids[rng.choice(running)] if running else rng.choice(list(ids.values()))
            kills.append(kill_one(conn, fleet, victim))
            victim.start()
        states = wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0] * len(codes), fleet.logs()[-5000:]
    hits = Counter(task_id for held, _ in kills for task_id in held)
    # A task fails only if it was on a killed worker at each of its attempts (max_attempts = 3);
    # its job is then failed, or done without that variant.
    failed_tasks = conn.execute("SELECT id, job_id::text, max_attempts FROM stage_tasks WHERE status = 'failed' "
                                "AND job_id = ANY (%s::uuid[])", (job_ids,)).fetchall()
    for task in failed_tasks:
        assert hits[task["id"]] >= task["max_attempts"], f"failed without being killed 3 times: {task}"
    failed = {j for j, s in states.items() if s == "failed"}
    summary = check_invariants(conn, fleet.record_dir, job_ids, expect_failed=failed,
                               degraded={t["job_id"] for t in failed_tasks})
    held_total = sum(len(held) for held, _ in kills)
    assert held_total > 0, "no kill landed while a stage ran"
    # Re-runs only where a kill hit: every task that ran twice was held by a killed worker.
    for key, task in summary.by_task.items():
        if task["starts"] > 1 or task["attempts"] > 1:
            assert hits[task["id"]] >= task["attempts"] - 1, f"re-run without a fault: {task}"
    # Back in the queue about one lease after the kill (the survivors wake for it), and running
    # again soon after: later when the survivors' slots are full or work is queued ahead of it
    # (soak mode), or when a twice-hit task waits to run alone.
    rescues = rescue_delays(conn, kills)
    takeovers = [s for s in (takeover_seconds(fleet.record_dir, held, at) for held, at in kills) if s is not None]
    assert rescues and max(rescues) < LEASE_S + 2.0, rescues
    assert takeovers and (SCALE > 1 or max(takeovers) < LEASE_S + 5.0), takeovers
    assert not log_problems(fleet.logs()), log_problems(fleet.logs())
    ordered = sorted(takeovers)
    report("1 SIGKILL random workers", kills=len(kills), tasks_on_killed_workers=held_total,
           requeued_max_s=max(rescues), takeover_max_s=max(takeovers), takeover_mean_s=sum(takeovers) / len(takeovers),
           takeover_p50_s=ordered[len(ordered) // 2], takeover_p90_s=ordered[int(len(ordered) * 0.9)],
           lease_s=LEASE_S, failed_tasks=len(failed_tasks), summary=str(summary))


def test_fan_in_while_a_worker_is_killed(conn, db_url, home, tiny_png, tmp_path):
    """The last variant stage is slow, so the variants of a job sit in it together on different
    workers; the worker holding most of them is killed (twice). The job stages still run once
    per job, after its last variant, and the fan-in fires exactly once."""
    job_ids = submit_jobs(conn, tiny_png, jobs(30), copy="Sale SLEEP:iou_eval:0.6")
    fleet = Fleet(db_url, tmp_path, 4)
    kills = []
    try:
        fleet.wait_ready()
        for _ in range(2 * SCALE):
            wait_until(lambda: conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE stage = 'iou_eval' "
                                            "AND status = 'running'").fetchone()["n"] >= 6, 60, what="iou_eval running")
            victim = max((w for w in fleet if w.alive), key=lambda w: sum(
                1 for t in held_by(conn, w.worker_id).values() if t["stage"] == "iou_eval"))
            kills.append(kill_one(conn, fleet, victim))
            victim.start()
        wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0] * len(codes)
    summary = check_invariants(conn, fleet.record_dir, job_ids)
    assert sum(1 for held, _ in kills for t in held.values() if t["stage"] == "iou_eval") > 0
    # Variants of one job finished on different workers (the result names the executing pid).
    spread = conn.execute("""
        SELECT count(*) AS n FROM (
            SELECT job_id FROM stage_results WHERE stage = 'iou_eval'
            GROUP BY job_id HAVING count(DISTINCT result->>'pid') > 1) s""").fetchone()["n"]
    assert spread > 0
    # The fan-in fired once per job: one ad_copy_gen_kor task, executed at attempt 1 only
    # (no kill hit a job stage here), after every variant had finished (check_invariants).
    job_stage = [t for (_, stage), t in summary.by_task.items() if stage == "ad_copy_gen_kor"]
    assert len(job_stage) == len(job_ids)
    hit = {task_id for held, _ in kills for task_id in held}
    assert all(t["starts"] == 1 for t in job_stage if t["id"] not in hit)
    takeovers = [s for s in (takeover_seconds(fleet.record_dir, held, at) for held, at in kills) if s is not None]
    rescues = rescue_delays(conn, kills)
    report("7 fan-in under kill", kills=len(kills), jobs_with_variants_on_several_workers=spread,
           requeued_max_s=max(rescues), takeover_max_s=max(takeovers), summary=str(summary))
