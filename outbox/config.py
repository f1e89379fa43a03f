"""Settings read from the environment, with the names and defaults the old system's operators use."""
from __future__ import annotations

import os
import re
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
    (the caller then starts the embedded PostgreSQL). Checked here (check_database_url), so a
    malformed value is a ConfigError naming the problem, never a traceback from libpq."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        return normalise_url(url, "DATABASE_URL")
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
    return normalise_url(f"postgresql://{auth}{host}:{port}/{quote(name, safe='')}", "DB_HOST/DB_PORT/DB_NAME")


def normalise_url(url: str, name: str = "DATABASE_URL") -> str:
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return check_database_url("postgresql://" + url[len(prefix):], name)
    raise ConfigError(f"{name}: database URL must start with postgresql:// or postgres:// "
                      f"(got {redact_url(url).split(':', 1)[0]}://...)")


def scrub(message: str, url: str) -> str:
    """A libpq message about `url` on one line, the URL redacted and its password (which the
    message may quote in part, e.g. a bad %-escape in it) nowhere."""
    message = str(message).replace(url, redact_url(url))
    found = re.match(r"^[a-z+]+://[^/?#@:]*:([^/?#]*)@", url)
    secrets = [found.group(1)] if found else []
    secrets += re.findall(r"[?&]password=([^&]*)", url)
    for secret in filter(None, secrets):
        message = message.replace(secret, "***")
    return " ".join(message.split())


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages."""
    url = re.sub(r"^([a-z+]+://[^/?#@:]*):[^/?#]*@", r"\1:***@", url)  # to the last '@': p@ss too
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


# Parameters libpq itself checks only when it connects, where a bad value reads like an
# unreachable server (an OperationalError: exit 4, "cannot connect"). Checked here instead.
CHOICES = {
    "sslmode": {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"},
    "gssencmode": {"disable", "prefer", "require"},
    "channel_binding": {"disable", "prefer", "require"},
    "target_session_attrs": {"any", "read-write", "read-only", "primary", "standby", "prefer-standby"},
    "load_balance_hosts": {"disable", "random"},
}
INTEGERS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
            "tcp_user_timeout")


def check_database_url(url: str, name: str = "DATABASE_URL") -> str:
    """The URL if libpq can use it, else ConfigError with a one-line reason (password hidden).

    libpq parses it (psycopg.conninfo.conninfo_to_dict): that refuses an unbalanced '[' in an
    IPv6 host, an unknown query parameter, bad percent-encoding, spaces. Then the values libpq
    would only refuse while connecting: port numbers, enumerated and integer parameters."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    shown = redact_url(url)
    try:
        params = conninfo_to_dict(url)
    except (psycopg.ProgrammingError, ValueError) as exc:
        reason = scrub(str(exc), url) or type(exc).__name__
        raise ConfigError(f"{name} is not a valid PostgreSQL URL: {reason}") from None
    for port in str(params.get("port", "")).split(","):
        port = port.strip()
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"{name}: invalid port {port!r} in {shown}: expected a number from 1 to 65535")
    for key, allowed in CHOICES.items():
        if key in params and params[key] not in allowed:
            raise ConfigError(f"{name}: invalid {key} {params[key]!r} in {shown}: expected one of "
                              f"{', '.join(sorted(allowed))}")
    for key in INTEGERS:
        value = str(params.get(key, "0")).strip()
        if not value.lstrip("-").isdigit():
            raise ConfigError(f"{name}: invalid {key} {params[key]!r} in {shown}: expected a whole number")
    return url


def listen_database_url(default: str) -> str:
    """The worker's LISTEN connection may bypass a transaction-mode pooler, where LISTEN fails."""
    url = os.environ.get("LISTEN_DATABASE_URL", "").strip()
    return normalise_url(url, "LISTEN_DATABASE_URL") if url else default


def listener_enabled() -> bool:
    return env_bool("ENABLE_JOB_STATE_LISTENER", True)


# The reconnect rule of the worker's listener and of the CLI's watcher (outbox/watch.py): the
# first wait is JOB_STATE_LISTENER_RECONNECT_DELAY, doubled after each failed attempt, up to this.
RECONNECT_MAX_S = 60.0


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
