"""Following a job live, driven by LISTEN on the old system's state channels, never by polling.

A lost connection (PostgreSQL restarted, a network blip) is not the end of a watch: the watcher
reconnects with the worker's backoff rule, LISTENs again and re-reads the job from its tables,
because a state change committed while it was away sent a notification nobody heard."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Iterator

import psycopg
from psycopg import Connection
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox import config, db
from outbox.config import RECONNECT_MAX_S
from outbox.errors import describe_error
from outbox.jobs import job_detail
from outbox.queue import JOB_CHANNEL, VARIANT_CHANNEL
from outbox.views import is_finished, job_state, unclaimed_stages

# The statuses that end a job whatever its step. Kept for callers that still import it; the whole
# rule ("is this job finished") is outbox_job_state in SQL (migration 0004), read through
# outbox.views.job_state.
FINAL_STATUSES = {"failed", "cancelled"}

# How long a watcher (`cli.py watch`, `submit --wait`) keeps trying to get its connection back
# before it gives up with exit 4: long enough for a PostgreSQL restart or a failover (tens of
# seconds), short enough that a script waiting on it learns of a real outage. WATCH_RECONNECT_TIMEOUT
# overrides it (tests use a few seconds).
WATCH_RECONNECT_TIMEOUT_S = 90.0

# What a lost or unusable connection raises: psycopg's OperationalError (AdminShutdown on a
# server shutdown, "server closed the connection unexpectedly", ...), InterfaceError when the
# connection is already closed, and db.DatabaseUnavailable from db.connect while it is away.
CONNECTION_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, db.DatabaseUnavailable)


def reconnect_timeout() -> float:
    """Seconds a watcher keeps trying to reconnect (WATCH_RECONNECT_TIMEOUT, default 90)."""
    return config.env_float("WATCH_RECONNECT_TIMEOUT", WATCH_RECONNECT_TIMEOUT_S)


class WatchTimeout(Exception):
    """The job was still open when the watch's time ran out (`watch --timeout`)."""


def same_database(conn: Connection) -> Callable[[], Connection]:
    """A factory of new connections to the database `conn` is connected to, with its password
    (conn.info.dsn leaves the password out). Not db.resolve_url(): without DATABASE_URL that
    would start an embedded server, not reach the one `conn` was opened on."""
    params = conninfo_to_dict(conn.info.dsn)
    if conn.info.password:
        params["password"] = conn.info.password
    dsn = make_conninfo(**params)
    return lambda: db.connect(dsn)


def _stderr_notice(text: str) -> None:
    # sys.stderr looked up at each call: under rich's live display it is its redirecting proxy,
    # which prints the line above the progress bars instead of through them.
    print(text, file=sys.stderr, flush=True)


