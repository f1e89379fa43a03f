"""The console's one listening connection and its fan-out to browsers.

The server holds a single psycopg async connection that LISTENs on the channels the engine's
triggers already publish. A notification costs no query: it is handed to the open event streams
whose filter it matches (a job page hears its own job; the other pages hear everything), and a
stream with nothing open receives nothing. So an idle console, with no browser, sends no
statement at all, and the database's pace is the browsers' only clock: no timer asks it anything.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import make_conninfo

from outbox import config, db
from outbox.errors import describe_error
from outbox.queue import JOB_CHANNEL, VARIANT_CHANNEL, WORKER_CHANNEL

log = logging.getLogger("console")


@dataclass(frozen=True)
class Change:
    """What a notification says, reduced to what a page needs to decide to re-read."""
    channel: str
    job_id: str | None = None  # None: a task queued (payload: its stage only), or a resync
    resync: bool = False  # the connection was lost: anything may have changed meanwhile


def parse(channel: str, payload: str) -> Change:
    if channel == WORKER_CHANNEL:
        return Change(channel)
    try:
        job_id = json.loads(payload).get("job_id")
    except (ValueError, AttributeError):
        job_id = None  # a stray NOTIFY on our channel: treated as "something changed"
    return Change(channel, str(job_id) if job_id else None)


@dataclass(eq=False)
class Subscriber:
    """One open event stream. job_id set: only that job's changes (and resyncs)."""
    job_id: str | None = None
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=256))

    def wants(self, change: Change) -> bool:
        if change.resync or self.job_id is None:
            return True
        return change.job_id == self.job_id

    def offer(self, change: Change) -> None:
        try:
            self.queue.put_nowait(change)
        except asyncio.QueueFull:
            # A slow browser: dropping is safe, one pending change already makes it re-read.
            pass


class Hub:
    CHANNELS = (JOB_CHANNEL, VARIANT_CHANNEL, WORKER_CHANNEL)

    def __init__(self, url: str, reconnect_delay_s: float | None = None, application_name: str | None = None):
        self.url = url
        self.conninfo = make_conninfo(url, application_name=application_name) if application_name else url
        self.reconnect_delay_s = config.reconnect_delay() if reconnect_delay_s is None else reconnect_delay_s
        self.subscribers: set[Subscriber] = set()
        self.connected = False
        self.notifications = 0  # seen since start, for /healthz
        self._task: asyncio.Task | None = None

    # --- subscriptions
    def subscribe(self, job_id: str | None = None) -> Subscriber:
        sub = Subscriber(job_id)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, change: Change) -> None:
        for sub in list(self.subscribers):
            if sub.wants(change):
                sub.offer(change)

    # --- the connection
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="console-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        delay = self.reconnect_delay_s
        first = True
        while True:
            try:
                conn = await db.connect_async(self.conninfo)
                async with conn:
                    await conn.execute(f"LISTEN {JOB_CHANNEL}")
                    await conn.execute(f"LISTEN {VARIANT_CHANNEL}")
                    await conn.execute(f"LISTEN {WORKER_CHANNEL}")
                    self.connected = True
                    log.info("[CONSOLE] LISTEN started on %s (%s)", ", ".join(self.CHANNELS), db.safe_url(self.url))
                    if not first:
                        self.publish(Change("", resync=True))
                    first = False
                    delay = self.reconnect_delay_s
                    # No timeout: a dead peer is found by TCP keepalives (outbox.db), never by a
                    # liveness query, which would make an idle console query the database.
                    async for note in conn.notifies():
                        self.notifications += 1
                        self.publish(parse(note.channel, note.payload))
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, config.ConfigError) as exc:
                log.warning("[CONSOLE] listening connection lost: %s; reconnecting in %.1f s",
                            describe_error(exc), delay)
            finally:
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(max(delay, 0.1) * 2, config.RECONNECT_MAX_S)
