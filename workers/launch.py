"""Starting worker processes: the one command line and the one way to spawn it, shared by the
supervisor (`--processes N`), the demo, the tests and the benchmarks, so a worker started by any of
them is started the same way (and dies with whoever started it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import IO, Mapping, Sequence

from outbox.embedded import die_with_parent

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def worker_command(start_args: Sequence[str] = ()) -> list[str]:
    """`workers start ARGS` with this interpreter."""
    return [sys.executable, "-m", "workers", "start", *start_args]


def spawn(argv: Sequence[str], env: Mapping[str, str], output: IO[bytes] | None = None,
          own_session: bool = False) -> subprocess.Popen:
    """Starts `argv` from the project root; it gets SIGTERM when we die, even by SIGKILL, so no
    worker outlives its supervisor, demo or test run. `output` takes stdout and stderr (None:
    inherit). `own_session`: a terminal's Ctrl-C reaches only us, and we stop it in order."""
    return subprocess.Popen(list(argv), cwd=PROJECT_ROOT, env=dict(env), stdin=subprocess.DEVNULL,
                            stdout=output, stderr=subprocess.STDOUT if output is not None else None,
                            preexec_fn=die_with_parent(), start_new_session=own_session)


def spawn_worker(start_args: Sequence[str], env: Mapping[str, str], output: IO[bytes] | None = None,
                 own_session: bool = False) -> subprocess.Popen:
    return spawn(worker_command(start_args), env, output, own_session)
