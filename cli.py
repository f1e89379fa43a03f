#!/usr/bin/env python3
"""Command line of the ad-creative pipeline: database, jobs, workers, replays.

Without DATABASE_URL (or DB_HOST) every command uses the embedded PostgreSQL under ADFLOW_HOME,
starting it if no other command has. Every command that takes a job takes its id, a unique prefix
of it (4+ hex digits) or `latest`; every command that prints data prints JSON with --json; exit
codes follow console/exitcodes.py (README, "Commands"); errors go to stderr.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional

import typer

from console.exitcodes import ExitCode
from outbox import config, db
from outbox import graph as stage_graph
from outbox.jobs import InvalidInput, NotFound
from outbox.views import parse_age
from workers.cli import app as workers_app

app = typer.Typer(help="Polling-free pipeline engine on PostgreSQL for AI-generated ad creatives.",
                  no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(workers_app, name="workers")

EXIT_INVALID, EXIT_NOT_FOUND, EXIT_DATABASE = ExitCode.BAD_INPUT, ExitCode.UNKNOWN_ID, ExitCode.DATABASE


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adflow")
    except PackageNotFoundError:  # run from a checkout that was never installed
        import tomllib

        return tomllib.loads((config.PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"adflow {package_version()}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Polling-free pipeline engine on PostgreSQL for AI-generated ad creatives."""


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit_codes():
    """The exit-code rule for what the engine raises (console/exitcodes.py), with the message
    on stderr and no traceback."""
    import psycopg

    from outbox.views import AmbiguousJob
    from outbox.watch import WatchTimeout

    try:
        yield
    except (InvalidInput, config.ConfigError, AmbiguousJob) as exc:
        fail(str(exc), ExitCode.BAD_INPUT)
    except NotFound as exc:
        fail(str(exc), ExitCode.UNKNOWN_ID)
    except WatchTimeout as exc:
        fail(str(exc), ExitCode.TIMED_OUT)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction) as exc:
        # A database migrated by an older release: this code reads what a later migration adds.
        fail(f"the database schema is older than this code ({exc.diag.message_primary}): run `cli.py db upgrade`",
             ExitCode.DATABASE)
    except (db.DatabaseUnavailable, db.NotMigrated, psycopg.OperationalError) as exc:
        from outbox.errors import describe_error

        fail(str(exc) if isinstance(exc, (db.DatabaseUnavailable, db.NotMigrated)) else
             f"lost the database: {describe_error(exc)}", ExitCode.DATABASE)
    except Exception as exc:
        from outbox.embedded import EmbeddedPostgresError

        if isinstance(exc, EmbeddedPostgresError):
            fail(str(exc), ExitCode.DATABASE)
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
    """JSON on stdout, timestamps in ISO 8601."""
    from outbox.views import jsonable

    typer.echo(json.dumps(jsonable(data), default=str, indent=2, ensure_ascii=False))


def resolve(conn, ref: str, tenant: str | None = None) -> str:
    """A job's full id from what a user typed: an id, a unique prefix or `latest`."""
    from outbox.views import resolve_job

    with errors_to_exit_codes():
        return resolve_job(conn, ref, tenant)


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
            with errors_to_exit_codes():
                progress = follow_job(conn, job.job_id, quiet=as_json)
            raise typer.Exit(progress.exit_code)


