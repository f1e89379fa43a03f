"""Starting and stopping real worker processes for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg

from outbox.db import free_port
from workers import launch

ROOT = Path(__file__).resolve().parent.parent
TEST_REGISTRY = "tests.engine_stages:build_registry"


class WorkerProcess:
    """A worker process with its probes on a port of its own (unless the test names one), so a
    test waits for what the code exposes (/readyz: listening, schema there) instead of log text."""

    def __init__(self, db_url: str, log_path: Path, *args: str, env: dict | None = None):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        env = dict(env or {})
        if "--health-addr" in args:
            self.health_addr = args[args.index("--health-addr") + 1]
        else:
            env.setdefault("HEALTH_ADDR", f"127.0.0.1:{free_port()}")
            self.health_addr = env["HEALTH_ADDR"]
        self.proc = launch.spawn_worker(
            ["--registry", TEST_REGISTRY, *args],
            {**os.environ, "DATABASE_URL": db_url, "JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2",
             "PYTHONUNBUFFERED": "1", **env}, self.log)

    def probe(self, path: str = "/readyz") -> int | None:
        """The probe's HTTP status, or None while nothing answers."""
        port = self.health_addr.rpartition(":")[2]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def wait_ready(self, timeout: float = 30, path: str = "/readyz") -> None:
        """Until /readyz answers 200: the worker listens, its schema is there, it claims.
        path="/healthz": only alive (a worker that is not ready yet on purpose)."""
        if not self.health_addr:
            raise AssertionError("this worker serves no probes (HEALTH_ADDR is empty)")
        deadline = time.monotonic() + timeout
        while self.probe(path) != 200:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before it was ready:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready in {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before logging {text!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not log {text!r} in {timeout} s:\n{self.output()}")
            time.sleep(0.05)


def wait_for_task(db_url: str, stage: str, status: str = "running", timeout: float = 60) -> dict:
    """Until a task of `stage` is in `status` (the database's view, not a log line); returns it."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT id, job_variants_id::text, lease_owner FROM stage_tasks "
                               "WHERE stage = %s AND status = %s ORDER BY id LIMIT 1", (stage, status)).fetchone()
            if row:
                return {"id": row[0], "variant_id": row[1], "lease_owner": row[2]}
            if time.monotonic() > deadline:
                raise AssertionError(f"no {stage} task {status} in {timeout} s")
            time.sleep(0.05)


def wait_for_jobs(db_url: str, job_ids: list[str], timeout: float = 120) -> dict[str, str]:
    """Waits (LISTEN on job_state_changed, a re-read on each) until every job is finished, by the
    database's rule (outbox_job_state); returns each job's state."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("LISTEN job_state_changed")
        while True:
            rows = conn.execute("SELECT job_id::text, outbox_job_state(status, current_step) FROM jobs "
                                "WHERE job_id = ANY (%s::uuid[])", (job_ids,)).fetchall()
            states = dict(rows)
            if all(s != "open" for s in states.values()):
                return states
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"jobs not finished in {timeout} s: {states}")
            for _ in conn.notifies(timeout=min(left, 1.0), stop_after=1):
                pass