class JobWatch:
    """One job followed over LISTEN, across lost connections.

    `events()` yields {"channel": "snapshot", "payload": job_detail} first, then each state change
    of the job or its variants ({"channel", "payload"} as notified), and after a reconnect a
    {"channel": "resync", "payload": job_detail} read afresh; it ends when the job is finished.
    `read(fn)` runs fn(connection) with the same reconnecting (the final read of a watch).

    Connection loss: one line on stderr ("connection to the database lost (...); reconnecting"),
    then attempts with the worker's backoff (first JOB_STATE_LISTENER_RECONNECT_DELAY s, doubling,
    at most RECONNECT_MAX_S). If none succeeds within `timeout_s` (WATCH_RECONNECT_TIMEOUT, default
    90 s) it raises db.DatabaseUnavailable, which the CLI turns into exit 4 with its message.

    `wait_s`: give up with WatchTimeout when the job is still open that many seconds after the
    start (None: wait as long as it takes). The watch also says once, through `notice`, when a
    stage the job waits on is claimed by no live worker (outbox.views.unclaimed_stages): checked
    with the first read and when the job or a variant reaches a state not seen before, never while
    nothing changes."""

    def __init__(self, conn: Connection, job_id: str, connect: Callable[[], Connection] | None = None,
                 timeout_s: float | None = None, first_delay_s: float | None = None,
                 max_delay_s: float = RECONNECT_MAX_S, notice: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, wait_s: float | None = None):
        self.conn = conn
        self.job_id = job_id
        self.connect = connect or same_database(conn)
        self.timeout_s = reconnect_timeout() if timeout_s is None else timeout_s
        self.first_delay_s = config.reconnect_delay() if first_delay_s is None else first_delay_s
        self.max_delay_s = max_delay_s
        self.notice = notice or _stderr_notice
        self.sleep = sleep
        self.where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
        self.reconnects = 0
        self._own: Connection | None = None  # a connection we opened (closed by close())
        self._snapshot_sent = False
        self.deadline = None if wait_s is None else time.monotonic() + wait_s
        self.wait_s = wait_s
        self._seen_states: set[tuple] = set()  # (channel, step, status) already checked for workers
        self._unclaimed_told: set[str] = set()  # stages already named as having no live worker

    # ------------------------------------------------------------------ following
    def events(self) -> Iterator[dict]:
        try:
            while True:
                try:
                    # The first read is the snapshot the caller builds on (even when it needed a
                    # reconnect); every later one is a resync.
                    yield from self._follow("resync" if self._snapshot_sent else "snapshot")
                    return
                except CONNECTION_ERRORS as exc:
                    self._reconnect(exc)
        finally:
            self._unlisten()

    def _follow(self, kind: str) -> Iterator[dict]:
        """LISTEN, then read, then the notifications: LISTEN comes before the read, so no change
        between the two is missed (on the first connection and after every reconnect).

        Notifications are taken a batch at a time (psycopg holds the connection for as long as
        its notifies() generator runs), so that the job's state can be asked of the database
        between two batches; what arrives meanwhile waits in psycopg's backlog."""
        conn = self.conn
        conn.execute(f"LISTEN {VARIANT_CHANNEL}")
        conn.execute(f"LISTEN {JOB_CHANNEL}")
        job = job_detail(conn, self.job_id)
        finished = is_finished(job["state"])
        # Asked before the snapshot goes out and told after it: no statement runs once the
        # caller has shown the job, until something changes.
        unclaimed = [] if finished else self._new_unclaimed(conn)
        self._snapshot_sent = True
        yield {"channel": kind, "payload": job}
        self._tell_unclaimed(unclaimed)
        if finished:
            return
        while True:
            batch = list(conn.notifies(timeout=self._time_left(), stop_after=1))
            if not batch or self._time_left() == 0.0:
                raise WatchTimeout(f"job {self.job_id} still open after {self.wait_s:g} s (--timeout): "
                                   "not cancelled; `cli.py status` shows where it is")
            for note in batch:
                payload = json.loads(note.payload)
                if payload.get("job_id") != job["job_id"]:
                    continue
                yield {"channel": note.channel, "payload": payload}
                if note.channel == JOB_CHANNEL and is_finished(
                        job_state(conn, payload.get("status"), payload.get("current_step"))):
                    return
                key = (note.channel, payload.get("current_step"), payload.get("status"))
                if key not in self._seen_states:
                    self._seen_states.add(key)
                    self._tell_unclaimed(self._new_unclaimed(conn))

    def _time_left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _new_unclaimed(self, conn: Connection) -> list[str]:
        return [s for s in unclaimed_stages(conn, self.job_id) if s not in self._unclaimed_told]

    def _tell_unclaimed(self, stages: list[str]) -> None:
        if not stages:
            return
        self._unclaimed_told.update(stages)
        names = ", ".join(stages)
        self.notice(f"no live worker claims {names}, which job {self.job_id} waits on: it waits until one starts "
                    f"(`cli.py workers start --stages {','.join(stages)}`; `cli.py workers list` shows who runs)")

    def read(self, fn: Callable[[Connection], object]):
        while True:
            try:
                return fn(self.conn)
            except CONNECTION_ERRORS as exc:
                self._reconnect(exc)

    # ------------------------------------------------------------------ reconnecting
    def _reconnect(self, exc: BaseException) -> None:
        lost_at = time.monotonic()
        deadline = lost_at + self.timeout_s
        self._close_own()
        self.notice(f"connection to the database at {self.where} lost ({describe_error(exc)}); "
                    f"reconnecting (giving up after {self.timeout_s:g} s)")
        delay, last = self.first_delay_s, exc
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise db.DatabaseUnavailable(
                    f"lost the connection to the database at {self.where} and could not reconnect within "
                    f"{self.timeout_s:g} s (WATCH_RECONNECT_TIMEOUT); last error: {describe_error(last, context=False)}. "
                    f"The job itself is not affected: `cli.py watch {self.job_id}` follows it again later")
            self.sleep(min(delay, left))
            try:
                conn = self.connect()
            except CONNECTION_ERRORS as err:
                # context=False above: each attempt runs while the loss is being handled, and
                # "while handling <the loss>" would only repeat the first line we printed.
                last = err
                delay = min(delay * 2, self.max_delay_s)
                continue
            self.conn = self._own = conn
            self.reconnects += 1
            self.notice(f"reconnected after {time.monotonic() - lost_at:.1f} s; re-reading the job's state "
                        "(changes made meanwhile sent no notification we could hear)")
            return

    def _unlisten(self) -> None:
        conn = self.conn
        if conn.closed or conn.broken:
            return
        try:
            conn.execute(f"UNLISTEN {VARIANT_CHANNEL}")
            conn.execute(f"UNLISTEN {JOB_CHANNEL}")
        except psycopg.Error:
            pass  # lost just now: nothing is listening any more either

    def _close_own(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None

    def close(self) -> None:
        """Closes the connection the watch opened itself (never the caller's)."""
        self._close_own()


def watch_job(conn: Connection, job_id: str, **options) -> Iterator[dict]:
    """Yields the job's detail once, then each state change of the job or its variants
    ({"channel", "payload"}), and ends when the job is finished; reconnects on a lost connection
    (see JobWatch, which takes the options)."""
    return JobWatch(conn, job_id, **options).events()
