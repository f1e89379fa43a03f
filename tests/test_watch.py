"""Live progress: `cli.py watch` and `submit --wait` follow a job by LISTEN, show stage durations
and failures with their error text, print plain lines on a pipe and bars on a terminal."""
from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg
from rich.console import Console

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from console.progress import JobProgress, PlainRenderer, RichRenderer
from tests.conftest import ROOT, cli
from tests.workerproc import WorkerProcess

STAGES = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval", "iou_eval"]
GRAPH = [{"stage": s, "level": "variant"} for s in STAGES] + [
    {"stage": "ad_copy_gen_kor", "level": "job"}, {"stage": "instagram_feed_gen", "level": "job"}]


def start_watch(job_id: str, db_url: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "watch", job_id, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "DATABASE_URL": db_url, **(env or {})})
    header = proc.stdout.readline()  # printed after LISTEN and the first read
    assert "following its state changes" in header, header + proc.stdout.read()
    return proc


def test_watch_over_a_pipe_shows_stages_durations_and_failures(conn, db_url, home, tiny_png, tmp_path):
    good = submit_job(conn, open_store(), [tiny_png], "Fresh coffee SLEEP:planner:0.3", variants=2).job_id
    bad = submit_job(conn, open_store(), [tiny_png], "Bad copy PERMANENT:overlay", variants=1).job_id
    watch_good, watch_bad = start_watch(good, db_url), start_watch(bad, db_url)
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    try:
        out_good, _ = watch_good.communicate(timeout=60)
        out_bad, _ = watch_bad.communicate(timeout=60)
    finally:
        assert worker.stop() == 0
    assert watch_good.returncode == 0, out_good
    assert "\x1b" not in out_good and "\x1b" not in out_bad  # no control codes on a pipe
    # Live lines, in pipeline order per variant, with durations from the state changes.
    assert "variant 1 [0/8] vlm_analyze running" in out_good
    planner = re.search(r"variant 1 \[3/8\] planner done in (\d+\.\d+) s", out_good)
    assert planner and float(planner.group(1)) >= 0.3, out_good
    assert "job [2/2] instagram_feed_gen done in" in out_good
    assert re.search(r"^planner\s+\d+\.\d\d s\s+\d+\.\d\d s$", out_good, re.M), out_good  # the summary table
    assert f"job {good} done in" in out_good
    # The failure arrives with its error text, read once from the task row.
    assert watch_bad.returncode == 1, out_bad
    assert ("variant 1 [3/8] overlay FAILED after 1/3 attempt(s): test stage overlay: bad input planted in the copy"
            in out_bad), out_bad
    assert "variant 1 failed at overlay: test stage overlay: bad input planted" in out_bad
    assert f"job {bad} FAILED" in out_bad


def test_watch_sends_no_query_while_nothing_changes(conn, pg_server, db_url, home, tiny_png, tmp_path):
    job = submit_job(conn, open_store(), [tiny_png], "Fresh coffee", variants=1).job_id
    watch = start_watch(job, db_url, env={"PGAPPNAME": "adflow-watch-test"})
    try:
        dbname = db_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_server.url, autocommit=True) as admin:
            query = ("SELECT pid, query_start, state, query FROM pg_stat_activity "
                     "WHERE datname = %s AND application_name = 'adflow-watch-test'")
            before = admin.execute(query, (dbname,)).fetchall()
            time.sleep(2.0)
            after = admin.execute(query, (dbname,)).fetchall()
        assert len(before) == 1 and before[0][2] == "idle", before  # one connection, waiting on LISTEN
        assert before == after  # no statement in those 2 s: nothing polls
        worker = WorkerProcess(db_url, tmp_path / "w.log")
        try:
            out, _ = watch.communicate(timeout=60)
        finally:
            assert worker.stop() == 0
        assert watch.returncode == 0 and f"job {job} done" in out, out
    finally:
        if watch.poll() is None:
            watch.kill()


