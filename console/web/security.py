"""Who may use the console and how its actions are kept from other sites.

- Bound to a loopback address without CONSOLE_TOKEN, the console trusts the machine ("localhost"),
  and only answers requests whose Host is a loopback name, so a page on another site cannot
  reach it by pointing its own domain at 127.0.0.1 (DNS rebinding).
- Any other address needs CONSOLE_TOKEN (the console refuses to start without it). Each request
  then carries a token: `Authorization: Bearer SECRET`, or the session cookie the login form sets,
  which holds the token's name and an HMAC of it under the secret (never the secret itself).
- Every POST is checked twice: its Origin (or Referer) must be this console's own host, and its
  form must carry the CSRF token that matches the browser's CSRF cookie for this identity (an
  HMAC under a per-process key, so a cookie planted from a sibling domain cannot be matched).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from outbox.config import ConfigError

TOKEN_ENV = "CONSOLE_TOKEN"
SESSION_COOKIE = "adflow_console_session"
CSRF_COOKIE = "adflow_console_csrf"
CSRF_FIELD = "csrf"
MIN_SECRET_CHARS = 16
LOCAL_IDENTITY = "localhost"
DEFAULT_TOKEN_NAME = "token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_tokens(value: str) -> dict[str, str]:
    """CONSOLE_TOKEN: `SECRET`, or named tokens `alice:SECRET,bob:SECRET` (the name is what the
    action log records)."""
    tokens: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, secret = entry.partition(":")
        if not sep:
            name, secret = DEFAULT_TOKEN_NAME, entry
        name = name.strip()
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{TOKEN_ENV}: token name {name!r}: use letters, digits, '-', '_' or '.'")
        if len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"{TOKEN_ENV}: the secret of token {name!r} is shorter than {MIN_SECRET_CHARS} characters "
                              "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if name in tokens:
            raise ConfigError(f"{TOKEN_ENV}: token name {name!r} given twice")
        tokens[name] = secret
    return tokens


def _mac(key: str | bytes, message: str) -> str:
    key = key.encode() if isinstance(key, str) else key
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


@dataclass
class Access:
    host: str
    tokens: dict[str, str] = field(default_factory=dict)
    read_only: bool = False
    # Per process: a restart invalidates open forms (they are re-rendered on the next page).
    csrf_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @classmethod
    def configure(cls, host: str, read_only: bool = False, token_value: str | None = None) -> "Access":
        value = os.environ.get(TOKEN_ENV, "") if token_value is None else token_value
        tokens = parse_tokens(value)
        if not tokens and not is_loopback(host):
            raise ConfigError(f"the console binds to {host}, which is not a loopback address: set {TOKEN_ENV} "
                              "(a secret of 16 or more characters, or name:secret pairs) so that every request "
                              "must carry it, or bind to 127.0.0.1")
        return cls(host=host, tokens=tokens, read_only=read_only)

    @property
    def open_locally(self) -> bool:
        return not self.tokens

    # --- identity
    def session_value(self, name: str) -> str:
        return f"{name}.{_mac(self.tokens[name], 'console-session:' + name)}"

    def check_secret(self, secret: str) -> str | None:
        for name, expected in self.tokens.items():
            if hmac.compare_digest(secret.encode(), expected.encode()):
                return name
        return None

    def identify(self, headers, cookies) -> str | None:
        """The token's name, LOCAL_IDENTITY, or None when a token is needed and none is valid."""
        if self.open_locally:
            return LOCAL_IDENTITY
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.check_secret(auth[7:].strip())
        session = cookies.get(SESSION_COOKIE, "")
        name, _, _ = session.partition(".")
        if name in self.tokens and hmac.compare_digest(session.encode(), self.session_value(name).encode()):
            return name
        return None

    def host_allowed(self, headers) -> bool:
        """Without a token, only loopback Host names (a rebinding domain is refused)."""
        if not self.open_locally:
            return True
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        return host in LOOPBACK_NAMES or is_loopback(host)

    # --- cross-site
    @staticmethod
    def same_origin(headers) -> bool:
        """The POST comes from a page of this console: Origin (or, without it, Referer) names the
        Host the request was sent to, and the browser does not call it cross-site."""
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        source = headers.get("origin") or headers.get("referer")
        if not source or source == "null":
            return False
        return urlsplit(source).netloc.lower() == headers.get("host", "").lower()

    def csrf_for(self, nonce: str, identity: str) -> str:
        return _mac(self.csrf_key, f"{nonce}|{identity}")

    def csrf_valid(self, cookies, form_value: str | None, identity: str) -> bool:
        nonce = cookies.get(CSRF_COOKIE)
        if not nonce or not form_value:
            return False
        return hmac.compare_digest(form_value.encode(), self.csrf_for(nonce, identity).encode())


def new_nonce() -> str:
    return secrets.token_urlsafe(24)
