"""The operator's CLI (issue 15): `jobs`, `workers list`, job references (unique prefixes and
`latest`) on every command that takes a job, states that never lie in `status`, `--json` with ISO
8601 timestamps, and one exit-code rule (console/exitcodes.py) for all commands."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime

from console.exitcodes import ExitCode, job_outcome
from outbox import views
from tests.conftest import ROOT, cli
from tests.helpers import claim, complete, fail, insert_job, run_variant_stages, wait_until
from tests.workerproc import WorkerProcess


def env_for(db_url, home):
    return {"DATABASE_URL": db_url, "ADFLOW_HOME": str(home)}


def as_json(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def job_with_id(conn, job_id: str, tenant="acme", variants=1) -> str:
    """A job whose id we choose (to make two share a prefix), written as an outside writer would."""
    conn.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step, expected_variants) "
                 "VALUES (%s, %s, 'running', 'img_gen', %s)", (job_id, tenant, variants))
    conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'copy')", (job_id,))
    for i in range(variants):
        conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                     "VALUES (%s, %s, 'done', 'img_gen')", (job_id, i + 1))
    return job_id


def finish_all(conn, fail_variant: str | None = None) -> None:
    """Runs every claimable task to the end; fail_variant's first task fails for good first."""
    if fail_variant:
        task = conn.execute("SELECT id FROM stage_tasks WHERE job_variants_id = %s", (fail_variant,)).fetchone()
        [claimed] = claim(conn, task_id=task["id"], stages=["vlm_analyze"])
        assert fail(conn, claimed, permanent=True) == "failed"
    run_variant_stages(conn)


def test_exit_code_rule_for_a_finished_job():
    assert job_outcome("done", 0) == ExitCode.OK == 0
    assert job_outcome("done", 1) == ExitCode.FAILED == 1  # a partial failure is not a success
    assert job_outcome("failed", 3) == job_outcome("cancelled", 0) == ExitCode.FAILED
    assert [int(c) for c in (ExitCode.BAD_INPUT, ExitCode.UNKNOWN_ID, ExitCode.DATABASE)] == [2, 3, 4]


def test_version_and_help():
    done = cli("--version", check=True)
    assert done.stdout.startswith("adflow ") and done.stdout.split()[1][0].isdigit()
    listed = cli("--help", check=True).stdout
    assert " jobs " in listed
    assert " list " in cli("workers", "--help", check=True).stdout


