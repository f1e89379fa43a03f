"""cli.py as a user runs it: exit codes and messages for bad input, unknown ids, a database that
cannot be reached or is not migrated; and the commands' happy paths."""
from __future__ import annotations

import json

from tests.conftest import ROOT, cli


def env_for(db_url, home):
    return {"DATABASE_URL": db_url, "ADFLOW_HOME": str(home)}


def test_help_lists_the_commands_and_imports_no_ml_library():
    done = cli("--help", check=True)  # its time: bench/cli_startup.py
    assert "replay-failed" in done.stdout and "run-stage" in done.stdout
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import cli, sys; print(sorted(m for m in ('torch', 'transformers', "
                            "'ultralytics') if m in sys.modules))"], capture_output=True, text=True, cwd=ROOT)
    assert probe.stdout.strip() == "[]"


def test_unreachable_database_is_a_clear_error():
    done = cli("status", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert done.returncode == 4
    assert "cannot connect to PostgreSQL at 127.0.0.1:1/none" in done.stderr
    done = cli("status", env={"DATABASE_URL": "mysql://x@y/z"})
    assert done.returncode == 2 and "postgresql://" in done.stderr


def test_database_not_migrated(empty_db_url, home):
    url = empty_db_url
    done = cli("status", env=env_for(url, home))
    assert done.returncode == 4 and "cli.py db upgrade" in done.stderr
    assert cli("db", "upgrade", env=env_for(url, home)).returncode == 0
    assert cli("status", env=env_for(url, home)).returncode == 0


def test_submit_status_replay_cancel_round_trip(db_url, home, tiny_png):
    env = env_for(db_url, home)
    done = cli("submit", str(tiny_png), str(tiny_png), "--copy", "Fresh coffee", "--tenant", "acme", "--json", env=env)
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert len(job["variant_ids"]) == 2
    status = json.loads(cli("status", job["job_id"], "--json", env=env, check=True).stdout)
    assert status["tenant_id"] == "acme" and [t["stage"] for t in status["tasks"]] == ["vlm_analyze", "vlm_analyze"]
    overview = cli("status", env=env, check=True).stdout
    assert "vlm_analyze" in overview and "queued" in overview
    dry = cli("replay-failed", "--dry-run", env=env, check=True)
    assert "would replay 0 task(s)" in dry.stdout
    assert cli("cancel", job["job_id"], env=env, check=True).stdout.startswith(f"job {job['job_id']} cancelled")
    again = cli("cancel", job["job_id"], env=env)
    assert again.returncode == 0 and "already cancelled; nothing to do" in again.stdout


def test_bad_arguments_and_unknown_ids(db_url, home, tiny_png, tmp_path):
    env = env_for(db_url, home)
    cases = [
        (("submit", str(tmp_path / "missing.png"), "--copy", "x"), 2, "image file not found"),
        (("submit", str(tiny_png), "--copy", "   "), 2, "ad copy is empty"),
        (("submit", str(tiny_png), "--copy", "x", "--tenant", "../etc"), 2, "invalid tenant id"),
        (("status", "not-a-uuid"), 2, "is not a UUID"),
        (("status", "00000000-0000-0000-0000-000000000000"), 3, "no job"),
        (("cancel", "00000000-0000-0000-0000-000000000000"), 3, "no job"),
        (("run-stage", "00000000-0000-0000-0000-000000000000", "planner"), 3, "no variant"),
        (("run-stage", "00000000-0000-0000-0000-000000000000", "paint"), 2, "unknown stage"),
        (("replay-failed", "--stage", "paint"), 2, "unknown stage"),
        (("replay-failed", "--since", "yesterday"), 2, "--since"),
        (("prune", "--older-than", "soon"), 2, "age"),
    ]
    for args, code, text in cases:
        done = cli(*args, env=env)
        assert done.returncode == code, (args, done.returncode, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_run_stage_by_hand_with_the_listener_switched_off(db_url, home, tiny_png):
    env = {**env_for(db_url, home), "ENABLE_JOB_STATE_LISTENER": "false",
           "STAGE_REGISTRY": "tests.engine_stages:build_registry"}
    job = json.loads(cli("submit", str(tiny_png), "--copy", "x", "--json", env=env, check=True).stdout)
    [variant] = job["variant_ids"]
    done = cli("run-stage", variant, "vlm_analyze", env=env)
    assert done.returncode == 0, done.stderr
    assert "vlm_analyze for" in done.stdout and "done" in done.stdout
    again = cli("run-stage", variant, "vlm_analyze", env=env)
    assert again.returncode == 2 and "already done" in again.stderr
    early = cli("run-stage", variant, "planner", env=env)
    assert early.returncode == 2 and "not enqueued" in early.stderr
    assert cli("run-stage", variant, "yolo_detect", env=env).returncode == 0


def test_prune_dry_run_reports(db_url, home):
    done = cli("prune", "--older-than", "30d", "--dry-run", env=env_for(db_url, home), check=True)
    assert "would remove 0 job(s)" in done.stdout
