"""A rolling update: the database is migrated to this release first, and the workers of the
previous release keep running against it until Kubernetes replaces them. The previous release's
own worker code (taken from git history, run from its own tree) must finish jobs on the migrated
schema, side by side with a worker of this release.

PREVIOUS_RELEASE is the last commit that landed before this release's migrations; move it
forward when a release lands. SQL functions a worker calls keep their signatures and returned
columns across a release (a changed signature gets a new, versioned name instead), which is what
this test holds the migrations to.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile

import pytest

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests.conftest import ROOT
from tests.workerproc import TEST_REGISTRY, WorkerProcess, wait_for_jobs
from workers import launch

PREVIOUS_RELEASE = "3f1eee3"  # migrations 0001-0002; this release adds 0003 onwards


def previous_tree(dest) -> None:
    """The previous release's files, from git (skips when the history is not there)."""
    if not shutil.which("git") or not (ROOT / ".git").exists():
        pytest.skip("no git history here: the previous release's code cannot be read")
    done = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this clone's history (a shallow clone?): "
                    f"{done.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(dest, filter="data")


def test_a_worker_of_the_previous_release_finishes_jobs_on_the_migrated_schema(conn, db_url, home, tiny_png,
                                                                                tmp_path):
    old_tree = tmp_path / "previous"
    previous_tree(old_tree)
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1", "HEALTH_ADDR": "",
           "JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2",
           # Its own tree first: `-m workers` from its folder imports its outbox/, workers/, stages/.
           "PYTHONPATH": str(old_tree)}
    store = open_store()
    jobs = [submit_job(conn, store, [tiny_png], f"Rolling {i} FLAKY:planner:1", tenant="acme", variants=2).job_id
            for i in range(3)]
    with open(tmp_path / "previous.log", "wb") as log:
        old = subprocess.Popen(launch.worker_command(["--registry", TEST_REGISTRY, "--lease", "5", "--retry-base",
                                                      "0.05", "--concurrency", "4"]),
                               cwd=old_tree, env=env, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=launch.die_with_parent())
    try:
        states = wait_for_jobs(db_url, jobs[:1], timeout=90)  # the old worker alone first
        assert states == {jobs[0]: "done"}, (tmp_path / "previous.log").read_text()
        new = WorkerProcess(db_url, tmp_path / "new.log", "--lease", "5", "--retry-base", "0.05")
        try:
            later = [submit_job(conn, store, [tiny_png], f"Later {i}", tenant="acme", variants=2).job_id
                     for i in range(4)]
            states = wait_for_jobs(db_url, jobs + later, timeout=120)
        finally:
            assert new.stop() == 0, new.output()
    finally:
        old.terminate()
        assert old.wait(30) == 0, (tmp_path / "previous.log").read_text()
    assert set(states.values()) == {"done"}, states
    old_log = (tmp_path / "previous.log").read_text()
    assert "stage planner succeeded" in old_log and "failed for" in old_log, old_log  # it ran, and retried
