"""Settings read from the environment, with the names and defaults the old system's operators use."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

PROJECT_ROOT = Path(__file__).resolve().parent.parent

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={raw!r}: expected one of true/1/yes/on or false/0/no/off")


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be >= {minimum}")
    return value


def database_url() -> str | None:
    """DATABASE_URL, else one built from DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD, else None
    (the caller then starts the embedded PostgreSQL)."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return normalise_url(url)
    host = os.environ.get("DB_HOST", "").strip()
    if not host:
        return None
    port = os.environ.get("DB_PORT", "5432").strip() or "5432"
    name = os.environ.get("DB_NAME", "postgres").strip() or "postgres"
    user = os.environ.get("DB_USER", "").strip()
    password = os.environ.get("DB_PASSWORD", "")
    auth = ""
    if user:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
    return f"postgresql://{auth}{host}:{port}/{quote(name, safe='')}"


def normalise_url(url: str) -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    raise ConfigError(f"database URL must start with postgresql:// or postgres:// (got {url.split(':', 1)[0]}://...)")


def listen_database_url(default: str) -> str:
    """The worker's LISTEN connection may bypass a transaction-mode pooler, where LISTEN fails."""
    url = os.environ.get("LISTEN_DATABASE_URL", "").strip()
    return normalise_url(url) if url else default


def listener_enabled() -> bool:
    return env_bool("ENABLE_JOB_STATE_LISTENER", True)


def reconnect_delay() -> float:
    return env_float("JOB_STATE_LISTENER_RECONNECT_DELAY", 5.0)


def db_timeout() -> float:
    """Seconds one worker database operation may take before its connection counts as dead."""
    return env_float("DB_OPERATION_TIMEOUT", 30.0, minimum=0.1)


def liveness_interval() -> float:
    """Seconds of silence on a worker's listening connection before it must answer a query."""
    return env_float("DB_LIVENESS_INTERVAL", 30.0, minimum=0.1)


def home_dir() -> Path:
    """Where the embedded database, artifacts and demo outputs live on one machine."""
    return Path(os.environ.get("ADFLOW_HOME") or PROJECT_ROOT / ".adflow").resolve()


def asset_root() -> Path:
    """Outside writers' image paths ("file:..." assets) must resolve inside this folder."""
    return Path(os.environ.get("ASSET_ROOT") or home_dir() / "assets").resolve()
