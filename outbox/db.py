"""Connections: the URL in force (configured or embedded), psycopg connections and pools, and
the SQLAlchemy engine URL for Alembic."""
from __future__ import annotations

import atexit
import socket

import psycopg
from psycopg.rows import dict_row

from outbox import config

# TCP keepalives on every connection: a half-open connection (peer gone without a FIN) is noticed
# within idle + interval * count = 10 + 5 * 3 = 25 s instead of the kernel's two hours.
KEEPALIVE_KWARGS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}

# Worker pool connections. prepare_threshold=None: no server-side prepared statements, because
# behind PgBouncer in transaction mode consecutive statements may land on different server
# connections, where a statement prepared on one does not exist.
POOL_KWARGS = {"autocommit": True, "row_factory": dict_row, "prepare_threshold": None, **KEEPALIVE_KWARGS}

_embedded = None


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached; the message says which one and why."""


class NotMigrated(RuntimeError):
    """The database is reachable but has not been migrated (run `cli.py db upgrade`)."""


def resolve_url(start_embedded: bool = True) -> str:
    """The configured database, or the embedded PostgreSQL under ADFLOW_HOME (started if needed,
    as a child that stops with this process)."""
    url = config.database_url()
    if url:
        return url
    if not start_embedded:
        raise config.ConfigError("no DATABASE_URL or DB_HOST set")
    global _embedded
    if _embedded is None:
        from outbox.embedded import EmbeddedPostgres

        _embedded = EmbeddedPostgres(config.home_dir() / "pgdata")
        _embedded.start()
        atexit.register(_embedded.stop)
    return _embedded.url


def sqlalchemy_url(url: str | None = None) -> str:
    url = url or resolve_url()
    return "postgresql+psycopg://" + url[len("postgresql://"):]


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except (psycopg.ProgrammingError, ValueError):  # unparsable: it must not hide the first error
        return config.redact_url(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def invalid_url(url: str, exc: Exception) -> config.ConfigError:
    """libpq refused the URL itself (not the server): a setting to fix, like config's checks.
    config.check_database_url catches what it can first; this is the net for the rest."""
    reason = config.scrub(str(exc), url) or type(exc).__name__
    return config.ConfigError(f"invalid database URL {config.redact_url(url)}: {reason}")


def connect(url: str, autocommit: bool = True, **kwargs) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=autocommit, row_factory=dict_row,
                               connect_timeout=10, **KEEPALIVE_KWARGS, **kwargs)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {safe_url(url)}: {str(exc).strip()}") from exc
    except psycopg.ProgrammingError as exc:  # e.g. an unknown query parameter, an unclosed '['
        raise invalid_url(url, exc) from exc


async def connect_async(url: str, autocommit: bool = True) -> psycopg.AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, row_factory=dict_row,
                                                     connect_timeout=10, **KEEPALIVE_KWARGS)
    except psycopg.ProgrammingError as exc:
        raise invalid_url(url, exc) from exc


def check_migrated(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT to_regclass('stage_tasks') IS NOT NULL AS ok").fetchone()
    if not row["ok"]:
        raise NotMigrated("the database has no pipeline schema: run `cli.py db upgrade` first")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
