"""One worker process: a small supervisor of named services that share one WorkerState.

    listener    LISTEN, self-test, liveness, reconnect         workers/listener.py
    dispatcher  wait for a kick or a deadline; rescue; claim   workers/dispatcher.py
    executor    run stages in threads; settle each outcome     workers/executor.py
    completer   group commit of results (fenced)               workers/completer.py
    heartbeat   renew leases of the tasks in flight            workers/heartbeat.py

This file starts them after checking the stage graph, stops them on SIGTERM (finish in flight for
the grace, hand back the rest), and stops the worker when one of them dies. No fixed-interval
polling: with nothing queued and nothing running elsewhere the worker sleeps on its listening
socket and sends no query at all.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass, field

import psycopg

from outbox import graph as stage_graph
from outbox import queue
from outbox.config import RECONNECT_MAX_S
from outbox.errors import describe_error
from stages.contract import StageSpec
from workers.completer import Completer
from workers.dispatcher import Dispatcher
from workers.executor import Executor
from workers.heartbeat import Heartbeat
from workers.listener import Listener, WorkerStartError
from workers.metrics import Metrics
from workers.pool import UNREACHABLE, BoundedPool
from workers.runner import TaskRunner
from workers.state import WorkerState

__all__ = ["Worker", "WorkerSettings", "WorkerStartError", "new_worker_id"]

log = logging.getLogger("workers")


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
    model_profile: str | None = None  # --models, for adflow_build_info (None: MODEL_PROFILE)



class Worker:
    def __init__(self, settings: WorkerSettings, registry: dict[str, StageSpec], runner: TaskRunner,
                 metrics: Metrics | None = None):
        self.settings = settings
        self.registry = registry
        self.owner = settings.worker_id
        self.metrics = metrics or Metrics(model_profile=settings.model_profile, stages=lambda: self.state.stages)
        self.state = WorkerState()
        self.pool = BoundedPool(settings.url, settings.concurrency + 3, settings.db_timeout_s,
                                application_name=self.owner)
        shared = (settings, self.state, self.pool, self.metrics, self.owner)
        self.completer = Completer(*shared)
        self.executor = Executor(*shared, registry=registry, runner=runner, completer=self.completer)
        self.dispatcher = Dispatcher(*shared, executor=self.executor)
        self.completer.claim_with, self.completer.took = self.dispatcher.claim_with, self.dispatcher.took
        self.listener = Listener(*shared)
        self.heartbeat = Heartbeat(*shared)

    @property
    def stages(self) -> tuple[str, ...]:
        return self.state.stages

    # ----------------------------------------------------------------- lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            except (NotImplementedError, RuntimeError):
                pass  # not the main thread (tests drive the worker in-process)
        await self.pool.open(wait=False)
        try:
            await self._check_graph()
            await self._register()
        except UNREACHABLE as exc:
            # The database is not there (yet): the pool retries in the background and the first
            # operation times out after db_timeout_s with an exception that names no cause.
            # One direct attempt tells why ("Connection refused", a bad password, ...).
            why = await self.pool.why_unreachable()
            await self.pool.close()
            raise WorkerStartError(f"cannot use the database at {self.pool.safe_url}: "
                                   f"{describe_error(exc)}; {why}") from exc
        except Exception:
            await self.pool.close()
            raise
        log.info("worker %s started: stages %s, concurrency %d", self.owner, ",".join(self.stages),
                 self.settings.concurrency)
        from workers.health import start_health_server

        health = await start_health_server(self, self.settings.health_addr)  # before LISTEN: probes see it start
        services = {
            asyncio.create_task(self.listener.run(), name="listener"),
            asyncio.create_task(self.dispatcher.run(), name="dispatcher"),
            asyncio.create_task(self.heartbeat.run(), name="heartbeat"),
            asyncio.create_task(self.completer.run(), name="completer"),
        }
        stop_wait = asyncio.create_task(self.state.stopped.wait())
        done, _ = await asyncio.wait(services | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        for task in done:
            exc = None if task is stop_wait or task.cancelled() else task.exception()
            if task is not stop_wait and (exc is not None or not self.state.stopping):
                # A service never ends on its own: if one did, the worker is broken; stop it so
                # the supervisor (or Kubernetes) restarts it rather than run half-alive.
                log.error("worker service %s died: %r; stopping", task.get_name(), exc)
                exit_code = 1
        self.state.stop()
        await self._drain_and_hand_back(services)
        for task in services | {stop_wait}:
            task.cancel()
        await asyncio.gather(*services, stop_wait, return_exceptions=True)
        await self.completer.cancel_outcome_checks()
        await self._deregister()
        if health:
            await health.close()
        await self.pool.close()
        self.executor.shutdown()
        log.info("worker %s stopped", self.owner)
        return exit_code

    async def run_task(self, task_id: int) -> str:
        """Claims one given task and runs it here and now (`cli.py run-stage`), through the same
        executor and completer as a running worker. Returns the task's status afterwards."""
        await self.pool.open(wait=False)
        completer = asyncio.create_task(self.completer.run(), name="completer")
        try:
            await self._check_graph()
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(
                    queue.CLAIM, (self.owner, list(self.stages), 1, self.settings.lease_s, task_id, True))).fetchall()
            tasks, _ = queue.split_claim(rows)
            if not tasks:
                return "not claimable"
            self.state.claimed(tasks, waiting=False)
            await self.executor.run_batch(tasks)
            async with self.pool.connection() as conn:
                row = await (await conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (task_id,))).fetchone()
            return row["status"]
        finally:
            completer.cancel()
            await asyncio.gather(completer, return_exceptions=True)
            await self.completer.cancel_outcome_checks()
            await self.pool.close()
            self.executor.shutdown()

    def request_stop(self, why: str = "request") -> None:
        if self.state.stop():
            log.info("worker %s stopping (%s): no new claims, finishing in-flight tasks for up to %.0f s",
                     self.owner, why, self.settings.grace_s)

    async def _check_graph(self) -> None:
        async with self.pool.connection() as conn:
            exists = await (await conn.execute("SELECT to_regclass('stage_graph') IS NOT NULL AS ok")).fetchone()
            if not exists["ok"]:
                raise WorkerStartError("the database has no pipeline schema: run `cli.py db upgrade` first")
            graph = await stage_graph.read_async(conn)
        known = graph.names()
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
            if self.registry[stage].device != graph.get(stage).device:
                log.warning("stage %s is a %s stage in the registry, but the stage graph (which pools and KEDA "
                            "follow) routes it to the %s pool",
                            stage, self.registry[stage].device, graph.get(stage).device)
        # Later pipeline stages first: a claim takes work that finishes jobs in flight before
        # work that starts new ones (see outbox_claim_v2).
        position = {stage: i for i, stage in enumerate(known)}
        self.state.stages = tuple(sorted(wanted, key=position.__getitem__, reverse=True))
        self.executor.timeouts = {s: float(graph.get(s).timeout_s) for s in wanted}
        self.completer.last_job_stage = graph.last("job")

    async def _register(self) -> None:
        """One row in `workers` (migration 0004) for `cli.py workers list`; a database still at
        0003 only loses that listing."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute(queue.REGISTER_WORKER, (self.owner, socket.gethostname(), os.getpid(),
                                                           list(self.stages), self.settings.lease_s))
        except psycopg.errors.UndefinedTable:
            log.warning("no workers table (database before migration 0004: run `cli.py db upgrade`); "
                        "this worker is not listed by `cli.py workers list`")
        except psycopg.errors.InsufficientPrivilege as exc:
            log.warning("cannot register in the workers table (%s; deploy/sql/worker_grants.sql grants it): "
                        "this worker is not listed by `cli.py workers list`", describe_error(exc))

    async def _deregister(self) -> None:
        try:
            async with self.pool.connection() as conn:
                await conn.execute(queue.DEREGISTER_WORKER, (self.owner,))
        except (psycopg.Error, TimeoutError) as exc:
            # Listed as dead ("went quiet") instead of stopped: nothing else depends on it.
            log.warning("could not record this worker's stop (%s)", describe_error(exc))

    async def _drain_and_hand_back(self, services: set[asyncio.Task]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.grace_s
        # A claim in flight ends first: what it took is then run (or handed back below), not
        # left running under our name until its lease runs out (or cancelled mid-claim).
        dispatcher = [t for t in services if t.get_name() == "dispatcher" and not t.done()]
        if dispatcher:
            self.state.kick()
            await asyncio.wait(dispatcher, timeout=self.settings.db_timeout_s)
        # Executions started meanwhile count too: wait until none is left or the grace is over.
        while self.executor.executions and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self.executor.executions), timeout=left)
        leftover = list(self.state.in_flight)
        if not leftover:
            return
        try:
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(queue.HAND_BACK, (self.owner, leftover))).fetchall()
            log.warning("handed back %d unfinished task(s) at shutdown: %s", len(rows), [r["id"] for r in rows])
        except (psycopg.Error, TimeoutError) as exc:
            log.error("could not hand back %d task(s) (%s); their leases will expire and another worker takes them",
                      len(leftover), describe_error(exc))
