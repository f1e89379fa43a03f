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


@db_app.command("check")
def db_check(wait: float = typer.Option(0.0, min=0.0, help="Seconds to wait for the migration to land (a pod's "
                                        "init container waits for the migration Job).")) -> None:
    """Exit 0 when the database is at this code's head revision (or a newer one), else 4."""
    import time

    from outbox import migrate

    with errors_to_exit_codes():
        url = db.resolve_url()
    deadline = time.monotonic() + wait
    while True:
        try:
            state, current, heads = migrate.check_schema(url)
        except Exception as exc:  # unreachable: the same as not migrated yet while we may wait
            state, current, heads = "unreachable", [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__], []
        if state in ("head", "ahead"):
            typer.echo(f"database at {','.join(current)} ({state})")
            return
        if time.monotonic() >= deadline:
            fail(f"database schema {state} ({', '.join(current) or 'no revision'}; this code needs "
                 f"{','.join(heads) or 'head'}): run `cli.py db upgrade`", EXIT_DATABASE)
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


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
    from stages.imaging import image_mime  # Pillow and numpy only, never ultralytics

    with database() as conn:
        with errors_to_exit_codes():
            job = submit_job(conn, open_store(), images, copy, tenant=tenant, variants=variants,
                             check_image=image_mime)
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


def follow_job(conn, job_id: str, quiet: bool = False, plain: bool = False) -> str:
    """Shows the job's progress live until it finishes (rich bars on a terminal, plain lines on a
    pipe; on stderr when quiet, so stdout keeps only the JSON); returns its final status."""
    import sys

    from console.progress import error_lookup, follow_job as follow, make_renderer

    lookup = error_lookup(lambda: db.connect(db.resolve_url()))
    try:
        progress = follow(conn, job_id, make_renderer(sys.stderr if quiet else sys.stdout, plain or None), lookup)
    finally:
        lookup.close()
    return progress.final_status


@app.command()
def watch(job: Optional[str] = typer.Argument(None, help="Job id (default: the newest job)."),
          plain: bool = typer.Option(False, "--plain", help="Plain lines even on a terminal.")) -> None:
    """Follow a job live: per-variant stage progress, durations, failures.

    Driven by LISTEN on job_variant_state_changed / job_state_changed, not by polling: rich
    progress bars on a terminal, plain lines on a pipe. Exit 0 when the job is done, 1 when it
    failed or was cancelled."""
    from outbox.report import latest_job_id

    with database() as conn:
        with errors_to_exit_codes():
            status = follow_job(conn, job or latest_job_id(conn), plain=plain)
    raise typer.Exit(0 if status == "done" else 1)


@app.command()
def report(job: str = typer.Argument(..., help="Job id, or 'latest' for the newest job."),
           output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                 help="HTML file to write (default: ADFLOW_HOME/reports/job-<id>.html; - for stdout).")) -> None:
    """Write a job's report: one self-contained HTML file.

    Per variant the original, the detections, the text placement, the overlay, every score with
    pass/fail and the stage timeline; the chosen variant and why; the Instagram post in a
    phone-sized preview with its Korean caption."""
    from outbox.artifacts import open_store
    from outbox.report import asset_reader, gather, latest_job_id
    from console.report import render_report

    with database() as conn:
        with errors_to_exit_codes():
            data = gather(conn, latest_job_id(conn) if job == "latest" else job)
            # The job's tenant: the report reads only that tenant's keys, like the worker.
            page = render_report(data, asset_reader(open_store(), config.asset_root(), data["job"]["tenant_id"]))
    if output is not None and str(output) == "-":
        typer.echo(page)
        return
    path = output or config.home_dir() / "reports" / f"job-{data['job']['job_id']}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    typer.echo(str(path))


@app.command()
def demo(
    workers: int = typer.Option(2, min=1, max=16, help="Worker processes to start."),
    concurrency: int = typer.Option(4, min=1, max=64, help="Tasks in flight per worker process."),
    models: Optional[str] = typer.Option(None, help="Model profile: tiny or real (default: tiny, unless MODEL_PROFILE "
                                                    "is set or VLM_MODEL / YOLO_MODEL / TRANSLATION_MODEL name real weights)."),
    copy: Optional[str] = typer.Option(None, "--copy", help="The English ad copy (default: the demo's)."),
    plain: bool = typer.Option(False, "--plain", help="Plain progress lines even on a terminal."),
) -> None:
    """Run a whole demo ad job on this machine (what `make run` does).

    Embedded PostgreSQL (without DATABASE_URL), migrations, three generated sample images, worker
    processes, live progress; ends by printing where the Instagram post and the HTML report are."""
    import sys

    from console.demo import run_demo

    if models is not None and models not in ("tiny", "real"):
        fail(f"--models {models!r}: use tiny or real", EXIT_INVALID)
    with errors_to_exit_codes():
        code = run_demo(sys.stdout, workers, concurrency, models, copy, plain or None)
    raise typer.Exit(code)


