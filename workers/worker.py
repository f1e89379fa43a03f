"""One worker process: LISTEN, wait for a notification or the earliest deadline, claim, run,
heartbeat, complete; reconnect after a lost connection; stop gracefully.

No fixed-interval polling: with nothing queued and nothing running elsewhere the worker sleeps on
its listening socket and sends no query at all.
"""
from __future__ import annotations

import asyncio
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
from workers.runner import TaskRunner

log = logging.getLogger("workers")

# The smallest wait before acting on a deadline that has already passed: a task another worker
# is claiming right now shows as due but is locked; acting again at once would spin.
MIN_DEADLINE_WAIT_S = 0.05
COMPLETION_BATCH = 200


class WorkerStartError(RuntimeError):
    """The worker cannot start (unknown stage, schema missing, graph and registry disagree)."""


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
    grace_s: float = 30.0
    reconnect_delay_s: float = 5.0
    reconnect_max_s: float = 60.0
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    worker_id: str = field(default_factory=new_worker_id)


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
            kwargs={"autocommit": True, "row_factory": psycopg.rows.dict_row, **db.KEEPALIVE_KWARGS})
        await self.pool.open(wait=False)
        try:
            await self._check_graph()
        except Exception:
            await self.pool.close()
            raise
        log.info("worker %s started: stages %s, concurrency %d", self.owner, ",".join(self.stages),
                 self.settings.concurrency)
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
                                       kwargs={"autocommit": True, "row_factory": psycopg.rows.dict_row}) as pool:
            self.pool = pool
            await self._check_graph()
            flusher = asyncio.create_task(self._flush_completions())
            try:
                async with pool.connection() as conn:
                    rows = await (await conn.execute(
                        queue.CLAIM, (self.owner, self.stages, 1, self.settings.lease_s, task_id))).fetchall()
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
                self.executor.shutdown(wait=False)

    def request_stop(self, why: str = "request") -> None:
        if not self.stopping:
            log.info("worker %s stopping (%s): no new claims, finishing in-flight tasks for up to %.0f s",
                     self.owner, why, self.settings.grace_s)
        self.stopping = True
        if self.stop_event is not None:
            self.stop_event.set()
            self.wake.set()

    async def _check_graph(self) -> None:
        async with self.pool.connection() as conn:
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
        self.stages = wanted
        self.timeouts = {s: float(known[s]["timeout_s"]) for s in wanted}

    async def _drain_and_hand_back(self, side_tasks: set[asyncio.Task]) -> None:
        if self.executions:
            await asyncio.wait(self.executions, timeout=self.settings.grace_s)
        leftover = list(self.in_flight)
        if not leftover:
            return
        try:
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(queue.HAND_BACK, (self.owner, leftover))).fetchall()
            log.warning("handed back %d unfinished task(s) at shutdown: %s", len(rows), [r["id"] for r in rows])
        except psycopg.Error as exc:
            log.error("could not hand back %d task(s) (%s); their leases will expire and another worker takes them",
                      len(leftover), exc)

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
                    log.info("[LISTENER] LISTEN started on %s (%s)", queue.WORKER_CHANNEL, db.safe_url(url))
                    if self.connected_once:
                        await self.pool.check()  # the server may have restarted: drop dead pooled connections
                    self.connected_once = True
                    self.listener_connected = True
                    self.ready = True
                    delay = self.settings.reconnect_delay_s
                    self.rescue_due = True
                    self.kick()  # drain: anything enqueued while we were away is claimed now
                    async for note in conn.notifies():
                        self.metrics.notifications.inc()
                        if note.payload in stage_set:
                            log.debug("[LISTENER] task queued for stage %s", note.payload)
                            self.kick()
            except (psycopg.OperationalError, OSError) as exc:
                self.listener_connected = False
                if self.stopping:
                    return
                self.metrics.reconnects.inc()
                log.warning("[LISTENER] connection lost (%s); reconnect attempt in %.1f s",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, delay)
                try:
                    await asyncio.wait_for(self.stop_event.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, self.settings.reconnect_max_s)

    def kick(self) -> None:
        self.wake.set()

    # ----------------------------------------------------------------- claiming
    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping:
            timeout = None if self.deadline is None else max(0.0, self.deadline - loop.time())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except asyncio.TimeoutError:
                self.rescue_due = True
            self.wake.clear()
            if self.stopping or not self.listener_connected:
                # Without a listener we could miss work; the reconnect kicks us once it is back.
                self.deadline = None
                continue
            try:
                await self._fill()
                failures = 0
            except (psycopg.OperationalError, PoolTimeout) as exc:
                failures += 1
                backoff = min(self.settings.reconnect_delay_s * failures, self.settings.reconnect_max_s)
                log.warning("claim failed (%s); trying again in %.1f s", str(exc).strip() or type(exc).__name__, backoff)
                self.deadline = loop.time() + backoff

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.pool.connection() as conn:
            if self.rescue_due:
                self.rescue_due = False
                rescued = await (await conn.execute(queue.RESCUE_EXPIRED, (1000,))).fetchall()
                for row in rescued:
                    log.warning("recovery: task %s had an expired lease: %s", row["id"], row["outcome"])
                    self.metrics.lease_rescues.inc()
            seconds = None
            while not self.stopping:
                free = self.settings.concurrency - len(self.in_flight)
                if free <= 0:
                    self.saturated = True
                    self.deadline = None  # a completion will wake us
                    return
                rows = await (await conn.execute(
                    queue.CLAIM, (self.owner, self.stages, free, self.settings.lease_s, None))).fetchall()
                tasks, seconds = queue.split_claim(rows)
                self._start(tasks)
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
            log.error("could not record the outcome of task %s (%s): %s; its lease will expire and it runs again",
                      task.id, task.stage, exc, extra=task_fields(task))
        finally:
            self.in_flight.pop(task.id, None)

    async def _complete(self, task: ClaimedTask, result: dict) -> bool:
        future = asyncio.get_running_loop().create_future()
        await self.completions.put((task, result, future))
        return await future

    async def _flush_completions(self) -> None:
        """Group commit: every completion waiting when the previous commit ends goes in one
        transaction, so under load round trips per task fall while a lone task waits for none."""
        while True:
            batch = [await self.completions.get()]
            while not self.completions.empty() and len(batch) < COMPLETION_BATCH:
                batch.append(self.completions.get_nowait())
            items = Jsonb([{"id": t.id, "attempt": t.attempt, "result": r} for t, r, _ in batch])
            try:
                async with self.pool.connection() as conn:
                    row = await (await conn.execute(queue.COMPLETE_MANY, (self.owner, items))).fetchone()
                accepted = set(row["accepted"])
                for task, _, future in batch:
                    future.set_result(task.id in accepted)
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    async def _fail(self, task: ClaimedTask, exc: BaseException) -> None:
        permanent = isinstance(exc, PermanentStageError)
        details = getattr(exc, "details", None) or None
        message = f"{type(exc).__name__}: {exc}" if not permanent else str(exc)
        delay = queue.retry_delay(task.attempt, self.settings.retry_base_s, self.settings.retry_max_s)
        async with self.pool.connection() as conn:
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
                async with self.pool.connection() as conn:
                    rows = await (await conn.execute(queue.HEARTBEAT, (self.owner, ids, self.settings.lease_s))).fetchall()
            except (psycopg.OperationalError, PoolTimeout) as exc:
                log.warning("heartbeat failed (%s); leases run out in %.0f s unless the database comes back",
                            exc, self.settings.lease_s)
                continue
            lost = set(ids) - {r["id"] for r in rows} - (set(ids) - set(self.in_flight))
            for task_id in lost:
                task = self.in_flight.get(task_id)
                if task:
                    log.warning("lease lost for task %s (%s, %s): its result will be dropped", task_id, task.stage,
                                task.subject, extra=task_fields(task))


def task_fields(task: ClaimedTask) -> dict:
    return {"job_id": task.job_id, "variant_id": task.variant_id, "stage": task.stage, "attempt": task.attempt,
            "task_id": task.id}

