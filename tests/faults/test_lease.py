"""Scenario 6: a lease runs out while its worker is still alive (frozen with SIGSTOP, as in a
long GC pause or a suspended VM): another worker's attempt wins, once; the first worker's
completion is refused when it wakes up."""
from __future__ import annotations

import signal
import time

from tests.faults.harness import (LEASE_S, Fleet, check_invariants, held_by, jobs, read_executions, report,
                                  rescued_seconds, submit_jobs, subject, wait_for_jobs, wait_taken_over, wait_until)


def test_lease_expiry_while_the_first_worker_still_runs(conn, db_url, home, tiny_png, tmp_path):
    job_ids = submit_jobs(conn, tiny_png, jobs(24))
    job_ids += submit_jobs(conn, tiny_png, jobs(6), copy="Slow SLEEP:overlay:1.5")
    fleet = Fleet(db_url, tmp_path, 3)
    rounds = []
    try:
        fleet.wait_ready()
        for _ in range(2):
            def frozen_candidate():
                owners = {w.worker_id: w for w in fleet}
                held = {wid: held_by(conn, wid) for wid in owners}
                best = max(held, key=lambda wid: (any(t["stage"] == "overlay" for t in held[wid].values()),
                                                  len(held[wid])))
                return (owners[best], held[best]) if held[best] else None
            victim, _ = wait_until(frozen_candidate, 60, what="a worker holding tasks")
            victim.signal(signal.SIGSTOP)
            at = time.time()
            time.sleep(0.3)  # a statement it sent just before freezing (a completion) lands first
            held = held_by(conn, victim.worker_id)  # frozen: what it holds stays as it is
            taken = wait_taken_over(conn, held, timeout=120)
            time.sleep(0.5)
            victim.signal(signal.SIGCONT)
            rounds.append((victim, held, at, taken, rescued_seconds(conn, held, at)))
        wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0, 0, 0]
    summary = check_invariants(conn, fleet.record_dir, job_ids)
    ends = {(subject(e), e["attempt"]): e["pid"] for e in read_executions(fleet.record_dir) if e["ev"] == "end"}
    rejected = 0
    for victim, held, *_ in rounds:
        for task in held.values():
            row = summary.by_task[(task["subject"], task["stage"])]
            # The second attempt's result won; the frozen worker's never committed.
            assert row["status"] == "done" and row["result_attempt"] > task["attempt"], row
            if ends.get(((task["subject"], task["stage"]), task["attempt"])):
                rejected += 1  # the frozen worker finished its stage after waking: refused
        log = victim.output()
        assert "but its lease was lost" in log or "lease lost for task" in log
    assert rejected >= 1
    rescued = [r[4] for r in rounds if r[4] is not None]
    # One lease, plus until a survivor next claims: its slots are full of 1.5 s stages here.
    assert rescued and max(rescued) < LEASE_S + 3.0, rescued
    report("6 lease expiry while the first worker runs (SIGSTOP)", rounds=len(rounds),
           tasks_taken_over=sum(len(r[1]) for r in rounds), completions_refused=rejected,
           requeued_max_s=max(rescued), takeover_max_s=max(r[3] for r in rounds), lease_s=LEASE_S,
           summary=str(summary))
