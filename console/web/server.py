"""Starting the console: the address and token rules checked before anything binds, the schema
checked once, then uvicorn serving the app until SIGINT or SIGTERM."""
from __future__ import annotations

import contextlib
import logging
import signal

from outbox import config, db

log = logging.getLogger("console")

# Open event streams never end on their own: on a stop, uvicorn waits this long, then closes them.
GRACEFUL_SHUTDOWN_S = 3


def parse_addr(addr: str) -> tuple[str, int]:
    """HOST:PORT, with [IPv6]:PORT."""
    host, sep, port = addr.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise config.ConfigError(f"--addr {addr!r}: give HOST:PORT, e.g. 127.0.0.1:8090")
    return host, int(port)


def serve(addr: str, read_only: bool = False) -> None:
    import uvicorn

    from console.web.app import create_app
    from console.web.security import Access
    from workers.logs import setup_logging

    host, port = parse_addr(addr)
    access = Access.configure(host, read_only=read_only)  # refuses a public address without CONSOLE_TOKEN
    url = db.resolve_url()
    conn = db.connect(url)
    try:
        db.check_migrated(conn)
    finally:
        conn.close()
    setup_logging("console")
    app = create_app(url, access)
    shown = f"[{host}]" if ":" in host else host
    log.info("[CONSOLE] serving http://%s:%d/ (%s%s, database %s)", shown, port,
             "token required" if access.tokens else "localhost only, no token",
             ", read-only" if read_only else "", db.safe_url(url))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on"))
    # uvicorn re-raises SIGTERM once it has stopped (the process then dies of the signal): a stop
    # that was asked for is a clean exit here, 0, as the workers' is.
    server.capture_signals = contextlib.nullcontext
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    server.run()
