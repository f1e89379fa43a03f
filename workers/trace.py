"""Per-step time stamps of tasks on their way through a worker, for bench/hop_profile.py.

Off unless ADFLOW_TRACE_DIR names a folder: then each worker process appends one line per step,
`time.time() <TAB> step <TAB> task ids`, to trace-<pid>.tsv there. Off, a step costs one test of
a module global. The steps, in the order a task meets them:

    heard      the listener got a notification (no ids: it names a stage, not a task)
    claimed    the dispatcher's claim came back with these tasks
    rode       a completion came back with these tasks claimed on it
    thread     a stage thread started on these tasks (before their inputs are read)
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

_DIR = os.environ.get("ADFLOW_TRACE_DIR") or None
_lock = threading.Lock()  # the event loop and the stage threads both write
_file = None


def enabled() -> bool:
    return _DIR is not None


def step(name: str, ids: Iterable[int] = ()) -> None:
    global _file
    if _DIR is None:
        return
    line = f"{time.time():.6f}\t{name}\t{','.join(str(i) for i in ids)}\n"
    with _lock:
        if _file is None:  # opened in the process that writes (a forked child gets its own)
            _file = open(os.path.join(_DIR, f"trace-{os.getpid()}.tsv"), "a", buffering=1)
        _file.write(line)