@app.command()
def status(job: Optional[str] = typer.Argument(None, help="A job (id, unique prefix or 'latest') for its detail."),
           tenant: Optional[str] = typer.Option(None, help="With 'latest': the newest job of this tenant."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON (ISO 8601 timestamps).")) -> None:
    """Jobs and variants by their state, per-stage counts, oldest queued age, workers, failures;
    with JOB: where it is, its variants, and its tasks in pipeline order with lease owner and expiry."""
    from outbox import views
    from outbox.views import overview

    with database() as conn:
        with errors_to_exit_codes():
            if job:
                data = views.job_detail(conn, resolve(conn, job, tenant))
            else:
                data = overview(conn)
                data["workers"] = views.list_workers(conn)
    if as_json:
        emit_json(data)
    elif job:
        print_job(data)
    else:
        print_overview(data)


@app.command()
def jobs(
    tenant: Optional[str] = typer.Option(None, help="Only this tenant's jobs."),
    status: Optional[str] = typer.Option(None, help="Only jobs in this state: open, done, failed or cancelled."),
    stage: Optional[str] = typer.Option(None, help="Only jobs with a task of this stage queued, running or failed."),
    since: Optional[str] = typer.Option(None, help="Only jobs created since (ISO time or age: 30m, 2h, 7d)."),
    limit: int = typer.Option(50, min=1, max=1000, help="At most this many jobs."),
    offset: int = typer.Option(0, min=0, help="Skip this many of the newest first (paging)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (ISO 8601 timestamps)."),
) -> None:
    """List jobs, the newest first, with short ids (any command takes one, or a longer prefix)."""
    from outbox import views

    with database() as conn:
        with errors_to_exit_codes():
            since_at = parse_since(since)
            since_s = None
            if since_at is not None:
                since_s = (datetime.now(timezone.utc) - since_at).total_seconds()
                if since_s <= 0:
                    raise InvalidInput(f"--since {since!r} is in the future")
            rows = views.list_jobs(conn, tenant=tenant, status=status, stage=stage, since_s=since_s,
                                   limit=limit, offset=offset)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no jobs match" if any((tenant, status, stage, since, offset)) else
                   "no jobs yet: submit one with `cli.py submit` (or run `cli.py demo`)", err=True)
        return
    now = datetime.now(timezone.utc)
    typer.echo(f"{'job':<10}{'tenant':<16}{'state':<11}{'step':<20}{'variants':<28}created")
    for r in rows:
        counts = r["variants_by_state"]
        summary = f"{counts['done']}/{r['variants']} done" + "".join(
            f", {counts[k]} {k}" for k in ("running", "queued", "failed", "cancelled") if counts[k])
        typer.echo(f"{r['short_id']:<10}{r['tenant_id'][:15]:<16}{r['status']:<11}{r['current_step'] or '-':<20}"
                   f"{summary:<28}{ago(r['created_at'], now)}")


@workers_app.command("list")
def workers_list(as_json: bool = typer.Option(False, "--json", help="Print JSON (ISO 8601 timestamps)."),
                 stopped: str = typer.Option("1h", help="Also show workers that stopped within this age.")) -> None:
    """Every worker: alive ones, dead ones (registered, no connection left), recently stopped ones
    and lease owners that never registered; with the tasks each holds and their nearest lease expiry."""
    from outbox import views

    with database() as conn:
        with errors_to_exit_codes():
            rows = views.list_workers(conn, stopped_within_s=parse_age(stopped).total_seconds())
            every_stage = set(views.steps(conn))
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no workers: start one with `cli.py workers start`", err=True)
        return
    now = datetime.now(timezone.utc)
    typer.echo(f"{'worker':<36}{'state':<13}{'host':<20}{'pid':>7}  {'tasks':>5}  {'lease ends':<12}"
               f"{'last seen':<12}stages")
    for w in rows:
        stages = "all" if set(w["stages"] or ()) == every_stage else ",".join(w["stages"] or ())
        state = "went quiet" if w["state"] == "dead" else w["state"]
        typer.echo(f"{w['id'][:35]:<36}{state:<13}{(w['host'] or '-')[:19]:<20}{w['pid'] or '-':>7}  {w['tasks']:>5}  "
                   f"{ago(w['lease_expires_at'], now) if w['lease_expires_at'] else '-':<12}"
                   f"{ago(w['last_seen'], now) if w['last_seen'] else '-':<12}{stages}")


def follow_job(conn, job_id: str, quiet: bool = False, plain: bool = False, wait_s: float | None = None):
    """Shows the job's progress live until it finishes (rich bars on a terminal, plain lines on a
    pipe; on stderr when quiet, so stdout keeps only the JSON); returns its JobProgress, whose
    exit_code is the command's."""
    import sys

    from console.progress import error_lookup, follow_job as follow, make_renderer

    lookup = error_lookup(lambda: db.connect(db.resolve_url()))
    try:
        progress = follow(conn, job_id, make_renderer(sys.stderr if quiet else sys.stdout, plain or None), lookup,
                          wait_s=wait_s)
    finally:
        lookup.close()
    return progress


@app.command()
def watch(job: str = typer.Argument("latest", help="Job id, unique prefix or 'latest' (the default)."),
          tenant: Optional[str] = typer.Option(None, help="With 'latest': the newest job of this tenant."),
          plain: bool = typer.Option(False, "--plain", help="Plain lines even on a terminal."),
          timeout: Optional[float] = typer.Option(None, "--timeout", min=0.0,
                                                  help="Give up after this many seconds (exit 5); the job goes on."),
          as_json: bool = typer.Option(False, "--json", help="Progress on stderr; the final job detail as JSON on stdout."),
) -> None:
    """Follow a job live: per-variant stage progress, durations, failures.

    Driven by LISTEN on job_variant_state_changed / job_state_changed, not by polling: rich
    progress bars on a terminal, plain lines on a pipe. Says so when no live worker claims a stage
    the job waits on. Exit 0 when the job is done with every variant, 1 when it or a variant failed
    or it was cancelled, 5 when --timeout ran out."""
    from outbox import views

    with database() as conn:
        job_id = resolve(conn, job, tenant)
        with errors_to_exit_codes():
            progress = follow_job(conn, job_id, quiet=as_json, plain=plain, wait_s=timeout)
            if as_json:
                with database() as fresh:  # the watch's own connection may have been replaced
                    emit_json(views.job_detail(fresh, job_id))
    raise typer.Exit(progress.exit_code)


@app.command()
def report(job: str = typer.Argument(..., help="Job id, unique prefix or 'latest' for the newest job."),
           output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                 help="HTML file to write, in an existing directory (default: "
                                                      "ADFLOW_HOME/reports/job-<id>.html; - for stdout)."),
           tenant: Optional[str] = typer.Option(None, help="With 'latest': the newest job of this tenant."),
           as_json: bool = typer.Option(False, "--json", help="Print {job_id, path} as JSON.")) -> None:
    """Write a job's report: one self-contained HTML file.

    Per variant the original, the detections, the text placement, the overlay, every score with
    pass/fail and the stage timeline; the chosen variant and why; the Instagram post in a
    phone-sized preview with its Korean caption."""
    from outbox.artifacts import open_store
    from outbox.report import asset_reader, gather
    from console.report import render_report

    to_stdout = output is not None and str(output) == "-"
    if output is not None and not to_stdout:
        # -o names a file, never a place to build: a typo in a directory name must not leave a
        # tree of new folders behind. Only the default folder under ADFLOW_HOME is created.
        if output.is_dir():
            fail(f"-o {output}: that is a directory; name the file to write", ExitCode.BAD_INPUT)
        if not output.parent.is_dir():
            fail(f"-o {output}: directory {output.parent} does not exist (create it first)", ExitCode.BAD_INPUT)
    with database() as conn:
        job_id = resolve(conn, job, tenant)
        with errors_to_exit_codes():
            data = gather(conn, job_id)
            # The job's tenant: the report reads only that tenant's keys, like the worker.
            page = render_report(data, asset_reader(open_store(), config.asset_root(), data["job"]["tenant_id"]))
    if to_stdout:
        typer.echo(page)
        return
    path = output
    if path is None:
        path = config.home_dir() / "reports" / f"job-{data['job']['job_id']}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror or exc}", ExitCode.BAD_INPUT)
    if as_json:
        emit_json({"job_id": data["job"]["job_id"], "path": str(path)})
    else:
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
        fail(f"--models {models!r}: use tiny or real", ExitCode.BAD_INPUT)
    with errors_to_exit_codes():
        code = run_demo(sys.stdout, workers, concurrency, models, copy, plain or None, err=sys.stderr)
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
    workers = data.get("workers", [])
    alive = sum(1 for w in workers if w["alive"])
    dead = sum(1 for w in workers if w["state"] == "dead")
    typer.echo(f"workers: {alive} alive" + (f", {dead} dead (registered, no connection left)" if dead else "")
               + " (cli.py workers list)")
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