def test_jobs_lists_newest_first_with_true_states_and_filters(conn, db_url, home):
    env = env_for(db_url, home)
    done_job, _ = insert_job(conn, tenant="acme", variants=2)
    finish_all(conn)
    partial, partial_variants = insert_job(conn, tenant="acme", variants=2)
    finish_all(conn, fail_variant=partial_variants[0])
    fresh, _ = insert_job(conn, tenant="other", variants=3)  # nothing started: queued, never "done"
    rows = as_json(cli("jobs", "--json", env=env))
    assert [r["job_id"] for r in rows] == [fresh, partial, done_job]
    by_id = {r["job_id"]: r for r in rows}
    assert by_id[fresh]["short_id"] == fresh[:8]
    assert by_id[fresh]["status"] == "open" and by_id[fresh]["current_step"] == "vlm_analyze"
    assert by_id[fresh]["variants_by_state"] == {"queued": 3, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert by_id[partial]["status"] == "done" and by_id[partial]["failed_variants"] == 1
    assert by_id[partial]["variants_by_state"]["done"] == 1
    assert by_id[done_job]["variants_by_state"]["done"] == 2 and by_id[done_job]["failed_variants"] == 0
    datetime.fromisoformat(by_id[fresh]["created_at"])  # ISO 8601

    def ids(*args):
        return [r["job_id"] for r in as_json(cli("jobs", "--json", *args, env=env))]

    assert ids("--status", "done") == [partial, done_job]
    assert ids("--status", "open") == [fresh]
    assert ids("--status", "failed") == []
    assert ids("--tenant", "other") == [fresh]
    assert ids("--stage", "vlm_analyze") == [fresh, partial]  # queued there, or failed there
    assert ids("--limit", "1") == [fresh]
    assert ids("--limit", "1", "--offset", "1") == [partial]
    assert ids("--since", "1h") == [fresh, partial, done_job]
    conn.execute("UPDATE jobs SET created_at = now() - interval '3 hours' WHERE job_id = %s", (done_job,))
    assert ids("--since", "2h") == [fresh, partial]
    plain = cli("jobs", env=env, check=True).stdout
    assert fresh[:8] in plain and "0/3 done, 3 queued" in plain and "1/2 done, 1 failed" in plain
    for args, text in ((("--status", "finished"), "open, done, failed"), (("--stage", "paint"), "unknown stage"),
                       (("--since", "yesterday"), "--since"), (("--tenant", "../x"), "tenant")):
        bad = cli("jobs", *args, env=env)
        assert bad.returncode == ExitCode.BAD_INPUT and text in bad.stderr, (args, bad.stderr)
        assert bad.stdout == ""


def test_job_references_prefixes_latest_and_their_exit_codes(conn, db_url, home, tmp_path):
    env = env_for(db_url, home)
    first = job_with_id(conn, "abcd0000-0000-4000-8000-000000000001", tenant="acme")
    second = job_with_id(conn, "abcd1111-0000-4000-8000-000000000002", tenant="other")
    assert as_json(cli("status", "abcd0", "--json", env=env))["job_id"] == first
    assert as_json(cli("status", "ABCD-11", "--json", env=env))["job_id"] == second  # case and dashes
    assert as_json(cli("status", "latest", "--json", env=env))["job_id"] == second
    assert as_json(cli("status", "latest", "--tenant", "acme", "--json", env=env))["job_id"] == first
    cases = [
        (("status", "abcd"), ExitCode.BAD_INPUT, "more than one job"),
        (("status", "abc"), ExitCode.BAD_INPUT, "at least 4 hex digits"),
        (("status", "zzzz"), ExitCode.BAD_INPUT, "is not a UUID, a prefix of one"),
        (("status", "ffff"), ExitCode.UNKNOWN_ID, "no job matches 'ffff'"),
        (("status", "latest", "--tenant", "nobody"), ExitCode.UNKNOWN_ID, "no jobs of tenant nobody"),
        (("watch", "ffff"), ExitCode.UNKNOWN_ID, "no job"),
        (("report", "ffff"), ExitCode.UNKNOWN_ID, "no job"),
        (("cancel", "abcd"), ExitCode.BAD_INPUT, "more than one job"),
        (("replay-failed", "--job", "ffff"), ExitCode.UNKNOWN_ID, "no job"),  # was exit 0
        (("replay-failed", "--job", str(uuid.uuid4())), ExitCode.UNKNOWN_ID, "no job"),
    ]
    for args, code, text in cases:
        done = cli(*args, env=env)
        assert done.returncode == code, (args, done.returncode, done.stderr)
        assert text in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stdout == "", args  # errors on stderr only
    # cancel by prefix; a second cancel is a no-op that says so, with exit 0
    cancelled = as_json(cli("cancel", "abcd1", "--json", env=env))
    assert cancelled == {"job_id": second, "already_cancelled": False, "tasks_cancelled": 1}
    again = cli("cancel", "abcd1", env=env)
    assert again.returncode == ExitCode.OK and "already cancelled; nothing to do" in again.stdout
    # report: latest, and -o only into a directory that exists
    written = as_json(cli("report", "latest", "--json", env=env))
    assert written["job_id"] == second and (home / "reports" / f"job-{second}.html").is_file()
    missing = tmp_path / "no" / "such" / "dir" / "r.html"
    refused = cli("report", "abcd0", "-o", str(missing), env=env)
    assert refused.returncode == ExitCode.BAD_INPUT and "does not exist" in refused.stderr
    assert not (tmp_path / "no").exists()
    assert cli("report", "abcd0", "-o", str(tmp_path), env=env).returncode == ExitCode.BAD_INPUT  # a directory
    target = tmp_path / "r.html"
    assert cli("report", "abcd0", "-o", str(target), env=env, check=True).stdout.strip() == str(target)
    assert "<html" in target.read_text()


def test_status_states_never_lie_and_show_leases_in_pipeline_order(conn, db_url, home):
    env = env_for(db_url, home)
    job, variants = insert_job(conn, variants=2)
    [task] = claim(conn, owner="worker-under-test", stages=["vlm_analyze"], limit=1)
    assert complete(conn, task, owner="worker-under-test")
    [held] = claim(conn, owner="worker-under-test", stages=["yolo_detect"], limit=1, lease=60)
    detail = as_json(cli("status", job[:8], "--json", env=env))
    assert detail["status"] == "open" and detail["current_step"] == "vlm_analyze"  # where its work is
    assert detail["variants_by_state"] == {"queued": 1, "running": 1, "done": 0, "failed": 0, "cancelled": 0}
    assert {v["state"] for v in detail["variants"]} == {"queued", "running"}
    positions = ["vlm_analyze", "yolo_detect"]
    assert [t["stage"] for t in detail["tasks"]] == sorted((t["stage"] for t in detail["tasks"]), key=positions.index)
    [running] = [t for t in detail["tasks"] if t["status"] == "running"]
    assert running["id"] == held["id"] and running["lease_owner"] == "worker-under-test"
    assert datetime.fromisoformat(running["lease_expires_at"]) > datetime.fromisoformat(running["started_at"])
    plain = cli("status", job, env=env, check=True).stdout
    assert plain.splitlines()[0] == (f"job {job} tenant acme: open at vlm_analyze; variants: 1 queued, 1 running")
    assert "held by worker-under-test, lease ends in " in plain
    overview = as_json(cli("status", "--json", env=env))
    assert {r["status"]: r["n"] for r in overview["variants"]} == {"queued": 1, "running": 1}
    assert [w["id"] for w in overview["workers"]] == ["worker-under-test"]
    assert overview["workers"][0]["state"] == "unregistered" and overview["workers"][0]["tasks"] == 1


def test_replay_failed_one_task_or_one_tenant(conn, db_url, home):
    env = env_for(db_url, home)
    acme, _ = insert_job(conn, tenant="acme", variants=1)
    other, _ = insert_job(conn, tenant="other", variants=1)
    tasks = claim(conn, stages=["vlm_analyze"])
    for task in tasks:
        assert fail(conn, task, permanent=True) == "failed"
    by_job = {str(t["job_id"]): t["id"] for t in tasks}
    listed = as_json(cli("replay-failed", "--tenant", "acme", "--dry-run", "--json", env=env))
    assert [t["id"] for t in listed["tasks"]] == [by_job[acme]] and listed["dry_run"] is True
    one = as_json(cli("replay-failed", "--task", str(by_job[other]), "--json", env=env))
    assert [t["id"] for t in one["tasks"]] == [by_job[other]]
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (by_job[other],)).fetchone()["status"] == "queued"
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (by_job[acme],)).fetchone()["status"] == "failed"
    for args, code, text in ((("--task", "999999"), ExitCode.UNKNOWN_ID, "no task 999999"),
                             (("--task", str(by_job[acme]), "--tenant", "other"), ExitCode.UNKNOWN_ID, "of tenant other"),
                             (("--task", str(by_job[other])), ExitCode.BAD_INPUT, "is queued, not failed"),
                             (("--tenant", "../x"), ExitCode.BAD_INPUT, "tenant")):
        done = cli("replay-failed", *args, env=env)
        assert done.returncode == code and text in done.stderr, (args, done.returncode, done.stderr)


