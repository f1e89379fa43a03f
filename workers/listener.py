"""The listener service: one connection LISTENing on the engine's channel, a self-test at start,
a liveness query after silence, and reconnection with backoff. It wakes the dispatcher; it never
claims anything itself."""
from __future__ import annotations

import asyncio
import logging

import psycopg
from psycopg.conninfo import make_conninfo

from outbox import db, queue
from outbox.errors import describe_error
from workers import trace
from workers.state import Service

log = logging.getLogger("workers")


class WorkerStartError(RuntimeError):
    """The worker cannot start (unknown stage, schema missing, graph and registry disagree, a
    listening connection that hears nothing)."""


class Listener(Service):
    def __init__(self, *shared) -> None:
        super().__init__(*shared)
        # Written here only: whether a connection has ever been up (a later one is a reconnect,
        # and replaces the pool's connections).
        self.connected_once = False

    async def run(self) -> None:
        delay = self.settings.reconnect_delay_s
        url = self.settings.listen_url or self.settings.url
        # Named after the worker: this connection stays open while the worker runs, so its backend
        # in pg_stat_activity is how `workers list` knows the worker is alive (no query of ours).
        named = make_conninfo(url, application_name=self.owner)
        stage_set = set(self.state.stages)
        while not self.state.stopping:
            try:
                conn = await db.connect_async(named)
                async with conn:
                    await conn.execute(f"LISTEN {queue.WORKER_CHANNEL}")
                    if not self.connected_once:
                        await self._self_test(conn, stage_set)
                    else:
                        # The server may have restarted, or the old connections gone half-open:
                        # replace every pooled connection (those in use when they come back).
                        # Not pool.check(): it tests them one by one, and one that stopped
                        # answering would hold it (and the connections it took out) for good.
                        await self.pool.drain()
                    self.connected_once = True
                    self.state.linked()
                    # Logged once the probes answer 200: tests and operators read it as "serving".
                    log.info("[LISTENER] LISTEN started on %s (%s)", queue.WORKER_CHANNEL, db.safe_url(url))
                    delay = self.settings.reconnect_delay_s
                    while not self.state.stopping:
                        heard = False
                        async for note in conn.notifies(timeout=self.settings.liveness_s):
                            heard = True
                            trace.step("heard")
                            self.metrics.notifications.inc()
                            if note.payload in stage_set:
                                log.debug("[LISTENER] task queued for stage %s", note.payload)
                                self.state.kick()
                        if not heard:
                            await self._check_alive(conn)
            except (psycopg.OperationalError, OSError) as exc:
                self.state.unlinked()
                if self.state.stopping:
                    return
                self.metrics.reconnects.inc()
                log.warning("[LISTENER] connection lost (%s); reconnect attempt in %.1f s", describe_error(exc), delay)
                try:
                    await asyncio.wait_for(self.state.stopped.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _self_test(self, conn: psycopg.AsyncConnection, stage_set: set[str]) -> None:
        """Sends ourselves a notification through the pool and waits for it on the listening
        connection. A listener behind a transaction-mode pooler LISTENs on a server connection it
        gives straight back, and then hears nothing, ever: better to stop now, saying why."""
        token = f"selftest {self.owner}"
        async with self.pool.connection() as pooled:
            await pooled.execute("SELECT pg_notify(%s, %s)", (queue.WORKER_CHANNEL, token))
        async for note in conn.notifies(timeout=self.settings.selftest_s):
            if note.payload == token:
                return
            if note.payload in stage_set:
                self.state.kick()
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