def test_submit_wait_shows_progress_and_json_stays_clean(db_url, home, tiny_png, tmp_path):
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    try:
        done = cli("submit", str(tiny_png), "--copy", "Iced tea", "--wait", env={"DATABASE_URL": db_url}, timeout=60)
        as_json = cli("submit", str(tiny_png), "--copy", "Iced tea", "--wait", "--json", env={"DATABASE_URL": db_url},
                      timeout=60)
    finally:
        assert worker.stop() == 0
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0]
    assert "variant 1 [8/8] iou_eval done in" in done.stdout and f"job {job_id} done in" in done.stdout
    assert "\x1b" not in done.stdout
    assert as_json.returncode == 0, as_json.stderr
    import json

    assert set(json.loads(as_json.stdout)) == {"job_id", "variant_ids"}  # progress went to stderr
    assert "iou_eval done in" in as_json.stderr


def test_watch_on_a_terminal_draws_bars_and_defaults_to_the_newest_job(conn, db_url, home, tiny_png, tmp_path):
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    try:
        cli("submit", str(tiny_png), "--copy", "Old job", "--wait", env={"DATABASE_URL": db_url}, check=True, timeout=60)
        job = cli("submit", str(tiny_png), "--copy", "New job", "--wait", env={"DATABASE_URL": db_url}, check=True,
                  timeout=60).stdout.splitlines()[0]
    finally:
        assert worker.stop() == 0
    primary, replica = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "watch"], cwd=ROOT, stdin=replica, stdout=replica,
                            stderr=replica, env={**os.environ, "DATABASE_URL": db_url, "COLUMNS": "120", "TERM": "xterm"})
    os.close(replica)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(30) == 0
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[" in raw and "━" in raw  # rich progress bars
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert f"job {job}" in screen and "8/8" in screen and "2/2" in screen
    assert "stage durations" in screen


def at(seconds: float) -> str:
    return (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)).isoformat()


def snapshot() -> dict:
    return {"job_id": "job-1", "status": "running", "current_step": "img_gen",
            "variants": [{"variant_id": "v1", "creation_order": 1, "status": "done", "current_step": "img_gen"},
                         {"variant_id": "v2", "creation_order": 2, "status": "done", "current_step": "img_gen"}],
            "tasks": []}


def test_progress_model_durations_and_rich_failure_text():
    progress = JobProgress(GRAPH, snapshot())
    console_out = io.StringIO()
    renderer = RichRenderer(Console(file=console_out, force_terminal=True, width=120, highlight=False))
    renderer.start(progress)
    events = [("job_variant_state_changed", {"job_variants_id": "v1", "current_step": "vlm_analyze", "status": "running", "updated_at": at(0)}),
              ("job_variant_state_changed", {"job_variants_id": "v1", "current_step": "vlm_analyze", "status": "done", "updated_at": at(1.5)}),
              ("job_variant_state_changed", {"job_variants_id": "v2", "current_step": "vlm_analyze", "status": "running", "updated_at": at(0)}),
              ("job_variant_state_changed", {"job_variants_id": "v2", "current_step": "vlm_analyze", "status": "failed", "updated_at": at(2)})]
    changes = [progress.apply(channel, payload) for channel, payload in events]
    changes[-1].track.states["vlm_analyze"].error = "CUDA out of memory\ntraceback..."
    for change in changes:
        renderer.update(progress, change)
    renderer.finish(progress, 3.0)
    v1, v2 = progress.variants["v1"], progress.variants["v2"]
    assert v1.done == 1 and v1.states["vlm_analyze"].duration == 1.5
    assert v2.failed_stage == "vlm_analyze"
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console_out.getvalue())
    assert "variant 2 failed at vlm_analyze" in screen and "CUDA out of memory" in screen
    assert "traceback" not in screen  # first line only
    assert "1.50 s" in screen and "FAILED" in screen
    # The job's own stages: not started while variants are open.
    assert progress.job.note.startswith("waiting for")
    plain = io.StringIO()
    PlainRenderer(plain).update(progress, changes[1])
    assert plain.getvalue() == "variant 1 [1/8] vlm_analyze done in 1.50 s\n"