def print_overview(data: dict) -> None:
    counts = lambda rows: ", ".join(f"{r['status']} {r['n']}" for r in rows) or "none"
    typer.echo(f"jobs: {counts(data['jobs'])}")
    typer.echo(f"variants: {counts(data['variants'])}")
    typer.echo(f"{'stage':<20}{'level':<9}{'device':<8}{'queued':>7}{'running':>8}{'done':>7}{'failed':>7}  oldest queued")
    for r in data["stages"]:
        age = f"{r['oldest_queued_s']:.1f} s" if r["oldest_queued_s"] is not None else "-"
        typer.echo(f"{r['stage']:<20}{r['level']:<9}{r['device']:<8}{r['queued']:>7}{r['running']:>8}"
                   f"{r['done']:>7}{r['failed']:>7}  {age}")
    if data["open_variant_sets"]:
        typer.echo("jobs waiting for their variant set to close (the generator writes the job at (img_gen, done), "
                   "or sets expected_variants):")
        for j in data["open_variant_sets"]:
            expected = f" of {j['expected_variants']} expected" if j["expected_variants"] else ""
            typer.echo(f"  job {j['job_id']} tenant {j['tenant_id']}: {j['variants']} variant(s){expected}, "
                       f"{j['finished']} finished, open for {j['age_s']:.0f} s")
    if data["failures"]:
        typer.echo("recent failures:")
        for f in data["failures"]:
            subject = f"variant {f['variant_id']}" if f["variant_id"] else f"job {f['job_id']}"
            typer.echo(f"  task {f['id']} {f['stage']} {subject} after {f['attempts']} attempt(s): {f['last_error']}")


def print_job(job: dict) -> None:
    typer.echo(f"job {job['job_id']} tenant {job['tenant_id']}: {job['current_step']} {job['status']}")
    if job["variants_closed_at"] is None and job["status"] not in ("failed", "cancelled"):
        typer.echo("  variant set open: the fan-in waits until the generator writes the job at (img_gen, done)"
                   + (f" or its {job['expected_variants']} expected variants exist" if job["expected_variants"] else ""))
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
    if value[-1:] in AGE_UNITS and value[:-1].isdigit():
        return datetime.now(timezone.utc) - parse_age(value)
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


@app.command()
def cancel(job: str = typer.Argument(..., help="The job id.")) -> None:
    """Cancel a job: queued tasks end cancelled, running ones are not committed, nothing new starts."""
    from outbox.jobs import cancel_job

    with database() as conn:
        with errors_to_exit_codes():
            done = cancel_job(conn, job)
    if done.already:
        typer.echo(f"job {job} was already cancelled; nothing to do"
                   + (f" ({done.tasks} leftover task(s) cancelled now)" if done.tasks else ""))
    else:
        typer.echo(f"job {job} cancelled ({done.tasks} task(s) cancelled)")


AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(value: str) -> timedelta:
    if value[-1:] in AGE_UNITS and value[:-1].isdigit():
        return timedelta(seconds=int(value[:-1]) * AGE_UNITS[value[-1]])
    raise InvalidInput(f"age {value!r}: give a number and a unit, e.g. 90m, 12h, 30d")


@app.command()
def prune(
    older_than: str = typer.Option("30d", help="Age of finished jobs to delete (e.g. 12h, 30d)."),
    batch: int = typer.Option(1000, min=1, max=100000, help="Jobs per transaction."),
    include_failed: bool = typer.Option(False, "--include-failed", help="Delete failed jobs too."),
    orphan_grace: str = typer.Option("1h", help="Orphan artifacts younger than this are kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
) -> None:
    """Delete finished jobs' tasks, results and artifacts in small batches, and orphan artifacts."""
    from outbox.artifacts import open_store
    from outbox.retention import prune as run_prune

    with database() as conn:
        with errors_to_exit_codes():
            report = run_prune(conn, open_store(), parse_age(older_than), batch, include_failed, dry_run,
                               parse_age(orphan_grace))
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {report.jobs} job(s), {report.assets} image asset(s), {report.artifacts} artifact(s) "
               f"in {report.batches} batch(es); {report.orphans} orphan artifact(s)")


if __name__ == "__main__":
    app(prog_name="cli.py")
