"""Scenarios 4 and 5: the listening backend terminated while work keeps arriving; a half-open
connection (a proxy that silently stops forwarding) noticed within a bounded time."""
from __future__ import annotations

import random
import time

from tests.faults.harness import (BlackholeProxy, Fleet, check_invariants, jobs, log_problems, report, results_after,
                                  submit_jobs, wait_for_jobs, wait_until, db_now)


def listener_pids(conn, dbname: str) -> list[int]:
    return [r["pid"] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN outbox_stage_tasks%%'", (dbname,))]


def test_listening_backend_terminated_while_work_keeps_arriving(conn, db_url, home, tiny_png, tmp_path):
    """Three workers. Six times: a wave of jobs arrives and every worker's listening backend is
    terminated (pg_terminate_backend), sometimes just before the wave, sometimes just after.
    Each worker reconnects, LISTENs, drains; claims and completions on the pooled connections
    are untouched, so every task still runs exactly once."""
    rng = random.Random(4)
    dbname = db_url.rsplit("/", 1)[1]
    fleet = Fleet(db_url, tmp_path, 3)
    job_ids, reconnects = [], []
    try:
        fleet.wait_ready()
        waves = 6 * jobs(1)
        for wave in range(waves):
            before = rng.random() < 0.5
            if not before:
                job_ids += submit_jobs(conn, tiny_png, jobs(30) // waves)
            pids = listener_pids(conn, dbname)
            assert len(pids) == 3
            started = time.monotonic()
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if before:
                job_ids += submit_jobs(conn, tiny_png, jobs(30) // waves)
            wait_until(lambda: len(set(listener_pids(conn, dbname)) - set(pids)) == 3, 30, what="listeners back")
            reconnects.append(time.monotonic() - started)
            time.sleep(rng.uniform(0.1, 0.4))
        wait_for_jobs(db_url, job_ids, timeout=120)
    finally:
        codes = fleet.stop()
    assert codes == [0, 0, 0]
    summary = check_invariants(conn, fleet.record_dir, job_ids, exactly_once=True)
    logs = fleet.logs()
    assert logs.count("reconnect attempt") >= 3 * len(reconnects)
    assert not log_problems(logs), log_problems(logs)
    report("4 listening backend terminated", terminations=3 * len(reconnects), relisten_max_s=max(reconnects),
           relisten_mean_s=sum(reconnects) / len(reconnects), summary=str(summary))


HALF_OPEN_ENV = {"DB_LIVENESS_INTERVAL": "1", "DB_OPERATION_TIMEOUT": "2"}


def test_half_open_connections_are_noticed_and_replaced(conn, pg_server, db_url, home, tiny_png, tmp_path):
    """Every connection of three workers goes through a TCP proxy. Mid-run, the proxy freezes
    every open connection: they stay open and acknowledged, but nothing passes (TCP keepalives
    see nothing wrong). Each worker must notice — a liveness query after DB_LIVENESS_INTERVAL s of
    silence on its listening connection, DB_OPERATION_TIMEOUT s on every pooled operation —
    reconnect (new connections pass) and finish. Then again while idle."""
    proxy = BlackholeProxy(pg_server.port)
    fleet = Fleet(proxy.url_for(db_url), tmp_path, 3, env=HALF_OPEN_ENV)
    try:
        fleet.wait_ready()
        job_ids = submit_jobs(conn, tiny_png, jobs(30))
        wait_until(lambda: results_after(conn, 0) >= 150, 60, what="mid-run")
        frozen_at, t_db = time.monotonic(), db_now(conn)
        frozen = proxy.blackhole()
        for worker in fleet:
            worker.wait_ready(60, count=2)
        busy_detect = time.monotonic() - frozen_at
        wait_until(lambda: results_after(conn, t_db) > 0, 60, what="progress")
        busy_progress = time.monotonic() - frozen_at
        wait_for_jobs(db_url, job_ids, timeout=120)

        # Idle: nothing queued, nothing running; only the liveness query can notice.
        time.sleep(1.5)
        frozen_at = time.monotonic()
        frozen_idle = proxy.blackhole()
        for worker in fleet:
            worker.wait_ready(60, count=3)
        idle_detect = time.monotonic() - frozen_at
        late = submit_jobs(conn, tiny_png, jobs(5))
        wait_for_jobs(db_url, late, timeout=60)
    finally:
        codes = fleet.stop()
        proxy.close()
    assert codes == [0, 0, 0]
    summary = check_invariants(conn, fleet.record_dir, job_ids + late)
    logs = fleet.logs()
    assert "did not answer a liveness probe" in logs
    problems = log_problems(logs, expected=("could not record the outcome",))
    assert not problems, problems
    # The bound (docs/reliability.md): liveness interval + operation timeout + psycopg's cancel
    # attempt (at most 10 s) + the first reconnect delay.
    bound = 1 + 2 + 10 + 1
    assert busy_detect < bound and idle_detect < bound, (busy_detect, idle_detect)
    report("5 half-open connection (liveness 1 s, timeout 2 s)", frozen_busy=frozen, frozen_idle=frozen_idle,
           busy_relisten_s=busy_detect, busy_progress_s=busy_progress, idle_relisten_s=idle_detect,
           bound_s=bound, summary=str(summary))