def test_submit_wait_and_watch_exit_1_when_one_variant_failed(conn, db_url, home, tiny_png, tmp_path):
    env = env_for(db_url, home)
    waiting = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "submit", str(tiny_png), "--copy", "Iced tea",
                                "--variants", "2", "--wait"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, **env})
    try:
        job = waiting.stdout.readline().strip()
        # Nobody works on it yet: fail variant 1 for good by hand, then let a worker do the rest.
        first = conn.execute("SELECT job_variants_id::text AS v FROM jobs_variants WHERE job_id = %s "
                             "AND creation_order = 1", (job,)).fetchone()["v"]
        task = wait_until(lambda: conn.execute("SELECT id FROM stage_tasks WHERE job_variants_id = %s", (first,)).fetchone(),
                          what="the first task")
        [claimed] = claim(conn, owner="by-hand", task_id=task["id"], stages=["vlm_analyze"])
        assert fail(conn, claimed, owner="by-hand", permanent=True) == "failed"
        worker = WorkerProcess(db_url, tmp_path / "w.log")
        try:
            out, err = waiting.communicate(timeout=90)
        finally:
            assert worker.stop() == 0
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == ExitCode.FAILED, out + err
    assert f"job {job} done in" in out and "but 1 of 2 variant(s) failed" in out
    watched = cli("watch", job[:8], "--json", env=env)
    assert watched.returncode == ExitCode.FAILED, watched.stderr
    final = json.loads(watched.stdout)
    assert final["status"] == "done" and final["failed_variants"] == 1 and final["variant_count"] == 2


