"""A real PgBouncer in transaction mode in front of a test database (Debian's pgbouncer), for the
tests that run the engine through a pooler as production can."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psycopg

from outbox.db import free_port

INSTALLED = shutil.which("pgbouncer") is not None or os.access("/usr/sbin/pgbouncer", os.X_OK)
WHY_NOT = "pgbouncer not installed (Debian package pgbouncer; `make test` installs it as root)"


@contextmanager
def pgbouncer(db_url: str, workdir: Path) -> Iterator[str]:
    """Yields the pooled URL of `db_url`'s database."""
    port = free_port()
    pg_port = db_url.split(":")[2].split("/")[0]
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(f"""
[databases]
* = host=127.0.0.1 port={pg_port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = trust
auth_file = {workdir / 'users.txt'}
pool_mode = transaction
max_client_conn = 200
default_pool_size = 10
unix_socket_dir =
logfile = {workdir / 'pgbouncer.log'}
""")
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    argv = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        argv = ["unshare", "--map-user=1000", "--map-group=1000", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = db_url.rsplit(":", 1)[0] + f":{port}/" + db_url.rsplit("/", 1)[1]
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise AssertionError((workdir / "pgbouncer.log").read_text()) from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
