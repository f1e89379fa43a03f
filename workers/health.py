"""The worker's HTTP endpoints for Kubernetes probes and Prometheus: GET /healthz, GET /readyz and
GET /metrics, nothing else (405 for another method, 404 for another path; no job content is ever
served). It runs on the worker's own event loop with asyncio's server and a minimal HTTP/1.1 reader,
so a blocked loop fails the liveness probe, as it should.

- /healthz: the process answers and its LISTEN connection is up (or it is stopping and draining).
- /readyz: LISTEN has started, the database is migrated to this code's revision (or a newer one),
  the worker is not stopping. The server starts after `workers start` has loaded the models of the
  worker's stages, so a ready worker has its models.
- /metrics: the worker's Prometheus registry. The queue gauges (depth, delayed, oldest age by
  stage) come from one query run when Prometheus scrapes, never on a timer; GPU memory gauges are
  read only when torch is already imported and CUDA is initialised (never imported here).

Address: `--health-addr HOST:PORT` or HEALTH_ADDR (default 127.0.0.1:8080; "" turns it off). Under
`--processes N` each child serves on PORT + its slot (0..N-1).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from outbox.views import QUEUE_SQL

if TYPE_CHECKING:
    from workers.worker import Worker

log = logging.getLogger("workers.health")

ENV_ADDR = "HEALTH_ADDR"
DEFAULT_ADDR = "127.0.0.1:8080"
SLOT_ENV = "ADFLOW_WORKER_SLOT"
PATHS = ("/healthz", "/readyz", "/metrics")
MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
QUERY_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}


class AddressError(ValueError):
    pass


def parse_addr(value: str | None) -> tuple[str, int] | None:
    """'HOST:PORT' (IPv6 as '[::]:8080') to (host, port); '' or 'off' to None (no server)."""
    value = (value or "").strip()
    if value.lower() in ("", "off", "none"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"health address {value!r}: expected HOST:PORT, e.g. 0.0.0.0:8080 (or '' for none)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def resolve_addr(option: str | None) -> str:
    """The address in force: the option, else HEALTH_ADDR, else the default; checked."""
    value = option if option is not None else os.environ.get(ENV_ADDR, DEFAULT_ADDR)
    parse_addr(value)
    return value


def offset_addr(value: str, slot: int) -> str:
    """The address of worker process `slot` under a supervisor: the port moved up by the slot."""
    parsed = parse_addr(value)
    if parsed is None or slot == 0:
        return value
    host, port = parsed
    if port + slot > 65535:
        raise AddressError(f"health port {port} + worker slot {slot} is past 65535")
    return f"[{host}]:{port + slot}" if ":" in host else f"{host}:{port + slot}"


class HealthServer:
    def __init__(self, worker: "Worker", host: str, port: int):
        self.worker = worker
        self.host, self.port = host, port
        self.server: asyncio.base_events.Server | None = None
        self.schema: tuple[str, list[str]] | None = None  # (state, revisions) once it was fine
        self.connections = asyncio.Semaphore(MAX_CONNECTIONS)
        self.queue_error_logged = 0.0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES,
                                                 reuse_address=True)
        bound = self.server.sockets[0].getsockname()
        self.port = bound[1]
        log.info("health endpoints on http://%s:%d (/healthz, /readyz, /metrics)",
                 f"[{self.host}]" if ":" in self.host else self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
            self.server = None

    # ----------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections.locked():
            writer.close()
            return
        async with self.connections:
            try:
                status, ctype, body = await self._respond(reader)
            except Exception as exc:  # never let a probe take the worker down
                log.warning("health request failed: %r", exc)
                status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            if status is not None:
                head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n")
                if status == 405:
                    head += "Allow: GET\r\n"
                try:
                    writer.write(head.encode("ascii") + b"\r\n" + body)
                    await asyncio.wait_for(writer.drain(), READ_TIMEOUT_S)
                except (ConnectionError, asyncio.TimeoutError):
                    pass
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (ConnectionError, asyncio.TimeoutError):
                pass

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int | None, str, bytes]:
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None, text, b""  # a TCP check that connects and closes
            return 400, text, b"bad request\n"
        except asyncio.LimitOverrunError:
            return 431, text, b"request head too large\n"
        except asyncio.TimeoutError:
            return 408, text, b"request timeout\n"
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, text, b"bad request\n"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        if path not in PATHS:
            return 404, text, b"not found\n"
        if method != "GET":
            return 405, text, b"method not allowed\n"
        if path == "/healthz":
            return self.healthz()
        if path == "/readyz":
            return await self.readyz()
        return 200, CONTENT_TYPE_LATEST, await self.metrics()

    # ----------------------------------------------------------------- endpoints
    def healthz(self) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        status = self.worker.state.status()
        if status.stopping:
            return 200, text, b"ok: stopping, finishing in-flight tasks\n"
        if status.listening:
            return 200, text, b"ok: listener connected\n"
        if status.started:
            return 503, text, b"listener disconnected: reconnecting\n"
        return 503, text, b"listener not connected yet\n"

    async def readyz(self) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        status = self.worker.state.status()
        schema = await self._schema()
        problems = self.problems(status, schema)
        self.worker.metrics.ready.set(0 if problems else 1)
        if problems:
            return 503, text, ("not ready: " + "; ".join(problems) + "\n").encode()
        return 200, text, (f"ready: stages {','.join(status.stages)}; schema {','.join(schema[1])} ({schema[0]}); "
                           "models loaded; listener connected\n").encode()

    @staticmethod
    def problems(status, schema: tuple[str, list[str]]) -> list[str]:
        """Why the worker is not ready, from one status snapshot; [] when it is."""
        problems = []
        if status.stopping:
            problems.append("stopping")
        if not status.started:
            problems.append("LISTEN has not started yet")
        elif not status.listening:
            problems.append("listener disconnected")
        if schema[0] not in ("head", "ahead"):
            problems.append(f"database schema {schema[0]} ({','.join(schema[1]) or 'none'}): run `cli.py db upgrade`")
        return problems

    async def _schema(self) -> tuple[str, list[str]]:
        """Checked against the database until it is fine once, then answered from memory: a ready
        worker's probes send no query."""
        if self.schema is not None:
            return self.schema
        from outbox import migrate

        try:
            async def query() -> list[str]:
                async with self.worker.pool.pool.connection(timeout=QUERY_TIMEOUT_S) as conn:
                    row = await (await conn.execute(migrate.HAS_SCHEMA)).fetchone()
                    if not row["ok"]:
                        return []
                    rows = await (await conn.execute(migrate.CURRENT_REVISIONS)).fetchall()
                    return sorted(r["version_num"] for r in rows)

            current = await asyncio.wait_for(query(), QUERY_TIMEOUT_S)
        except Exception as exc:
            return "unreachable", [type(exc).__name__]
        state = migrate.schema_state(set(current))
        if state in ("head", "ahead"):
            self.schema = (state, current)
        return state, current

    async def metrics(self) -> bytes:
        m = self.worker.metrics
        status = self.worker.state.status()
        m.listener_connected.set(1 if status.listening else 0)
        m.in_flight.set(status.in_flight)
        m.ready.set(0 if self.problems(status, await self._schema()) else 1)
        await self._queue_gauges()
        gpu_memory(m)
        return generate_latest(m.registry)

    async def _queue_gauges(self) -> None:
        m = self.worker.metrics
        try:
            async def query() -> list[dict]:
                async with self.worker.pool.pool.connection(timeout=QUERY_TIMEOUT_S) as conn:
                    return await (await conn.execute(QUEUE_SQL)).fetchall()  # outbox/views.py

            rows = await asyncio.wait_for(query(), QUERY_TIMEOUT_S)
        except Exception as exc:
            # Left at their last values; said once a minute at most.
            if time.monotonic() - self.queue_error_logged > 60:
                self.queue_error_logged = time.monotonic()
                log.warning("metrics: queue gauges not refreshed: %s", str(exc).strip() or type(exc).__name__)
            return
        for row in rows:
            m.queue_depth.labels(row["stage"]).set(row["claimable"])
            m.queue_delayed.labels(row["stage"]).set(row["delayed"])
            m.queue_oldest_age.labels(row["stage"]).set(row["oldest_s"] or 0.0)


def gpu_memory(m) -> None:
    """GPU memory gauges, only where this process already runs torch on CUDA."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    if cuda is None:
        return
    try:
        if not (cuda.is_available() and cuda.is_initialized()):
            return
        for index in range(cuda.device_count()):
            device = f"cuda:{index}"
            m.gpu_memory_allocated.labels(device).set(cuda.memory_allocated(index))
            m.gpu_memory_reserved.labels(device).set(cuda.memory_reserved(index))
    except Exception as exc:  # a driver error must not break the scrape
        log.debug("gpu memory gauges: %r", exc)


async def start_health_server(worker: "Worker", addr: str | None) -> HealthServer | None:
    """Starts the endpoints on `addr`; None when turned off. A port that cannot be bound is logged
    and the worker runs on without endpoints (on Kubernetes the probes then fail and say so)."""
    parsed = parse_addr(addr)
    if parsed is None:
        return None
    server = HealthServer(worker, *parsed)
    try:
        await server.start()
    except OSError as exc:
        log.error("health endpoints: cannot listen on %s: %s; running without them", addr, exc.strerror or exc)
        return None
    return server