def test_watch_says_when_no_live_worker_claims_its_stages_and_times_out(conn, db_url, home, tiny_png):
    env = env_for(db_url, home)
    job = as_json(cli("submit", str(tiny_png), "--copy", "Nobody home", "--json", env=env))["job_id"]
    done = cli("watch", job, "--timeout", "1", "--plain", env=env, timeout=60)
    assert done.returncode == ExitCode.TIMED_OUT, done.stdout + done.stderr
    assert "no live worker claims vlm_analyze" in done.stderr
    assert f"job {job} still open after 1 s (--timeout)" in done.stderr
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] != "cancelled"
    bad = cli("watch", job, "--timeout", "-1", env=env)
    assert bad.returncode == ExitCode.BAD_INPUT


def test_workers_list_shows_live_dead_and_stopped_workers(conn, db_url, home, tmp_path):
    env = env_for(db_url, home)
    survivor = WorkerProcess(db_url, tmp_path / "a.log", "--stages", "planner,overlay")
    victim = WorkerProcess(db_url, tmp_path / "b.log")
    try:
        for w in (survivor, victim):
            w.wait_ready()
        rows = {w["pid"]: w for w in as_json(cli("workers", "list", "--json", env=env))}
        assert set(rows) == {survivor.proc.pid, victim.proc.pid}
        assert all(w["alive"] and w["state"] == "alive" and w["tasks"] == 0 for w in rows.values())
        assert rows[survivor.proc.pid]["stages"] == ["overlay", "planner"]  # as it claims them: later first
        assert len(rows[victim.proc.pid]["stages"]) == 10
        datetime.fromisoformat(rows[victim.proc.pid]["started_at"])
        victim.signal(signal.SIGKILL)
        victim.proc.wait(30)
        dead = wait_until(lambda: [w for w in views.list_workers(conn) if w["pid"] == victim.proc.pid
                                   and w["state"] == "dead"], what="the killed worker listed as dead")
        assert dead[0]["alive"] is False and dead[0]["stopped_at"] is None
        plain = cli("workers", "list", env=env, check=True).stdout
        [line] = [ln for ln in plain.splitlines() if str(victim.proc.pid) in ln]
        assert "went quiet" in line
        assert "workers: 1 alive, 1 dead" in cli("status", env=env, check=True).stdout
    finally:
        assert survivor.stop() == 0
        victim.stop()
    rows = {w["pid"]: w for w in as_json(cli("workers", "list", "--json", env=env))}
    assert rows[survivor.proc.pid]["state"] == "stopped" and rows[survivor.proc.pid]["stopped_at"]
    assert survivor.proc.pid not in {w["pid"] for w in as_json(cli("workers", "list", "--json", "--stopped", "0s",
                                                                   env=env))}
    # prune forgets workers gone before its age, never a live one
    conn.execute("UPDATE workers SET started_at = now() - interval '40 days', "
                 "stopped_at = CASE WHEN stopped_at IS NULL THEN NULL ELSE now() - interval '40 days' END")
    pruned = as_json(cli("prune", "--older-than", "30d", "--json", env=env))
    assert pruned["workers"] == 2
    assert conn.execute("SELECT count(*) AS n FROM workers").fetchone()["n"] == 0


def test_a_database_behind_this_code_is_exit_4_with_the_fix(empty_db_url, home):
    from outbox import migrate

    migrate.upgrade(empty_db_url, "0003")
    env = env_for(empty_db_url, home)
    for args in (("jobs",), ("workers", "list"), ("status",)):
        done = cli(*args, env=env)
        assert done.returncode == ExitCode.DATABASE, (args, done.stderr)
        assert "run `cli.py db upgrade`" in done.stderr and "Traceback" not in done.stderr
    migrate.upgrade(empty_db_url)
    assert cli("workers", "list", "--json", env=env, check=True).stdout.strip() == "[]"


def test_a_lease_holder_that_never_registered_counts_as_claiming_its_stage(conn):
    job, _ = insert_job(conn, variants=2)
    assert views.unclaimed_stages(conn, job) == ["vlm_analyze"]
    claim(conn, owner="older-release", stages=["vlm_analyze"], limit=1)  # it heartbeats: it runs
    assert views.unclaimed_stages(conn, job) == []
    conn.execute("UPDATE stage_tasks SET lease_expires_at = now() - interval '1 s' WHERE status = 'running'")
    assert views.unclaimed_stages(conn, job) == ["vlm_analyze"]  # its lease ran out: not known to run
