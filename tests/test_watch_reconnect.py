"""`cli.py watch` and `cli.py submit --wait` across a PostgreSQL restart: they reconnect with the
worker's backoff, re-read the job (changes made while they were away sent notifications nobody
heard) and exit 0 when the job is done; a database that stays away ends them with exit 4 and a
message, never a traceback.

The job is driven by plain SQL (claim and complete through the engine's functions, as in
test_triggers.py), not by workers: the watcher is what is under test. This module runs its own
PostgreSQL, because it stops and restarts it (the session's server is shared)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from outbox import db
from console.progress import JobProgress
from outbox.config import RECONNECT_MAX_S
from outbox.watch import JobWatch
from tests.conftest import ROOT, clone_database, own_server
from tests.helpers import claim, complete, insert_job, run_variant_stages, wait_until


@pytest.fixture(scope="module")
def own_pg(tmp_path_factory):
    server = own_server(tmp_path_factory, "watch_template")
    yield server
    server.stop()


@pytest.fixture
def own_db(own_pg):
    return clone_database(own_pg, "watch_template")


class Watcher:
    """A cli.py process (watch, or submit --wait) whose stdout and stderr are read as they come."""

    def __init__(self, args: list[str], db_url: str, env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1", **env})
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        wait_until(lambda: text in self.stdout or self.proc.poll() is not None, timeout, what=repr(text))
        assert text in self.stdout, f"exited {self.proc.returncode}:\n{self.stdout}\n{self.stderr}"

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_watch(conn, db_url, env) -> tuple[Watcher, str]:
    job_id, _ = insert_job(conn, variants=2)  # an outside writer's job: variants at (img_gen, done)
    return Watcher(["watch", job_id, "--plain"], db_url, env), job_id


def start_submit_wait(conn, db_url, env, image) -> tuple[Watcher, str]:
    watcher = Watcher(["submit", str(image), "--copy", "Iced tea", "--variants", "2", "--wait"], db_url, env)
    wait_until(lambda: watcher.out or watcher.proc.poll() is not None, 30, what="the job id")
    assert watcher.out, watcher.stderr
    return watcher, watcher.out[0].strip()


@pytest.mark.parametrize("command", ["watch", "submit --wait"])
def test_watch_survives_a_postgres_restart_and_rereads_what_it_missed(own_pg, own_db, home, tiny_png, command):
    # The first reconnect attempt comes 1.5 s after the loss: the restart (a fast shutdown and a
    # start on the same port and data folder) and the rest of the job fit in that window, so the
    # job finishes while the watcher is away and only the re-read can tell it so.
    env = {"JOB_STATE_LISTENER_RECONNECT_DELAY": "1.5", "WATCH_RECONNECT_TIMEOUT": "30"}
    conn = db.connect(own_db)
    watcher = None
    try:
        if command == "watch":
            watcher, job_id = start_watch(conn, own_db, env)
        else:
            watcher, job_id = start_submit_wait(conn, own_db, env, tiny_png)
        watcher.wait_for("following its state changes")
        for task in claim(conn, stages=["vlm_analyze"]):  # live, before the restart
            assert complete(conn, task)
        watcher.wait_for("variant 2 [1/8] vlm_analyze done in")
        conn.close()

        own_pg.restart(signal.SIGINT, down_s=0.3)
        conn = db.connect(own_db)
        run_variant_stages(conn)  # every remaining stage, the job's two included
        job = conn.execute("SELECT status, current_step FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        assert job == {"status": "done", "current_step": "instagram_feed_gen"}

        code = watcher.wait(60)
    finally:
        conn.close()
        if watcher:
            watcher.kill()
    out, err = watcher.stdout, watcher.stderr
    assert code == 0, out + err
    assert "Traceback" not in out + err
    # One line on stderr for the loss (with its cause), one for the reconnect.
    assert err.count("connection to the database at") == 1, err
    assert "lost (" in err and "reconnecting (giving up after 30 s)" in err, err
    assert "reconnected after" in err and "re-reading the job's state" in err, err
    # What happened while it was away, from the re-read: every stage, then the job.
    assert "variant 1 [8/8] iou_eval done in" in out and "variant 2 [8/8] iou_eval done in" in out, out
    assert "job [2/2] instagram_feed_gen done in" in out, out
    assert f"job {job_id} done in" in out, out


def test_watch_gives_up_with_exit_4_when_the_database_stays_away(own_pg, own_db):
    env = {"JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2", "WATCH_RECONNECT_TIMEOUT": "3"}
    with db.connect(own_db) as conn:
        watcher, job_id = start_watch(conn, own_db, env)
    try:
        watcher.wait_for("following its state changes")
        own_pg.stop(signal.SIGINT)
        code = watcher.wait(30)
    finally:
        watcher.kill()
        own_pg.restart()  # back for the other tests (same port and data folder)
    err = watcher.stderr
    assert code == 4, watcher.stdout + err
    assert "Traceback" not in watcher.stdout + err
    assert "reconnecting (giving up after 3 s)" in err, err
    assert "error: lost the connection to the database at" in err, err
    assert "could not reconnect within 3 s (WATCH_RECONNECT_TIMEOUT)" in err, err
    assert "Connection refused" in err, err  # the last attempt's cause, named


# ------------------------------------------------------------------------ without a server
class FakeConn:
    class info:  # noqa: N801 - psycopg's ConnectionInfo, as far as JobWatch reads it
        host, port, dbname, dsn, password = "db.example", 5432, "adflow", "host=db.example dbname=adflow", None

    closed = broken = False

    def close(self):
        self.closed = True


def test_reconnect_uses_the_worker_backoff_and_its_settings(monkeypatch):
    from workers.worker import WorkerSettings

    assert WorkerSettings(url="x").reconnect_max_s == RECONNECT_MAX_S  # one rule, one constant
    monkeypatch.setenv("JOB_STATE_LISTENER_RECONNECT_DELAY", "0.2")
    monkeypatch.setenv("WATCH_RECONNECT_TIMEOUT", "7")
    attempts, sleeps, notices = [], [], []

    def connect():
        attempts.append(1)
        if len(attempts) < 5:
            raise db.DatabaseUnavailable("cannot connect: Connection refused")
        return FakeConn()

    watch = JobWatch(FakeConn(), "job-1", connect=connect, max_delay_s=0.5, notice=notices.append,
                     sleep=sleeps.append)
    assert (watch.first_delay_s, watch.timeout_s) == (0.2, 7.0)
    calls = []

    def read(conn):
        calls.append(conn)
        if len(calls) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return "read"

    assert watch.read(read) == "read"
    assert sleeps == [0.2, 0.4, 0.5, 0.5, 0.5]  # doubling from the first delay, capped
    assert calls[1] is watch.conn and watch.reconnects == 1
    assert len(notices) == 2, notices
    assert notices[0].startswith("connection to the database at db.example:5432/adflow lost (OperationalError: "
                                 "server closed the connection unexpectedly); reconnecting (giving up after 7 s)")
    assert notices[1].startswith("reconnected after")


def test_reconnect_gives_up_after_its_timeout_with_the_last_cause():
    notices = []

    def refuse():
        raise db.DatabaseUnavailable("cannot connect to PostgreSQL at db.example:5432/adflow: Connection refused")

    def lost(conn):
        raise psycopg.OperationalError("terminating connection due to administrator command")

    watch = JobWatch(FakeConn(), "job-1", connect=refuse, timeout_s=0.3, first_delay_s=0.05, notice=notices.append)
    started = time.monotonic()
    with pytest.raises(db.DatabaseUnavailable) as caught:
        watch.read(lost)
    assert 0.3 <= time.monotonic() - started < 2
    message = str(caught.value)
    assert message.startswith("lost the connection to the database at db.example:5432/adflow and could not "
                              "reconnect within 0.3 s (WATCH_RECONNECT_TIMEOUT); last error: DatabaseUnavailable: "
                              "cannot connect to PostgreSQL at db.example:5432/adflow: Connection refused."), message
    assert "while handling" not in message and len(notices) == 1


GRAPH = [{"stage": s, "level": "variant"} for s in ("vlm_analyze", "yolo_detect", "planner")] + [
    {"stage": "ad_copy_gen_kor", "level": "job"}]


def task(variant, stage, status, error=None):
    return {"variant_id": variant, "stage": stage, "status": status, "attempts": 1, "max_attempts": 3,
            "started_at": None, "finished_at": None, "last_error": error}


def test_resync_reports_what_changed_while_away_in_pipeline_order():
    snapshot = {"job_id": "job-1", "status": "running", "current_step": "img_gen",
                "variants": [{"variant_id": "v1", "creation_order": 1, "status": "done", "current_step": "img_gen"},
                             {"variant_id": "v2", "creation_order": 2, "status": "done", "current_step": "img_gen"}],
                "tasks": [task("v1", "vlm_analyze", "done"), task("v2", "vlm_analyze", "running")]}
    progress = JobProgress(GRAPH, snapshot)
    later = {**snapshot, "status": "failed", "current_step": "planner", "state": "failed",
             "variants": [{"variant_id": "v1", "creation_order": 1, "status": "failed", "current_step": "planner"},
                          {"variant_id": "v2", "creation_order": 2, "status": "failed", "current_step": "vlm_analyze"}],
             "tasks": [task("v1", "vlm_analyze", "done"), task("v1", "yolo_detect", "done"),
                       task("v1", "planner", "failed", "planner: no room for text"),
                       task("v2", "vlm_analyze", "failed", "CUDA out of memory")]}
    seen = [(c.track.label, c.stage, c.status, c.track.done) for c in progress.resync(later)]
    assert seen == [("variant 1", "yolo_detect", "done", 2), ("variant 1", "planner", "failed", 2),
                    ("variant 2", "vlm_analyze", "failed", 0), ("job", None, "failed", 0)]
    assert progress.variants["v1"].states["planner"].error == "planner: no room for text"
    assert progress.job.note == "all variants failed" and progress.final_status == "failed"
    assert list(progress.resync(later)) == []  # nothing new the second time