def ago(when, now=None) -> str:
    """A timestamp as a short age or countdown: "12 s ago", "in 25 s"."""
    if when is None:
        return "-"
    seconds = ((now or datetime.now(timezone.utc)) - when).total_seconds()
    amount = abs(seconds)
    text = (f"{amount:.0f} s" if amount < 120 else f"{amount / 60:.0f} min" if amount < 7200
            else f"{amount / 3600:.0f} h" if amount < 172800 else f"{amount / 86400:.0f} d")
    return f"{text} ago" if seconds >= 0 else f"in {text}"


def variant_counts(counts: dict) -> str:
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none"


def print_job(job: dict) -> None:
    where = f" at {job['current_step']}" if job["status"] == "open" else ""
    typer.echo(f"job {job['job_id']} tenant {job['tenant_id']}: {job['status']}{where}; "
               f"variants: {variant_counts(job['variants_by_state'])}"
               + (f" ({job['failed_variants']} of {job['variant_count']} failed)" if job["failed_variants"] else ""))
    if job["variants_closed_at"] is None and job["status"] == "open":
        typer.echo("  variant set open: the fan-in waits until the generator writes the job at (img_gen, done)"
                   + (f" or its {job['expected_variants']} expected variants exist" if job["expected_variants"] else ""))
    for v in job["variants"]:
        typer.echo(f"  variant {v['creation_order']} {v['variant_id']}: {v['state']} (at {v['current_step']} {v['status']})")
    for t in job["tasks"]:
        subject = f"variant {t['creation_order']}" if t["variant_id"] else "job"
        took = (f"{(t['finished_at'] - t['started_at']).total_seconds():.2f} s"
                if t["finished_at"] and t["started_at"] else "")
        lease = (f"  held by {t['lease_owner']}, lease ends {ago(t['lease_expires_at'])}"
                 if t["status"] == "running" and t["lease_owner"] else "")
        error = f"  error: {t['last_error']}" if t["last_error"] and t["status"] != "done" else ""
        typer.echo(f"  {t['stage']:<20}{subject:<12}{t['status']:<10}attempts {t['attempts']}/{t['max_attempts']} "
                   f"{took}{lease}{error}")


