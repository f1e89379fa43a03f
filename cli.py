#!/usr/bin/env python3
"""Command line of the ad-creative pipeline: database, jobs, workers, replays.

Without DATABASE_URL (or DB_HOST) every command uses the embedded PostgreSQL under ADFLOW_HOME,
starting it if no other command has.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List, Optional

import typer

from outbox import config, db
from outbox.jobs import InvalidInput, NotFound
from workers.cli import app as workers_app

app = typer.Typer(help="Polling-free pipeline engine on PostgreSQL for AI-generated ad creatives.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(workers_app, name="workers")

EXIT_INVALID, EXIT_NOT_FOUND, EXIT_DATABASE = 2, 3, 4


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit_codes():
    try:
        yield
    except (InvalidInput, config.ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except NotFound as exc:
        fail(str(exc), EXIT_NOT_FOUND)
    except (db.DatabaseUnavailable, db.NotMigrated) as exc:
        fail(str(exc), EXIT_DATABASE)
    except Exception as exc:
        from outbox.embedded import EmbeddedPostgresError

        if isinstance(exc, EmbeddedPostgresError):
            fail(str(exc), EXIT_DATABASE)
        raise


@contextmanager
def database(check_schema: bool = True):
    with errors_to_exit_codes():
        conn = db.connect(db.resolve_url())
        try:
            if check_schema:
                db.check_migrated(conn)
            yield conn
        finally:
            conn.close()


def emit_json(data) -> None:
    typer.echo(json.dumps(data, default=str, indent=2, ensure_ascii=False))


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Migrate the database to REVISION (default: head)."""
    from outbox import migrate

    with errors_to_exit_codes():
        url = db.resolve_url()
        db.connect(url).close()
        migrate.upgrade(url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Migrate the database down to REVISION (base removes everything)."""
    from outbox import migrate

    with errors_to_exit_codes():
        url = db.resolve_url()
        db.connect(url).close()
        migrate.downgrade(url, revision)
    typer.echo(f"database at {revision}")


@app.command()
def submit(
    images: List[Path] = typer.Argument(..., help="Candidate images: one variant each."),
    copy: str = typer.Option(..., "--copy", help="The ad copy (English)."),
    tenant: str = typer.Option("default", help="Tenant id."),
    variants: Optional[int] = typer.Option(None, min=1, max=64, help="Variant count (default: one per image; images repeat)."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job finishes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Submit a job: images + ad copy; its variants start at (img_gen, done)."""
    from outbox.artifacts import open_store
    from outbox.jobs import submit_job

    with database() as conn:
        with errors_to_exit_codes():
            job = submit_job(conn, open_store(), images, copy, tenant=tenant, variants=variants)
        if as_json:
            emit_json({"job_id": job.job_id, "variant_ids": job.variant_ids})
        else:
            typer.echo(job.job_id)
        if wait:
            status = follow_job(conn, job.job_id, quiet=as_json)
            raise typer.Exit(0 if status == "done" else 1)


@app.command()
def status(job: Optional[str] = typer.Argument(None, help="A job id for its detail."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Jobs, variants, per-stage counts, oldest queued age, failures with their errors."""
    from outbox.jobs import job_detail, overview

    with database() as conn:
        with errors_to_exit_codes():
            data = job_detail(conn, job) if job else overview(conn)
    if as_json:
        emit_json(data)
    elif job:
        print_job(data)
    else:
        print_overview(data)


def follow_job(conn, job_id: str, quiet: bool = False) -> str:
    """Prints each state change of the job until it finishes; returns its final status."""
    from outbox.watch import watch_job

    status = "running"
    for event in watch_job(conn, job_id):
        payload = event["payload"]
        status = payload["status"]
        if quiet or event["channel"] == "snapshot":
            continue
        who = f"variant {payload['job_variants_id'][:8]}" if "job_variants_id" in payload else "job"
        typer.echo(f"{who}: {payload['current_step']} {payload['status']}")
    return status


def print_overview(data: dict) -> None:
    counts = lambda rows: ", ".join(f"{r['status']} {r['n']}" for r in rows) or "none"
    typer.echo(f"jobs: {counts(data['jobs'])}")
    typer.echo(f"variants: {counts(data['variants'])}")
    typer.echo(f"{'stage':<20}{'level':<9}{'device':<8}{'queued':>7}{'running':>8}{'done':>7}{'failed':>7}  oldest queued")
    for r in data["stages"]:
        age = f"{r['oldest_queued_s']:.1f} s" if r["oldest_queued_s"] is not None else "-"
        typer.echo(f"{r['stage']:<20}{r['level']:<9}{r['device']:<8}{r['queued']:>7}{r['running']:>8}"
                   f"{r['done']:>7}{r['failed']:>7}  {age}")
    if data["failures"]:
        typer.echo("recent failures:")
        for f in data["failures"]:
            subject = f"variant {f['variant_id']}" if f["variant_id"] else f"job {f['job_id']}"
            typer.echo(f"  task {f['id']} {f['stage']} {subject} after {f['attempts']} attempt(s): {f['last_error']}")


def print_job(job: dict) -> None:
    typer.echo(f"job {job['job_id']} tenant {job['tenant_id']}: {job['current_step']} {job['status']}")
    for v in job["variants"]:
        typer.echo(f"  variant {v['creation_order']} {v['variant_id']}: {v['current_step']} {v['status']}")
    for t in job["tasks"]:
        subject = f"variant {t['variant_id'][:8]}" if t["variant_id"] else "job"
        took = (f"{(t['finished_at'] - t['started_at']).total_seconds():.2f} s"
                if t["finished_at"] and t["started_at"] else "")
        error = f"  error: {t['last_error']}" if t["last_error"] and t["status"] != "done" else ""
        typer.echo(f"  {t['stage']:<20}{subject:<18}{t['status']:<10}attempts {t['attempts']}/{t['max_attempts']} {took}{error}")


def parse_since(value: str | None) -> datetime | None:
    """An ISO timestamp or an age like 30m, 2h, 7d."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].isdigit():
        return datetime.now(timezone.utc) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"--since {value!r}: give an ISO time (2026-11-23T10:00) or an age (30m, 2h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@app.command("replay-failed")
def replay_failed(
    job: Optional[str] = typer.Option(None, help="Only this job."),
    stage: Optional[str] = typer.Option(None, help="Only this stage."),
    since: Optional[str] = typer.Option(None, help="Only failures since (ISO time or age: 30m, 2h, 7d)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be replayed; change nothing."),
) -> None:
    """Put failed tasks back in the queue, attempts reset."""
    from outbox import queue
    from outbox.jobs import validate_uuid

    with database() as conn:
        with errors_to_exit_codes():
            job_id = validate_uuid(job, "job id") if job else None
            if stage and not conn.execute("SELECT 1 FROM stage_graph WHERE stage = %s", (stage,)).fetchone():
                raise InvalidInput(f"unknown stage {stage!r}")
            rows = queue.replay_failed(conn, job_id, stage, parse_since(since), dry_run)
    verb = "would replay" if dry_run else "replayed"
    for row in rows:
        typer.echo(f"{verb} task {row['id']} {row['stage']} "
                   f"{'variant ' + str(row['job_variants_id']) if row['job_variants_id'] else 'job ' + str(row['job_id'])}: "
                   f"{(row['last_error'] or '').splitlines()[0][:120] if row['last_error'] else ''}")
    typer.echo(f"{verb} {len(rows)} task(s)")


@app.command("run-stage")
def run_stage(
    subject: str = typer.Argument(..., metavar="VARIANT_OR_JOB", help="Variant id (variant stages) or job id (job stages)."),
    stage: str = typer.Argument(..., help="Stage name."),
    models: Optional[str] = typer.Option(None, help="Model profile: real or tiny."),
    registry: str = typer.Option(None, help="module:function that builds the stage registry."),
) -> None:
    """Run one stage now, in this process (also when ENABLE_JOB_STATE_LISTENER=false)."""
    import asyncio

    from outbox import queue
    from outbox.artifacts import open_store
    from outbox.jobs import find_task
    from workers.cli import DEFAULT_REGISTRY, load_registry
    from workers.logs import setup_logging
    from workers.runner import TaskRunner
    from workers.worker import Worker, WorkerSettings

    setup_logging("run-stage")
    with database() as conn:
        with errors_to_exit_codes():
            task = find_task(conn, subject, stage)
            if task["status"] == "done":
                raise InvalidInput(f"{stage} already done for {subject}: its result is committed")
            if task["status"] == "running":
                raise InvalidInput(f"{stage} for {subject} is running on a worker now")
            if task["status"] == "cancelled":
                raise InvalidInput(f"{stage} for {subject} was cancelled")
            if task["status"] == "failed":
                queue.replay_failed(conn, task_id=task["id"])
            conn.execute("UPDATE stage_tasks SET run_after = now() WHERE id = %s AND status = 'queued'", (task["id"],))
        url = db.resolve_url()
    built = load_registry(registry or os.environ.get("STAGE_REGISTRY", DEFAULT_REGISTRY), models, "cpu")
    if built[stage].warm:
        built[stage].warm()
    worker = Worker(WorkerSettings(url=url, stages=[stage], concurrency=1), built, TaskRunner(open_store(), config.asset_root()))
    outcome = asyncio.run(worker.run_task(task["id"]))
    typer.echo(f"{stage} for {subject}: {outcome}")
    raise typer.Exit(0 if outcome == "done" else 1)


if __name__ == "__main__":
    app(prog_name="cli.py")
