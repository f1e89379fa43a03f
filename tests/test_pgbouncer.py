"""Behind PgBouncer in transaction mode: statements through the pooler, LISTEN straight to
PostgreSQL (LISTEN_DATABASE_URL); and a listener wrongly pointed at the pooler is detected."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import psycopg
import pytest

from outbox.artifacts import open_store
from outbox.db import free_port
from outbox.jobs import submit_job
from tests.workerproc import WorkerProcess, wait_for_jobs

pytestmark = pytest.mark.skipif(shutil.which("pgbouncer") is None,
                                reason="pgbouncer not installed (Debian package pgbouncer; .ci/run installs it)")


@pytest.fixture
def pgbouncer(pg_server, db_url, tmp_path):
    port = free_port()
    pg_port = db_url.split(":")[2].split("/")[0]
    (tmp_path / "users.txt").write_text('"postgres" ""\n')
    (tmp_path / "pgbouncer.ini").write_text(f"""
[databases]
* = host=127.0.0.1 port={pg_port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = trust
auth_file = {tmp_path / 'users.txt'}
pool_mode = transaction
max_client_conn = 200
default_pool_size = 10
unix_socket_dir =
logfile = {tmp_path / 'pgbouncer.log'}
""")
    argv = ["pgbouncer", str(tmp_path / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        argv = ["unshare", "--map-user=1000", "--map-group=1000", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = db_url.rsplit(":", 1)[0] + f":{port}/" + db_url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, (tmp_path / "pgbouncer.log").read_text()
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


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