def parse_since(value: str | None) -> datetime | None:
    """An ISO timestamp or an age like 30m, 2h, 7d."""
    if not value:
        return None
    try:
        return datetime.now(timezone.utc) - parse_age(value)
    except InvalidInput:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"--since {value!r}: give an ISO time (2026-11-23T10:00) or an age (30m, 2h, 7d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


@app.command("replay-failed")
def replay_failed(
    job: Optional[str] = typer.Option(None, help="Only this job (id, unique prefix or 'latest')."),
    task: Optional[int] = typer.Option(None, "--task", min=1, help="Only this task (its id, from status or --dry-run)."),
    tenant: Optional[str] = typer.Option(None, help="Only this tenant's jobs."),
    stage: Optional[str] = typer.Option(None, help="Only this stage."),
    since: Optional[str] = typer.Option(None, help="Only failures since (ISO time or age: 30m, 2h, 7d)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be replayed; change nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the tasks as JSON."),
) -> None:
    """Put failed tasks back in the queue, attempts reset."""
    from outbox import queue
    from outbox.jobs import validate_tenant

    with database() as conn:
        job_id = resolve(conn, job, tenant) if job else None
        with errors_to_exit_codes():
            if tenant is not None:
                validate_tenant(tenant)
            if stage and stage not in (graph := stage_graph.read(conn)):
                raise InvalidInput(f"unknown stage {stage!r}; stages are: {', '.join(graph.names())}")
            if task is not None:
                found = conn.execute("SELECT t.status, j.tenant_id FROM stage_tasks t JOIN jobs j ON j.job_id = t.job_id "
                                     "WHERE t.id = %s", (task,)).fetchone()
                if found is None or (tenant is not None and found["tenant_id"] != tenant):
                    raise NotFound(f"no task {task}" + (f" of tenant {tenant}" if tenant else ""))
                if found["status"] != "failed":
                    raise InvalidInput(f"task {task} is {found['status']}, not failed: nothing to replay")
            rows = queue.replay_failed(conn, job_id, stage, parse_since(since), dry_run, task_id=task, tenant=tenant)
    if as_json:
        emit_json({"dry_run": dry_run, "tasks": rows})
        return
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
        graph = stage_graph.read(conn)
        if stage in graph and graph.get(stage).level == "job":
            subject = resolve(conn, subject)  # a job stage's subject is a job: a prefix or latest will do
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
    raise typer.Exit(ExitCode.OK if outcome == "done" else ExitCode.FAILED)


