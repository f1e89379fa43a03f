"""The engine's promises, as a worker and an outside writer see them (docs/semantics.md), checked
on every backend (engine.BACKENDS). A change to the SQL functions, the connection path or the
claim API lands only when all of these hold for it.

1. Every stage of every variant, then every job stage, runs exactly once, in graph order.
2. No task is held by two workers at once, however many claim together.
3. A result is committed once, and only by the attempt holding the lease (the fence).
4. A stage is enqueued and announced in the transaction that finished the one before it:
   nothing is announced for a rolled-back transaction.
5. The job stages start once, when the last variant finishes, even when two finish together.
6. A retryable failure comes back later; the last attempt's failure is final, and a job whose
   variants all failed ends failed.
7. A dead worker's task comes back in its place; on its last attempt it fails instead.
8. A cancelled job has nothing claimable and refuses late results.
9. Every ended attempt is on record once, with its worker and outcome.
"""
from __future__ import annotations

import threading
import time

import psycopg

STAGES_PER_VARIANT = 8
JOB_STAGES = 2


def test_1_every_stage_runs_once_in_graph_order(engine):
    job, variants = engine.submit(variants=3)
    completed = engine.run_until_idle("w1")
    assert completed == 3 * STAGES_PER_VARIANT + JOB_STAGES
    assert engine.job_state(job) == "done"
    results = engine.read("SELECT r.job_variants_id::text AS v, r.stage, count(*) AS n, min(r.created_at) AS at "
                          "FROM stage_results r WHERE r.job_id = %s GROUP BY 1, 2", (job,))
    assert all(r["n"] == 1 for r in results)
    names = engine.graph.names("variant")
    for v in variants:
        mine = sorted((r for r in results if r["v"] == v), key=lambda r: r["at"])
        assert [r["stage"] for r in mine] == names
    assert sorted(r["stage"] for r in results if r["v"] is None) == sorted(engine.graph.names("job"))


