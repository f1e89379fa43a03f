"""Starting and stopping real worker processes for tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg

from workers import launch

ROOT = Path(__file__).resolve().parent.parent
TEST_REGISTRY = "tests.engine_stages:build_registry"


class WorkerProcess:
    def __init__(self, db_url: str, log_path: Path, *args: str, env: dict | None = None):
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = launch.spawn_worker(
            ["--registry", TEST_REGISTRY, *args],
            {**os.environ, "DATABASE_URL": db_url, "JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2",
             "PYTHONUNBUFFERED": "1", "HEALTH_ADDR": "", **(env or {})}, self.log)

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