@app.command()
def cancel(job: str = typer.Argument(..., help="The job: id, unique prefix or 'latest'."),
           as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON.")) -> None:
    """Cancel a job: queued tasks end cancelled, running ones are not committed, nothing new starts.
    A job already cancelled is a no-op that says so (exit 0)."""
    from outbox.jobs import cancel_job

    with database() as conn:
        job_id = resolve(conn, job)
        with errors_to_exit_codes():
            done = cancel_job(conn, job_id)
    if as_json:
        emit_json({"job_id": job_id, "already_cancelled": done.already, "tasks_cancelled": done.tasks})
    elif done.already:
        typer.echo(f"job {job_id} was already cancelled; nothing to do"
                   + (f" ({done.tasks} leftover task(s) cancelled now)" if done.tasks else ""))
    else:
        typer.echo(f"job {job_id} cancelled ({done.tasks} task(s) cancelled)")


@app.command()
def prune(
    older_than: str = typer.Option("30d", help="Age of finished jobs to delete (e.g. 12h, 30d)."),
    batch: int = typer.Option(1000, min=1, max=100000, help="Jobs per transaction."),
    include_failed: bool = typer.Option(False, "--include-failed", help="Delete failed jobs too."),
    orphan_grace: str = typer.Option("1h", help="Orphan artifacts younger than this are kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Delete finished jobs' tasks, results and artifacts in small batches, orphan artifacts, and
    the rows of workers gone before the age."""
    from outbox.artifacts import open_store
    from outbox.retention import prune as run_prune

    with database() as conn:
        with errors_to_exit_codes():
            report = run_prune(conn, open_store(), parse_age(older_than), batch, include_failed, dry_run,
                               parse_age(orphan_grace))
    if as_json:
        from dataclasses import asdict

        emit_json({"dry_run": dry_run, **asdict(report)})
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {report.jobs} job(s), {report.assets} image asset(s), {report.artifacts} artifact(s) "
               f"in {report.batches} batch(es); {report.orphans} orphan artifact(s); {report.workers} gone worker(s)")


@app.command("console")
def console_command(
    addr: str = typer.Option("127.0.0.1:8090", help="HOST:PORT to serve on; any non-loopback host needs CONSOLE_TOKEN."),
    read_only: bool = typer.Option(False, "--read-only", help="Show everything, offer and accept no action."),
) -> None:
    """The web console: live overview, jobs, workers and failed tasks; replay and cancel (docs/console.md)."""
    from console.web.server import serve

    with errors_to_exit_codes():
        serve(addr, read_only)


if __name__ == "__main__":
    app(prog_name="cli.py")
