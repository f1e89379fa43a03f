"""One worker process: LISTEN, wait for a notification or the earliest deadline, claim, run,
heartbeat, complete; reconnect after a lost connection; stop gracefully.

No fixed-interval polling: with nothing queued and nothing running elsewhere the worker sleeps on
its listening socket and sends no query at all.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from outbox import db, queue
from outbox.queue import ClaimedTask
from stages.contract import PermanentStageError, StageSpec
from workers.metrics import Metrics
from outbox.artifacts import INSERT_ARTIFACT
from outbox.config import RECONNECT_MAX_S
from outbox.errors import describe_error
from workers.runner import Completed, TaskRunner

log = logging.getLogger("workers")

# The smallest wait before acting on a deadline that has already passed: a task another worker
# is claiming right now shows as due but is locked; acting again at once would spin.
MIN_DEADLINE_WAIT_S = 0.05
COMPLETION_BATCH = 200
# After a completion whose outcome is unknown, how often we try to read back whether it committed
# (with the listener's backoff between tries) before saying we could not tell.
OUTCOME_CHECK_TRIES = 8


class WorkerStartError(RuntimeError):
    """The worker cannot start (unknown stage, schema missing, graph and registry disagree)."""


class OutcomeUnknown(Exception):
    """A completion's commit was under way (sent, or being sent) when its connection failed or
    timed out: it may have committed or not, and only reading the database afterwards can tell.
    Why a class of its own: "could not record the outcome" was logged for results that had in
    fact committed (a worker frozen with SIGSTOP past its lease: on SIGCONT the answer was in the
    socket, but the operation's timeout had expired first)."""

    def __init__(self, cause: BaseException):
        super().__init__(describe_error(cause))
        self.cause = cause


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class WorkerSettings:
    url: str
    stages: list[str] | None = None  # None: every stage the registry has
    listen_url: str | None = None
    concurrency: int = 8
    lease_s: float = 30.0
    heartbeat_s: float = 10.0
    # Bound on one database operation (claim, completion, heartbeat, ...) and on the listening
    # connection's liveness query: a connection that stopped answering fails instead of hanging.
    db_timeout_s: float = 30.0
    # Seconds of silence on the listening connection before it is asked to answer (SELECT 1):
    # a half-open connection behind something that still acknowledges delivers nothing, and TCP
    # keepalives cannot tell. See docs/reliability.md for the bound this gives.
    liveness_s: float = 30.0
    grace_s: float = 30.0
    reconnect_delay_s: float = 5.0
    reconnect_max_s: float = RECONNECT_MAX_S  # shared with the CLI's watcher (outbox/watch.py)
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    worker_id: str = field(default_factory=new_worker_id)
    selftest_s: float = 5.0  # how long the start-up notification may take to come back
    health_addr: str | None = None  # HOST:PORT of /healthz, /readyz, /metrics (workers/health.py)


class Worker:
    def __init__(self, settings: WorkerSettings, registry: dict[str, StageSpec], runner: TaskRunner,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.registry = registry
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.owner = settings.worker_id
        self.stages: list[str] = []
        self.timeouts: dict[str, float] = {}
        self.in_flight: dict[int, ClaimedTask] = {}
        self.executions: set[asyncio.Task] = set()
        self.outcome_checks: set[asyncio.Task] = set()  # see _check_outcomes
        self.completions: asyncio.Queue | None = None
        self.wake: asyncio.Event | None = None
        self.stopping = False
        self.stop_event: asyncio.Event | None = None
        self.deadline: float | None = None
        # True when the last claim may have left claimable tasks behind (slots were full): a
        # freed slot must then claim again. Otherwise the notification of new work wakes us,
        # and an extra wake would only cost an empty claim.
        self.saturated = False
        self.rescue_due = False
        self.last_rescue = 0.0  # loop time of the last rescue
        self.settling: set[int] = set()  # tasks whose outcome is being recorded now
        self.orphan_deadline: float | None = None  # when our unrecorded tasks' leases have run out
        self.alone_task: int | None = None  # a task running alone (crash isolation)
        self.wait_idle = False  # a task waits to run alone: claim again once nothing is in flight
        self.listener_connected = False
        self.connected_once = False
        self.ready = False
        self.pool: AsyncConnectionPool | None = None
        self.executor = ThreadPoolExecutor(max_workers=max(2, settings.concurrency * 2),
                                           thread_name_prefix="stage")
        self.device_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # ----------------------------------------------------------------- lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.wake, self.stop_event, self.completions = asyncio.Event(), asyncio.Event(), asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests drive the worker in-process)
        self.pool = AsyncConnectionPool(
            self.settings.url, min_size=1, max_size=self.settings.concurrency + 3, open=False,
            kwargs=db.POOL_KWARGS)
        await self.pool.open(wait=False)
        try:
            await self._check_graph()
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TimeoutError) as exc:
            # The database is not there (yet): the pool retries in the background and the first
            # operation times out after db_timeout_s with an exception that names no cause.
            # One direct attempt tells why ("Connection refused", a bad password, ...).
            why = await self._why_unreachable()
            await self.pool.close()
            raise WorkerStartError(f"cannot use the database at {db.safe_url(self.settings.url)}: "
                                   f"{describe_error(exc)}{'; ' + why if why else ''}") from exc
        except Exception:
            await self.pool.close()
            raise
        log.info("worker %s started: stages %s, concurrency %d", self.owner, ",".join(self.stages),
                 self.settings.concurrency)
        from workers.health import start_health_server

        health = await start_health_server(self, self.settings.health_addr)  # before LISTEN: probes see it start
        side_tasks = {
            asyncio.create_task(self._listen(), name="listener"),
            asyncio.create_task(self._dispatch(), name="dispatcher"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._flush_completions(), name="completions"),
        }
        stop_wait = asyncio.create_task(self.stop_event.wait())
        done, _ = await asyncio.wait(side_tasks | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        for task in done:
            exc = None if task is stop_wait or task.cancelled() else task.exception()
            if task is not stop_wait and (exc is not None or not self.stopping):
                # A side task never ends on its own: if one did, the worker is broken; stop it
                # so the supervisor (or Kubernetes) restarts it rather than run half-alive.
                log.error("worker side task %s died: %r; stopping", task.get_name(), exc)
                exit_code = 1
        self.stopping = True
        await self._drain_and_hand_back(side_tasks)
        for task in side_tasks | {stop_wait}:
            task.cancel()
        await asyncio.gather(*side_tasks, stop_wait, return_exceptions=True)
        await self._cancel_outcome_checks()
        if health:
            await health.close()
        await self.pool.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.owner)
        return exit_code

    async def run_task(self, task_id: int) -> str:
        """Claims one given task and runs it here and now (`cli.py run-stage`). Returns the task's
        status afterwards."""
        self.wake, self.stop_event, self.completions = asyncio.Event(), asyncio.Event(), asyncio.Queue()
        self.listener_connected = True
        async with AsyncConnectionPool(self.settings.url, min_size=1, max_size=3, open=False,
                                       kwargs=db.POOL_KWARGS) as pool:
            self.pool = pool
            await self._check_graph()
            flusher = asyncio.create_task(self._flush_completions())
            try:
                async with pool.connection() as conn:
                    rows = await (await conn.execute(
                        queue.CLAIM, (self.owner, self.stages, 1, self.settings.lease_s, task_id, True))).fetchall()
                tasks, _ = queue.split_claim(rows)
                if not tasks:
                    return "not claimable"
                task = tasks[0]
                self.in_flight[task.id] = task
                await self._execute([task])
                async with pool.connection() as conn:
                    row = await (await conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (task_id,))).fetchone()
                return row["status"]
            finally:
                flusher.cancel()
                await self._cancel_outcome_checks()
                self.executor.shutdown(wait=False)

    def request_stop(self, why: str = "request") -> None:
        if not self.stopping:
            log.info("worker %s stopping (%s): no new claims, finishing in-flight tasks for up to %.0f s",
                     self.owner, why, self.settings.grace_s)
        self.stopping = True
        if self.stop_event is not None:
            self.stop_event.set()
            self.wake.set()

    @contextlib.asynccontextmanager
    async def _db(self):
        """A pooled connection for one engine operation, bounded by db_timeout_s. A connection that
        stopped answering (half-open, a stuck middlebox, a frozen server) fails the operation with
        TimeoutError instead of hanging it forever; psycopg then cancels the query or, failing that
        within 10 s, closes the connection, and the pool replaces it.

        The TimeoutError it raises says what timed out: asyncio's own has no message, and the
        logs then read "heartbeat failed ()" or "worker stopped: " with no reason at all."""
        try:
            async with asyncio.timeout(self.settings.db_timeout_s) as scope:
                async with self.pool.connection() as conn:
                    yield conn
        except TimeoutError:
            if not scope.expired():
                raise  # a TimeoutError of the caller's own, not our bound
            raise TimeoutError(f"no answer from the database within {self.settings.db_timeout_s:g} s "
                               "(DB_OPERATION_TIMEOUT)") from None

    async def _why_unreachable(self) -> str | None:
        """One direct connection attempt, outside the pool, for its error message."""
        try:
            async with asyncio.timeout(self.settings.db_timeout_s):
                conn = await db.connect_async(self.settings.url)
        except Exception as exc:
            # context=False: this runs while the pool's timeout is handled, which the caller
            # already names.
            return f"a direct connection attempt failed: {describe_error(exc, context=False)}"
        await conn.close()
        return "a direct connection attempt succeeded just after (was the database starting up?)"

    async def _check_graph(self) -> None:
        async with self._db() as conn:
            exists = await (await conn.execute("SELECT to_regclass('stage_graph') IS NOT NULL AS ok")).fetchone()
            if not exists["ok"]:
                raise WorkerStartError("the database has no pipeline schema: run `cli.py db upgrade` first")
            graph = await (await conn.execute(queue.GRAPH)).fetchall()
        known = {row["stage"]: row for row in graph}
        wanted = self.settings.stages or [s for s in known if s in self.registry]
        unknown = [s for s in wanted if s not in known]
        if unknown:
            raise WorkerStartError(f"unknown stage(s) {', '.join(unknown)}: the stage graph has {', '.join(known)}")
        missing = [s for s in wanted if s not in self.registry]
        if missing:
            raise WorkerStartError(f"no implementation registered for stage(s) {', '.join(missing)}")
        if not wanted:
            raise WorkerStartError("no stage to run: the registry implements none of the graph's stages")
        for stage in wanted:
            if self.registry[stage].device != known[stage]["device"]:
                log.warning("stage %s is a %s stage in the registry, but the stage graph (which pools and KEDA "
                            "follow) routes it to the %s pool",
                            stage, self.registry[stage].device, known[stage]["device"])
        # Later pipeline stages first: a claim takes work that finishes jobs in flight before
        # work that starts new ones (see outbox_claim).
        position = {stage: i for i, stage in enumerate(known)}
        self.stages = sorted(wanted, key=position.__getitem__, reverse=True)
        self.timeouts = {s: float(known[s]["timeout_s"]) for s in wanted}

    async def _drain_and_hand_back(self, side_tasks: set[asyncio.Task]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace_s
        # A claim in flight ends first: what it took is then run (or handed back below), not
        # left running under our name until its lease runs out (or cancelled mid-claim).
        dispatcher = [t for t in side_tasks if t.get_name() == "dispatcher" and not t.done()]
        if dispatcher:
            self.kick()
            await asyncio.wait(dispatcher, timeout=self.settings.db_timeout_s)
        # Executions started meanwhile count too: wait until none is left or the grace is over.
        while self.executions and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self.executions), timeout=left)
        leftover = list(self.in_flight)
        if not leftover:
            return
        try:
            async with self._db() as conn:
                rows = await (await conn.execute(queue.HAND_BACK, (self.owner, leftover))).fetchall()
            log.warning("handed back %d unfinished task(s) at shutdown: %s", len(rows), [r["id"] for r in rows])
        except (psycopg.Error, TimeoutError) as exc:
            log.error("could not hand back %d task(s) (%s); their leases will expire and another worker takes them",
                      len(leftover), describe_error(exc))

    # ----------------------------------------------------------------- listening
    async def _listen(self) -> None:
        delay = self.settings.reconnect_delay_s
        url = self.settings.listen_url or self.settings.url
        stage_set = set(self.stages)
        while not self.stopping:
            try:
                conn = await db.connect_async(url)
                async with conn:
                    await conn.execute(f"LISTEN {queue.WORKER_CHANNEL}")
                    if not self.connected_once:
                        await self._self_test(conn, stage_set)
                    if self.connected_once:
                        # The server may have restarted, or the old connections gone half-open:
                        # replace every pooled connection (those in use when they come back).
                        # Not pool.check(): it tests them one by one, and one that stopped
                        # answering would hold it (and the connections it took out) for good.
                        await self.pool.drain()
                    self.connected_once = True
                    self.listener_connected = True
                    self.ready = True
                    # Logged once the probes answer 200: tests and operators read it as "serving".
                    log.info("[LISTENER] LISTEN started on %s (%s)", queue.WORKER_CHANNEL, db.safe_url(url))
                    delay = self.settings.reconnect_delay_s
                    self.rescue_due = True
                    self.kick()  # drain: anything enqueued while we were away is claimed now
                    while not self.stopping:
                        heard = False
                        async for note in conn.notifies(timeout=self.settings.liveness_s):
                            heard = True
                            self.metrics.notifications.inc()
                            if note.payload in stage_set:
                                log.debug("[LISTENER] task queued for stage %s", note.payload)
                                self.kick()
                        if not heard:
                            await self._check_alive(conn)
            except (psycopg.OperationalError, OSError) as exc:
                self.listener_connected = False
                if self.stopping:
                    return
                self.metrics.reconnects.inc()
                log.warning("[LISTENER] connection lost (%s); reconnect attempt in %.1f s", describe_error(exc), delay)
                try:
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _self_test(self, conn: psycopg.AsyncConnection, stage_set: set[str]) -> None:
        """Sends ourselves a notification through the pool and waits for it on the listening
        connection. A listener behind a transaction-mode pooler LISTENs on a server connection it
        gives straight back, and then hears nothing, ever: better to stop now, saying why."""
        token = f"selftest {self.owner}"
        async with self._db() as pooled:
            await pooled.execute("SELECT pg_notify(%s, %s)", (queue.WORKER_CHANNEL, token))
        async for note in conn.notifies(timeout=self.settings.selftest_s):
            if note.payload == token:
                return
            if note.payload in stage_set:
                self.kick()
        message = (f"[LISTENER] a test notification sent at start did not arrive within {self.settings.selftest_s:g} s: "
                   "the listening connection does not receive notifications. Is LISTEN_DATABASE_URL (or DATABASE_URL) "
                   "pointing at a pooler in transaction mode? Point LISTEN_DATABASE_URL straight at PostgreSQL.")
        log.error(message)
        raise WorkerStartError(message)

    async def _check_alive(self, conn: psycopg.AsyncConnection) -> None:
        """liveness_s of silence: the listening connection must answer within db_timeout_s, else
        it counts as lost. The probe is a bare protocol Sync (an empty pipeline), not a query:
        the server answers ReadyForQuery without starting a transaction, so an idle worker still
        runs no statement and commits nothing (pg_stat_database.xact_commit stays put)."""
        async def ping() -> None:
            async with conn.pipeline() as pipeline:
                await pipeline.sync()

        try:
            await asyncio.wait_for(ping(), self.settings.db_timeout_s)
        except TimeoutError:
            raise psycopg.OperationalError(
                f"the listening connection did not answer a liveness probe within {self.settings.db_timeout_s:g} s "
                "(half-open connection?)") from None

    def kick(self) -> None:
        self.wake.set()

    # ----------------------------------------------------------------- claiming
    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping:
            # orphan_deadline: see _settle. Not while disconnected (nothing to do then: the
            # reconnect kicks us, and the deadline stays for afterwards).
            wake_at = min((d for d in (self.deadline, self.orphan_deadline if self.listener_connected else None)
                           if d is not None), default=None)
            timeout = None if wake_at is None else max(0.0, wake_at - loop.time())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                self.rescue_due = True
            if wake_at is not None and loop.time() >= wake_at:
                self.rescue_due = True  # woken by a notification just as the deadline passed
            self.wake.clear()
            if self.stopping or not self.listener_connected:
                # Without a listener we could miss work; the reconnect kicks us once it is back.
                self.deadline = None
                continue
            try:
                await self._fill()
                failures = 0
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TimeoutError) as exc:
                failures += 1
                backoff = min(self.settings.reconnect_delay_s * failures, self.settings.reconnect_max_s)
                log.warning("claim failed (%s); trying again in %.1f s", describe_error(exc), backoff)
                self.deadline = loop.time() + backoff

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._db() as conn:
            # Also at most every heartbeat interval while busy: a worker that keeps being woken
            # by notifications, or whose slots are full (it then learns no deadline), never times
            # out waiting, and under steady load another worker's expired lease would otherwise
            # wait for a lull to be rescued (found by the fault suite: 20 s and more in soak).
            if self.rescue_due or loop.time() - self.last_rescue >= self.settings.heartbeat_s:
                self.rescue_due = False
                self.last_rescue = loop.time()
                rescued = await (await conn.execute(queue.RESCUE_EXPIRED, (1000,))).fetchall()
                if self.orphan_deadline is not None and loop.time() >= self.orphan_deadline:
                    self.orphan_deadline = None
                for row in rescued:
                    log.warning("recovery: task %s had an expired lease: %s", row["id"], row["outcome"])
                    self.metrics.lease_rescues.inc()
            seconds = None
            while not self.stopping:
                if self.alone_task is not None or (self.wait_idle and self.in_flight):
                    # Crash isolation (outbox_claim): a task runs alone here, or one waits to run
                    # alone and we take nothing until ours have finished (the last one kicks us).
                    self.deadline = None
                    return
                free = self.settings.concurrency - len(self.in_flight)
                if free <= 0:
                    self.saturated = True
                    self.deadline = None  # a completion will wake us
                    return
                rows = await (await conn.execute(queue.CLAIM, (
                    self.owner, self.stages, free, self.settings.lease_s, None, not self.in_flight))).fetchall()
                tasks, seconds = queue.split_claim(rows)
                self.wait_idle = queue.suspect_waiting(rows)
                self._start(tasks)
                if tasks and tasks[0].alone:
                    self.alone_task = tasks[0].id
                    log.warning("task %s (%s, %s) lost its worker before and this is its last attempt: it runs "
                                "alone", tasks[0].id, tasks[0].stage, tasks[0].subject, extra=task_fields(tasks[0]))
                    continue
                if len(tasks) < free:
                    self.saturated = False
                    break
        self.deadline = None if seconds is None else loop.time() + max(seconds, MIN_DEADLINE_WAIT_S)

    def _start(self, tasks: list[ClaimedTask]) -> None:
        by_stage: dict[str, list[ClaimedTask]] = defaultdict(list)
        for task in tasks:
            self.in_flight[task.id] = task
            self.metrics.claimed.labels(task.stage).inc()
            by_stage[task.stage].append(task)
        for stage, group in by_stage.items():
            size = max(1, self.registry[stage].max_batch)
            for i in range(0, len(group), size):
                execution = asyncio.create_task(self._execute(group[i:i + size]))
                self.executions.add(execution)
                execution.add_done_callback(self.executions.discard)

    # ----------------------------------------------------------------- running
    async def _execute(self, tasks: list[ClaimedTask]) -> None:
        spec = self.registry[tasks[0].stage]
        loop = asyncio.get_running_loop()
        for task in tasks:
            log.info("[TRIGGER] stage %s started for %s (job %s, attempt %d/%d)", task.stage, task.subject,
                     task.job_id, task.attempt, task.max_attempts, extra=task_fields(task))
        started = time.monotonic()
        try:
            # GPU stages take the device one batch at a time: a second batch would only fight
            # the first for memory.
            lock = self.device_locks[spec.name] if spec.device == "gpu" else None
            if lock:
                await lock.acquire()
            try:
                outcomes = await asyncio.wait_for(
                    loop.run_in_executor(self.executor, self.runner.run, spec, tasks),
                    self.timeouts.get(spec.name, 300.0))
            finally:
                if lock:
                    lock.release()
        except asyncio.TimeoutError:
            outcomes = [TimeoutError(f"stage {spec.name} timed out after {self.timeouts.get(spec.name, 300.0):.0f} s")] * len(tasks)
        except Exception as exc:  # the engine's side (loading inputs, a lost connection): retry
            outcomes = [exc] * len(tasks)
        elapsed = time.monotonic() - started
        await asyncio.gather(*(self._settle(task, outcome, elapsed) for task, outcome in zip(tasks, outcomes)))
        if self.saturated:
            self.kick()

    async def _settle(self, task: ClaimedTask, outcome, elapsed: float) -> None:
        self.settling.add(task.id)
        try:
            if isinstance(outcome, BaseException):
                await self._fail(task, outcome)
            else:
                accepted = await self._complete(task, outcome)
                self.metrics.duration.labels(task.stage).observe(elapsed)
                if accepted:
                    self.metrics.completed.labels(task.stage).inc()
                    log.info("stage %s succeeded for %s in %.3f s", task.stage, task.subject, elapsed,
                             extra=task_fields(task))
                else:
                    self.metrics.lease_losses.inc()
                    log.warning("stage %s finished for %s but its lease was lost (another attempt owns it "
                                "now, or the job was cancelled): result dropped", task.stage, task.subject,
                                extra=task_fields(task))
        except Exception as exc:
            if isinstance(exc, OutcomeUnknown):
                # Not "could not record" alone: it may well have been recorded. _check_outcomes
                # reads it back once the database answers and logs which it was. Either way the
                # lease fence keeps it safe: a committed result ended the lease (a rescue then
                # finds nothing), an uncommitted one runs again as attempt+1.
                log.warning("could not record the outcome of task %s (%s) for certain: outcome unknown: the "
                            "connection failed during the commit (%s), so it may or may not have committed; the "
                            "lease fence makes a retry safe. Checking once the database answers", task.id,
                            task.stage, exc, extra=task_fields(task))
            else:
                log.error("could not record the outcome of task %s (%s): %s; its lease will expire and it runs again",
                          task.id, task.stage, describe_error(exc), extra=task_fields(task))
            # The task stays running under our name, no longer renewed (unless its completion
            # did commit). The database leaves our own leases out of the deadline it gives us (we
            # renew them), so wake when this one has run out and rescue it: a lone worker would
            # otherwise leave it running forever.
            when = asyncio.get_running_loop().time() + self.settings.lease_s + MIN_DEADLINE_WAIT_S
            self.orphan_deadline = max(self.orphan_deadline or 0.0, when)
            self.kick()
        finally:
            self.in_flight.pop(task.id, None)
            self.settling.discard(task.id)
            if task.id == self.alone_task:
                self.alone_task = None
                self.kick()
            elif self.wait_idle and not self.in_flight:
                self.kick()  # idle now: take the task that waits to run alone

    async def _complete(self, task: ClaimedTask, done: Completed) -> bool:
        future = asyncio.get_running_loop().create_future()
        await self.completions.put((task, done, future))
        return await future

    async def _flush_completions(self) -> None:
        """Group commit: every completion waiting when the previous commit ends goes in one
        transaction, so under load round trips per task fall while a lone task waits for none."""
        while True:
            batch = [await self.completions.get()]
            while not self.completions.empty() and len(batch) < COMPLETION_BATCH:
                batch.append(self.completions.get_nowait())
            items = Jsonb([{"id": t.id, "attempt": t.attempt, "result": d.result} for t, d, _ in batch])
            pending = [(key, data, len(data)) for _, d, _ in batch for key, data in d.pending_artifacts.items()]
            # Set once the commit may be under way: a failure before it (no pooled connection,
            # a statement inside the explicit transaction) certainly committed nothing; a failure
            # from then on leaves the outcome unknown (see OutcomeUnknown).
            committing = False
            try:
                async with self._db() as conn:
                    if pending:
                        # Artifacts in the database commit with their results, or not at all.
                        async with conn.transaction():
                            async with conn.cursor() as cur:
                                await cur.executemany(INSERT_ARTIFACT, pending)
                            row = await (await conn.execute(queue.COMPLETE_MANY, (self.owner, items))).fetchone()
                            dropped = [key for t, d, _ in batch if t.id not in set(row["accepted"])
                                       for key in d.pending_artifacts]
                            if dropped:
                                await conn.execute("DELETE FROM artifacts WHERE key = ANY (%s)", (dropped,))
                            committing = True  # the COMMIT goes out as this block ends
                    else:
                        committing = True  # autocommit: the statement is its own transaction
                        row = await (await conn.execute(queue.COMPLETE_MANY, (self.owner, items))).fetchone()
                accepted = set(row["accepted"])
                for task, _, future in batch:
                    future.set_result(task.id in accepted)
            except Exception as exc:
                error = OutcomeUnknown(exc) if committing else exc
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if committing:
                    self._start_outcome_check([task for task, _, _ in batch])

    def _start_outcome_check(self, tasks: list[ClaimedTask]) -> None:
        check = asyncio.create_task(self._check_outcomes(tasks), name="outcome-check")
        self.outcome_checks.add(check)
        check.add_done_callback(self.outcome_checks.discard)

    async def _cancel_outcome_checks(self) -> None:
        for check in list(self.outcome_checks):
            check.cancel()
        await asyncio.gather(*self.outcome_checks, return_exceptions=True)

    async def _check_outcomes(self, tasks: list[ClaimedTask]) -> None:
        """Reads back whether completions whose outcome was unknown committed: a task's result
        row (stage_results, one per task) carries the attempt that wrote it. Only a log line
        depends on it; the engine's state does not (the lease fence already made it safe).
        Tries with the listener's backoff while the database is away, a bounded number of times."""
        delay = self.settings.reconnect_delay_s
        last: BaseException | None = None
        for _ in range(OUTCOME_CHECK_TRIES):
            try:
                async with self._db() as conn:
                    rows = await (await conn.execute(
                        "SELECT task_id, attempt FROM stage_results WHERE task_id = ANY (%s)",
                        ([t.id for t in tasks],))).fetchall()
                break
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
        else:
            log.warning("could not check whether the completion of task(s) %s committed (%s); the lease fence keeps "
                        "a retry safe either way", [t.id for t in tasks], describe_error(last))
            return
        stored = {row["task_id"]: row["attempt"] for row in rows}
        for task in tasks:
            attempt = stored.get(task.id)
            if attempt == task.attempt:
                self.metrics.completed.labels(task.stage).inc()
                log.info("task %s (%s, %s): outcome known now: attempt %d committed after all; its result stands",
                         task.id, task.stage, task.subject, task.attempt, extra=task_fields(task))
            elif attempt is None:
                # No row: not committed, or committed but refused by the fence (the lease had
                # passed to another attempt, or the job was cancelled); the same for the engine.
                log.warning("task %s (%s, %s): outcome known now: attempt %d not committed (no result; or the lease "
                            "fence refused it); the task is retried like any lost attempt", task.id, task.stage,
                            task.subject, task.attempt, extra=task_fields(task))
            else:
                log.warning("task %s (%s, %s): outcome known now: attempt %d not committed; attempt %d's result "
                            "stands", task.id, task.stage, task.subject, task.attempt, attempt,
                            extra=task_fields(task))

    async def _fail(self, task: ClaimedTask, exc: BaseException) -> None:
        permanent = isinstance(exc, PermanentStageError)
        details = getattr(exc, "details", None) or None
        message = f"{type(exc).__name__}: {exc}" if not permanent else str(exc)
        delay = queue.retry_delay(task.attempt, self.settings.retry_base_s, self.settings.retry_max_s)
        async with self._db() as conn:
            row = await (await conn.execute(queue.FAIL, (
                task.id, self.owner, task.attempt, message[:10000], Jsonb(details) if details else None,
                permanent, delay))).fetchone()
        outcome = row["outcome"]
        if outcome == "retry":
            self.metrics.retries.labels(task.stage).inc()
            log.warning("stage %s failed for %s (attempt %d/%d): %s; retry in %.1f s", task.stage, task.subject,
                        task.attempt, task.max_attempts, message, delay, extra=task_fields(task))
        elif outcome == "failed":
            self.metrics.failed.labels(task.stage).inc()
            log.error("stage %s failed for %s%s: %s", task.stage, task.subject,
                      " (permanent)" if permanent else f" after {task.attempt} attempts", message,
                      extra=task_fields(task))
        else:
            self.metrics.lease_losses.inc()
            log.warning("stage %s failed for %s after its lease was lost: %s", task.stage, task.subject, message,
                        extra=task_fields(task))

    # ----------------------------------------------------------------- leases
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            ids = list(self.in_flight)
            if not ids:
                continue
            try:
                async with self._db() as conn:
                    rows = await (await conn.execute(queue.HEARTBEAT, (self.owner, ids, self.settings.lease_s))).fetchall()
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, TimeoutError) as exc:
                log.warning("heartbeat failed (%s); leases run out in %.0f s unless the database comes back",
                            describe_error(exc), self.settings.lease_s)
                continue
            # Not lost: tasks that left in_flight meanwhile, or whose completion is being recorded
            # (it may have committed, ending the lease, just before this heartbeat).
            lost = set(ids) - {r["id"] for r in rows} - (set(ids) - set(self.in_flight)) - self.settling
            for task_id in lost:
                task = self.in_flight.get(task_id)
                if task:
                    log.warning("lease lost for task %s (%s, %s): its result will be dropped", task_id, task.stage,
                                task.subject, extra=task_fields(task))


def task_fields(task: ClaimedTask) -> dict:
    return {"job_id": task.job_id, "variant_id": task.variant_id, "stage": task.stage, "attempt": task.attempt,
            "task_id": task.id}

