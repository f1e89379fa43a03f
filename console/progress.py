"""Showing one job's progress live: per-variant and job stage progress, stage durations, failures
with their error text. Fed by outbox.watch.JobWatch (LISTEN on job_variant_state_changed /
job_state_changed), never by polling; across a lost connection it reconnects and re-reads the job
(see JobWatch), and the display catches up with what changed meanwhile.

On a terminal: rich progress bars, one per variant and one for the job stages, and a summary table.
Anywhere else (a pipe, a file, TERM=dumb): plain lines without control codes, one per state change.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Iterator, TextIO

import psycopg
from psycopg import Connection

from console.exitcodes import ExitCode, job_outcome
from outbox import db
from outbox import graph as stage_graph
from outbox.jobs import job_detail
from outbox.watch import JobWatch

# (job_id, variant_id or None, stage) -> {"last_error", "attempts", "max_attempts"} of the task
ErrorLookup = Callable[[str, "str | None", str], "dict | None"]


def parse_time(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"


def first_line(text: str | None, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class StageState:
    status: str = "pending"  # pending, queued, running, done, failed, cancelled
    started: datetime | None = None
    finished: datetime | None = None
    attempts: int = 0
    max_attempts: int = 0
    error: str | None = None
    seen_running_at: float | None = None  # local monotonic clock, for the live elapsed time

    @property
    def duration(self) -> float | None:
        if self.started and self.finished and self.status in ("done", "failed"):
            return max(0.0, (self.finished - self.started).total_seconds())
        return None


@dataclass
class Track:
    """A variant (its eight stages) or the job (its job-level stages)."""
    key: str | None  # variant id, None for the job
    label: str
    stages: list[str]
    states: dict[str, StageState] = field(default_factory=dict)
    current: str | None = None
    status: str = "pending"
    note: str = ""

    def __post_init__(self) -> None:
        for stage in self.stages:
            self.states.setdefault(stage, StageState())

    @property
    def done(self) -> int:
        return sum(1 for s in self.states.values() if s.status == "done")

    @property
    def failed_stage(self) -> str | None:
        return next((name for name, s in self.states.items() if s.status == "failed"), None)

    @property
    def finished(self) -> bool:
        return self.failed_stage is not None or self.done == len(self.stages) or self.status == "cancelled"


@dataclass
class Change:
    track: Track
    stage: str | None  # None: the track's state changed outside its own stages
    status: str


class JobProgress:
    """The state of one job, from a job_detail snapshot plus state-change events."""

    def __init__(self, graph: Iterable[dict], snapshot: dict):
        graph = list(graph)
        self.variant_stages = [g["stage"] for g in graph if g["level"] == "variant"]
        self.job_stages = [g["stage"] for g in graph if g["level"] == "job"]
        self.job_id = snapshot["job_id"]
        self.started_clock = time.monotonic()
        self.variants: dict[str, Track] = {}
        for v in snapshot["variants"]:
            self.variants[v["variant_id"]] = Track(v["variant_id"], f"variant {v['creation_order']}", self.variant_stages)
        self.job = Track(None, "job", self.job_stages)
        self.load(snapshot)

    @property
    def tracks(self) -> list[Track]:
        return [*self.variants.values(), self.job]

    def load(self, detail: dict) -> None:
        """Takes everything a job_detail read knows (the first snapshot, and the final read for
        exact durations)."""
        self.job_status, self.job_step = detail["status"], detail["current_step"]
        # The job's state by the database's rule (outbox_job_state), as of this read.
        self.state = detail.get("state", "open")
        for v in detail["variants"]:
            track = self.variants.get(v["variant_id"])
            if track:
                track.status, track.current = v["status"], v["current_step"]
        self.failed_variants = sum(1 for v in detail["variants"] if v["status"] == "failed")
        for t in detail["tasks"]:
            track = self.variants.get(t["variant_id"]) if t["variant_id"] else self.job
            if track is None or t["stage"] not in track.states:
                continue
            state = track.states[t["stage"]]
            state.status = t["status"]
            state.attempts, state.max_attempts = t["attempts"], t["max_attempts"]
            state.started, state.finished = t["started_at"], t["finished_at"]
            if t["status"] in ("failed", "cancelled"):
                state.error = t["last_error"]
        self._job_note()

    def resync(self, detail: dict) -> Iterator[Change]:
        """Takes a job_detail read after a reconnect and yields what changed since the last event
        we saw, in pipeline order per track: the notifications of those changes were sent while
        we were not listening, so the renderer learns of them here instead. Consume it whole:
        each change is applied as it is yielded, so a line shows the count it had then
        ("[3/8] planner done"), not the final one."""
        before = {(track.key, stage): track.states[stage].status for track in self.tracks for stage in track.stages}
        job_before = self.job_status
        self.load(detail)  # durations, attempts and errors from the task rows
        changed = [(track, stage, track.states[stage].status) for track in self.tracks for stage in track.stages
                   if track.states[stage].status != before[(track.key, stage)]]
        for track, stage, _ in changed:
            track.states[stage].status = before[(track.key, stage)]
        for track, stage, status in changed:
            state = track.states[stage]
            state.status = status
            if status == "running":
                state.seen_running_at = time.monotonic()
            yield Change(track, stage, status)
        # The job failed or was cancelled outside its own stages (all variants failed): apply()
        # reports that as a change of the job track with no stage; so does the resync.
        if self.job_status != job_before and self.job_status in ("failed", "cancelled") \
                and self.job_step not in self.job.states:
            self.job.status, self.job.current = self.job_status, self.job_step
            self.job.note = "all variants failed" if self.job_status == "failed" else "cancelled"
            yield Change(self.job, None, self.job_status)

    def _job_note(self) -> None:
        if self.job.states and all(s.status == "pending" for s in self.job.states.values()):
            open_variants = sum(1 for v in self.variants.values() if not v.finished)
            self.job.note = f"waiting for {open_variants} variant(s)" if open_variants else "starting"
        else:
            self.job.note = ""

    def apply(self, channel: str, payload: dict) -> Change | None:
        """Applies one notification payload; returns what changed (None: nothing we show)."""
        step, status = payload.get("current_step"), payload.get("status")
        at = parse_time(payload.get("updated_at"))
        if channel.endswith("variant_state_changed"):
            track = self.variants.get(payload.get("job_variants_id"))
        else:
            track = self.job
            self.job_status, self.job_step = status, step
        if track is None:
            return None
        track.status, track.current = status, step
        if step not in track.states:
            if track is self.job and status in ("failed", "cancelled"):
                track.note = "all variants failed" if status == "failed" else "cancelled"
                return Change(track, None, status)
            self._job_note()
            return None
        state = track.states[step]
        if status == "running":
            if state.status != "running":
                state.started, state.finished, state.seen_running_at = at, None, time.monotonic()
            state.status = "running"
        elif status in ("done", "failed", "cancelled"):
            state.status, state.finished = status, at
            if state.started is None:
                state.started = at
        else:
            state.status = status
        self._job_note()
        return Change(track, step, status)

    @property
    def final_status(self) -> str:
        """open, done, failed or cancelled, as of the last job_detail read (follow_job makes one
        when the job finishes)."""
        return self.state

    @property
    def exit_code(self) -> ExitCode:
        """What a command that followed this job exits with (console/exitcodes.py)."""
        return job_outcome(self.final_status, self.failed_variants)


# --- rendering --------------------------------------------------------------------------------------


def stage_line(track: Track, stage: str) -> str:
    state = track.states[stage]
    position = f"[{track.done}/{len(track.stages)}]"
    if state.status == "done":
        return f"{track.label} {position} {stage} done in {format_seconds(state.duration)}"
    if state.status == "failed":
        tries = f" after {state.attempts}/{state.max_attempts} attempt(s)" if state.attempts else ""
        return f"{track.label} {position} {stage} FAILED{tries}: {first_line(state.error) or '(no error recorded)'}"
    return f"{track.label} {position} {stage} {state.status}"


def _cell(state: StageState) -> str:
    return {"done": format_seconds(state.duration), "failed": "FAILED", "pending": "-"}.get(state.status, state.status)


def summary_rows(progress: JobProgress) -> list[tuple[str, list[str]]]:
    """(variant stage, one cell per variant) for the summary table."""
    return [(stage, [_cell(track.states[stage]) for track in progress.variants.values()])
            for stage in progress.variant_stages]


def job_summary(progress: JobProgress) -> str:
    return "job stages: " + ", ".join(f"{stage} {_cell(progress.job.states[stage])}" for stage in progress.job_stages)


def final_words(progress: JobProgress, elapsed: float) -> str:
    status = progress.final_status
    if status == "done":
        failed = (f", but {progress.failed_variants} of {len(progress.variants)} variant(s) failed"
                  if progress.failed_variants else "")
        return f"job {progress.job_id} done in {format_seconds(elapsed)}{failed}"
    return f"job {progress.job_id} {status.upper()} (at {progress.job_step}) after {format_seconds(elapsed)}"


class PlainRenderer:
    """One line per state change: no colours, no cursor movement, fine for pipes and logs."""

    def __init__(self, out: TextIO):
        self.out = out

    def write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def start(self, progress: JobProgress) -> None:
        self.write(f"job {progress.job_id}: {len(progress.variants)} variant(s); following its state changes "
                   f"(LISTEN, no polling)")

    def update(self, progress: JobProgress, change: Change) -> None:
        if change.stage is None:
            self.write(f"{change.track.label}: {change.status} ({change.track.note})")
        elif change.status in ("done", "failed", "cancelled") or change.status == "running":
            self.write(stage_line(change.track, change.stage))

    def finish(self, progress: JobProgress, elapsed: float) -> None:
        labels = [t.label.replace("variant ", "v") for t in progress.variants.values()]
        width = max(len(s) for s in progress.variant_stages) + 2
        self.write("")
        self.write("stage durations:")
        self.write(" " * width + "".join(f"{label:>11}" for label in labels))
        for stage, cells in summary_rows(progress):
            self.write(f"{stage:<{width}}" + "".join(f"{cell:>11}" for cell in cells))
        self.write(job_summary(progress))
        for track in progress.tracks:
            failed = track.failed_stage
            if failed:
                self.write(f"{track.label} failed at {failed}: {first_line(track.states[failed].error)}")
        self.write(final_words(progress, elapsed))

    def close(self) -> None:
        pass


class RichRenderer:
    """Progress bars on a terminal: one per variant, one for the job stages."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
        from rich.text import Text

        self.console = console

        class Bar(BarColumn):
            def render(self, task):
                failed = task.fields.get("failed")
                self.complete_style = "red" if failed else "green"
                self.finished_style = "red" if failed else "bold green"
                return super().render(task)

        class StageColumn(ProgressColumn):
            def render(self, task):
                track: Track = task.fields["track"]
                return Text.from_markup(describe(track))

        self.progress = Progress(TextColumn("{task.description}", style="bold"), Bar(bar_width=32),
                                 MofNCompleteColumn(), StageColumn(), console=console, transient=False,
                                 refresh_per_second=8)
        self.tasks: dict[str | None, int] = {}

    def start(self, progress: JobProgress) -> None:
        self.console.print(f"[bold]job {progress.job_id}[/]: {len(progress.variants)} variant(s), "
                           f"{len(progress.variant_stages)} stages each, then {len(progress.job_stages)} job stages "
                           "[dim](live from LISTEN, no polling)[/]")
        for track in progress.tracks:
            self.tasks[track.key] = self.progress.add_task(track.label, total=len(track.stages), completed=track.done,
                                                           track=track, failed=bool(track.failed_stage))
        self.progress.start()

    def update(self, progress: JobProgress, change: Change) -> None:
        track = change.track
        self.progress.update(self.tasks[track.key], completed=track.done, failed=bool(track.failed_stage))
        if change.status == "failed":
            from rich.markup import escape

            where = f" at {change.stage}" if change.stage else ""
            error = first_line(track.states[change.stage].error if change.stage else track.note)
            self.console.print(f"[red]✗ {track.label} failed{where}:[/] {escape(error or '(no error recorded)')}")

    def finish(self, progress: JobProgress, elapsed: float) -> None:
        from rich.table import Table

        for track in progress.tracks:
            self.progress.update(self.tasks[track.key], completed=track.done, failed=bool(track.failed_stage))
        self.progress.stop()
        table = Table(title="stage durations", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("stage")
        for track in progress.variants.values():
            table.add_column(track.label, justify="right")
        for stage, cells in summary_rows(progress):
            styled = [f"[red]{c}[/]" if c == "FAILED" else c for c in cells]
            table.add_row(stage, *styled)
        self.console.print(table)
        self.console.print(job_summary(progress).replace("FAILED", "[red]FAILED[/]"))
        words = final_words(progress, elapsed)
        self.console.print(f"[bold green]✓ {words}[/]" if progress.exit_code == ExitCode.OK else f"[bold red]✗ {words}[/]")

    def close(self) -> None:
        self.progress.stop()


def describe(track: Track) -> str:
    """The stage column of a bar: the last finished stage with its time, and what runs now."""
    from rich.markup import escape

    failed = track.failed_stage
    if failed:
        return f"[red]✗ {failed}[/] {escape(first_line(track.states[failed].error, 60))}"
    if track.note and track.done == 0 and not any(s.status == "running" for s in track.states.values()):
        return f"[dim]{escape(track.note)}[/]"
    parts = []
    last_done = [name for name in track.stages if track.states[name].status == "done"]
    if last_done:
        parts.append(f"[green]✓[/] {last_done[-1]} {format_seconds(track.states[last_done[-1]].duration)}")
    running = next((name for name in track.stages if track.states[name].status == "running"), None)
    if running:
        seen = track.states[running].seen_running_at
        elapsed = f" {format_seconds(time.monotonic() - seen)}" if seen else ""
        parts.append(f"[yellow]▶ {running}[/]{elapsed}")
    elif len(last_done) == len(track.stages):
        parts.append("[bold green]finished[/]")
    else:
        queued = next((name for name in track.stages if track.states[name].status in ("queued", "pending")), None)
        if queued and last_done:
            parts.append(f"[dim]→ {queued}[/]")
        elif queued:
            parts.append(f"[dim]waiting for {queued}[/]")
    return "  ".join(parts)


def make_renderer(out: TextIO | None = None, plain: bool | None = None):
    """Rich bars on a terminal, plain lines elsewhere (or when plain=True)."""
    out = out or sys.stdout
    if plain is None:
        plain = not (hasattr(out, "isatty") and out.isatty())
    if not plain:
        from rich.console import Console

        console = Console(file=out, highlight=False)
        if console.is_terminal and not console.is_dumb_terminal:
            return RichRenderer(console)
    return PlainRenderer(out)


def follow_job(conn: Connection, job_id: str, renderer=None, lookup_error: ErrorLookup | None = None,
               connect: Callable[[], Connection] | None = None, reconnect_timeout_s: float | None = None,
               notice: Callable[[str], None] | None = None, wait_s: float | None = None) -> JobProgress:
    """Shows the job's progress until it is finished; returns the final state.

    `conn` is held by LISTEN for the whole time; `lookup_error` (own connection) reads a failed
    task's last_error when a failure arrives: one query per failure, none otherwise.

    A lost connection is survived (outbox.watch.JobWatch): `connect` opens a new one (default:
    the same database as `conn`), for up to `reconnect_timeout_s` (default WATCH_RECONNECT_TIMEOUT,
    90 s), after which db.DatabaseUnavailable is raised (the CLI: exit 4). `notice` gets the line
    saying so (default: stderr). After a reconnect `conn` is no longer the connection in use: it
    was lost, and the watch closes the one it opened when it ends.

    `wait_s`: outbox.watch.WatchTimeout when the job is still open after that many seconds."""
    started = time.monotonic()
    watch = JobWatch(conn, job_id, connect=connect, timeout_s=reconnect_timeout_s, notice=notice, wait_s=wait_s)
    renderer = renderer or make_renderer()
    events = watch.events()
    try:
        graph = watch.read(lambda c: stage_graph.read(c).rows())
        progress = JobProgress(graph, next(events)["payload"])
        renderer.start(progress)
        try:
            for event in events:
                if event["channel"] == "resync":
                    for change in progress.resync(event["payload"]):
                        renderer.update(progress, change)
                    continue
                change = progress.apply(event["channel"], event["payload"])
                if change is None:
                    continue
                if change.status == "failed" and change.stage and lookup_error is not None:
                    row = lookup_error(progress.job_id, change.track.key, change.stage)
                    if row:
                        state = change.track.states[change.stage]
                        state.error, state.attempts, state.max_attempts = row["last_error"], row["attempts"], row["max_attempts"]
                renderer.update(progress, change)
            # One read at the end: exact durations and attempts from the task rows.
            progress.load(watch.read(lambda c: job_detail(c, job_id)))
            renderer.finish(progress, time.monotonic() - started)
        finally:
            renderer.close()
    finally:
        events.close()
        watch.close()
    return progress


def error_lookup(conn_factory: Callable[[], Connection]) -> ErrorLookup:
    """An ErrorLookup that opens its own connection on the first failure (the watching connection
    is busy with LISTEN)."""
    holder: dict[str, Connection] = {}

    def query(job_id: str, variant_id: str | None, stage: str) -> dict | None:
        if "conn" not in holder:
            holder["conn"] = conn_factory()
        return holder["conn"].execute(
            "SELECT last_error, attempts, max_attempts FROM stage_tasks WHERE job_id = %s AND stage = %s "
            "AND job_variants_id IS NOT DISTINCT FROM %s::uuid", (job_id, stage, variant_id)).fetchone()

    def lookup(job_id: str, variant_id: str | None, stage: str) -> dict | None:
        # Its connection may have been lost since the last failure (a PostgreSQL restart the
        # watch survived): try once more on a new one. Still nothing: show the failure without
        # its text rather than end the watch; the final read of the watch fills it in.
        for _ in range(2):
            try:
                return query(job_id, variant_id, stage)
            except (psycopg.OperationalError, psycopg.InterfaceError, db.DatabaseUnavailable):
                old = holder.pop("conn", None)
                if old is not None:
                    old.close()
        return None

    lookup.close = lambda: holder.pop("conn").close() if "conn" in holder else None  # type: ignore[attr-defined]
    return lookup