def test_2_concurrent_claimers_never_hold_a_task_twice(engine):
    jobs = [engine.submit(variants=2)[0] for _ in range(6)]
    held: dict[tuple[int, int], str] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        conn = engine.connect()
        try:
            idle_rounds = 0
            while idle_rounds < 20:
                tasks = engine.claim(name, limit=3, conn=conn)
                if not tasks:
                    idle_rounds += 1
                    time.sleep(0.02)  # another worker may be about to enqueue the next stage
                    continue
                idle_rounds = 0
                with lock:
                    for t in tasks:
                        if (t["id"], t["attempt"]) in held:
                            problems.append(f"task {t['id']} attempt {t['attempt']}: {held[(t['id'], t['attempt'])]} and {name}")
                        held[(t["id"], t["attempt"])] = name
                accepted = engine.complete(name, tasks, conn=conn)
                if sorted(accepted) != sorted(t["id"] for t in tasks):
                    with lock:
                        problems.append(f"{name}: completions refused {set(t['id'] for t in tasks) - set(accepted)}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert problems == []
    assert {j: engine.job_state(j) for j in jobs} == {j: "done" for j in jobs}
    assert len({h for h in held.values()}) > 1  # they did share the work
    per_task = engine.read("SELECT task_id, count(*) AS n FROM stage_results WHERE job_id = ANY (%s::uuid[]) "
                           "GROUP BY 1 HAVING count(*) > 1", (jobs,))
    assert per_task == []


def test_3_only_the_lease_holder_commits_and_only_once(engine):
    engine.submit(variants=1)
    [task] = engine.claim("w-old", limit=1, lease_s=0.01)
    time.sleep(0.05)
    assert [r["outcome"] for r in engine.rescue()] == ["requeued"]
    [again] = engine.claim("w-new", limit=1)
    assert again["id"] == task["id"] and again["attempt"] == task["attempt"] + 1
    assert engine.complete("w-old", [task]) == []  # its lease is gone
    assert engine.complete("w-other", [again]) == []  # not its lease
    assert engine.complete("w-new", [again]) == [again["id"]]
    assert engine.complete("w-new", [again]) == []  # a second completion of the same attempt
    assert engine.read("SELECT attempt FROM stage_results WHERE task_id = %s", (task["id"],)) == [{"attempt": 2}]


def test_4_enqueue_and_its_notification_commit_together(engine):
    listener = psycopg.connect(engine.direct_url, autocommit=True)
    try:
        listener.execute("LISTEN outbox_stage_tasks")
        engine.submit(variants=1)
        first = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
        assert first == ["vlm_analyze"]
        [task] = engine.claim("w1", limit=1)
        with engine.connect() as c:  # the completion rolled back: no next task, no notification
            with c.transaction(force_rollback=True):
                engine.complete("w1", [task], conn=c)
                assert c.execute("SELECT count(*) AS n FROM stage_tasks WHERE stage = 'yolo_detect'").fetchone()["n"] == 1
        assert [n.payload for n in listener.notifies(timeout=0.5)] == []
        assert engine.read("SELECT count(*) AS n FROM stage_tasks WHERE stage = 'yolo_detect'") == [{"n": 0}]
        assert engine.complete("w1", [task]) == [task["id"]]
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["yolo_detect"]
    finally:
        listener.close()


def test_5_the_job_stages_start_once_when_the_last_variants_finish_together(engine):
    last = engine.graph.last("variant")
    for _ in range(5):
        job, variants = engine.submit(variants=2)
        # Both variants up to their last stage, then both last stages completed at once.
        while tasks := engine.claim("w1", stages=[s for s in engine.graph.names("variant") if s != last]):
            engine.complete("w1", tasks)
        finals = engine.claim("w1", stages=[last])
        assert len(finals) == 2 and {str(t["job_id"]) for t in finals} == {job}
        barrier = threading.Barrier(2)
        accepted: list[list[int]] = []

        def finish(task):
            with engine.connect() as c:
                barrier.wait()
                accepted.append(engine.complete("w1", [task], conn=c))

        threads = [threading.Thread(target=finish, args=(t,)) for t in finals]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(len(a) for a in accepted) == [1, 1]
        job_tasks = engine.read("SELECT stage FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL", (job,))
        assert job_tasks == [{"stage": engine.graph.names("job")[0]}]
        engine.run_until_idle("w1")
        assert engine.job_state(job) == "done"


def test_6_retries_come_back_and_the_last_failure_is_final(engine):
    job, _ = engine.submit(variants=2)
    tasks = engine.claim("w1", limit=2)
    assert [engine.fail("w1", t, "transient", retry_in_s=60) for t in tasks] == ["retry", "retry"]
    assert engine.claim("w1") == []  # not before their time
    engine.conn.execute("UPDATE stage_tasks SET run_after = now() WHERE job_id = %s AND status = 'queued'", (job,))
    outcomes = []
    while tasks := engine.claim("w1", limit=2):
        outcomes += [engine.fail("w1", t, "still broken") for t in tasks]
    assert outcomes.count("failed") == 2 and set(outcomes) == {"retry", "failed"}
    assert engine.job_state(job) == "failed"
    assert {t["status"] for t in engine.tasks(job)} == {"failed"}
    assert engine.claim("w1") == []


def test_7_a_dead_workers_task_comes_back_and_fails_on_its_last_attempt(engine):
    job, _ = engine.submit(variants=1)
    [task] = engine.claim("w-dies", limit=1, lease_s=0.01)
    max_attempts = task["max_attempts"]
    for attempt in range(1, max_attempts + 1):
        time.sleep(0.05)
        outcome = engine.rescue()
        assert [r["outcome"] for r in outcome] == (["requeued"] if attempt < max_attempts else ["failed"])
        if attempt < max_attempts:
            [task] = engine.claim("w-dies", limit=1, lease_s=0.01)
            assert task["attempt"] == attempt + 1
    assert engine.job_state(job) == "failed"


def test_8_a_cancelled_job_has_nothing_claimable_and_refuses_late_results(engine):
    job, _ = engine.submit(variants=2)
    running = engine.claim("w1", limit=1)
    assert engine.cancel(job)["already_cancelled"] is False
    assert engine.claim("w1") == []
    assert engine.complete("w1", running) == []
    assert engine.job_state(job) == "cancelled"
    assert {t["status"] for t in engine.tasks(job)} == {"cancelled"}
    assert engine.cancel(job)["already_cancelled"] is True


def test_9_every_ended_attempt_is_on_record_once(engine):
    job, _ = engine.submit(variants=1)
    [first] = engine.claim("w-a", limit=1)
    assert engine.fail("w-a", first, "flaky") == "retry"
    [second] = engine.claim("w-b", limit=1)
    assert engine.complete("w-b", [second]) == [second["id"]]
    engine.run_until_idle("w-c")
    for task in engine.tasks(job):
        log = task["attempt_log"]
        assert [e["attempt"] for e in log] == list(range(1, task["attempts"] + 1))
        assert log[-1]["outcome"] == "done" and all(e["worker"] for e in log)
    [retried] = [t for t in engine.tasks(job) if t["id"] == first["id"]]
    assert [(e["worker"], e["outcome"], e["error"]) for e in retried["attempt_log"]] == [
        ("w-a", "retry", "flaky"), ("w-b", "done", None)]
