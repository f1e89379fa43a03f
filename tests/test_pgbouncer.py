"""Behind PgBouncer in transaction mode: statements through the pooler, LISTEN straight to
PostgreSQL (LISTEN_DATABASE_URL); and a listener wrongly pointed at the pooler is detected."""
from __future__ import annotations

import pytest

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests import pooler
from tests.workerproc import WorkerProcess, wait_for_jobs

pytestmark = pytest.mark.skipif(not pooler.INSTALLED, reason=pooler.WHY_NOT)


@pytest.fixture
def pgbouncer(pg_server, db_url, tmp_path):
    with pooler.pgbouncer(db_url, tmp_path) as url:
        yield url


def test_whole_job_through_pgbouncer_with_direct_listener(conn, db_url, pgbouncer, home, tiny_png, tmp_path):
    jobs = [submit_job(conn, open_store(), [tiny_png], "Copy FLAKY:planner:1", tenant="acme", variants=3).job_id
            for _ in range(3)]
    workers = [WorkerProcess(pgbouncer, tmp_path / f"w{i}.log", "--concurrency", "4", "--retry-base", "0.05",
                             env={"LISTEN_DATABASE_URL": db_url}) for i in range(2)]
    try:
        assert wait_for_jobs(db_url, jobs) == {j: "done" for j in jobs}
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    assert conn.execute("SELECT count(*) AS n FROM stage_results").fetchone()["n"] == 3 * 26
    for w in workers:
        assert "ERROR" not in w.output()


def test_listener_behind_a_transaction_pooler_is_detected_at_start(pgbouncer, tmp_path):
    worker = WorkerProcess(pgbouncer, tmp_path / "w.log")  # LISTEN_DATABASE_URL defaults to the pooler
    try:
        worker.proc.wait(60)
    finally:
        worker.stop()
    assert worker.proc.returncode not in (0, None)
    assert "did not arrive" in worker.output() and "LISTEN_DATABASE_URL" in worker.output()
