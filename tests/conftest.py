"""A real PostgreSQL for the whole session (embedded, fast settings), one migrated template
database, and one fresh database per test cloned from it."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
TEMPLATE = "adflow_template"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    from outbox.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", fast=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def template_db(pg_server):
    from outbox import migrate

    admin = psycopg.connect(pg_server.url, autocommit=True)
    admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
    admin.execute(f"CREATE DATABASE {TEMPLATE}")
    url = pg_server.url.rsplit("/", 1)[0] + f"/{TEMPLATE}"
    migrate.upgrade(url)
    admin.close()
    return url


def own_server(tmp_path_factory, template: str, settings: dict | None = None):
    """A PostgreSQL of a test module's own (one it may stop and restart), with a migrated
    template database to clone from; settings=None: the session's fast settings."""
    from outbox import migrate
    from outbox.embedded import EmbeddedPostgres

    data = tmp_path_factory.mktemp(template) / "data"
    server = EmbeddedPostgres(data, fast=settings is None, settings=settings)
    server.start()
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {template}")
    migrate.upgrade(server.url.rsplit("/", 1)[0] + f"/{template}")
    return server


def clone_database(server, template: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    return server.url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(server, url: str) -> None:
    with psycopg.connect(server.url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")


@pytest.fixture
def db_url(pg_server, template_db):
    url = clone_database(pg_server, TEMPLATE)
    yield url
    drop_database(pg_server, url)


@pytest.fixture
def empty_db_url(pg_server):
    """A database of its own that no migration has touched."""
    url = clone_database(pg_server, "template0")
    yield url
    drop_database(pg_server, url)


@pytest.fixture
def conn(db_url):
    from outbox import db

    connection = db.connect(db_url)
    yield connection
    connection.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """ADFLOW_HOME (artifacts, assets) for this test."""
    monkeypatch.setenv("ADFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ARTIFACT_DIR", raising=False)
    monkeypatch.delenv("ASSET_ROOT", raising=False)
    return tmp_path / "home"


@pytest.fixture
def tiny_png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "variant.png"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(path)
    return path


def cli(*args: str, env: dict | None = None, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Runs cli.py in a subprocess, as a user would."""
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)
    if check and done.returncode != 0:
        raise AssertionError(f"cli.py {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done
