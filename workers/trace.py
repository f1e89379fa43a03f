"""Per-step time stamps of tasks on their way through a worker, for bench/hop_profile.py.

Off unless ADFLOW_TRACE_DIR names a folder: then each worker process appends one line per step,
`time.time() <TAB> step <TAB> task ids`, to trace-<pid>.tsv there; read() reads a folder of them
back. Off, a step costs a call and one test of a module global. The steps, in the order a task
meets them:

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
from dataclasses import dataclass, field
from pathlib import Path

_DIR = os.environ.get("ADFLOW_TRACE_DIR") or None
_lock = threading.Lock()  # the event loop and the stage threads both write
_file = None


def step(name: str, ids: Iterable[int] = ()) -> None:
    global _file
    if _DIR is None:
        return
    line = f"{time.time():.6f}\t{name}\t{','.join(str(i) for i in ids)}\n"
    with _lock:
        if _file is None:  # opened in the process that writes (a forked child gets its own)
            _file = open(os.path.join(_DIR, f"trace-{os.getpid()}.tsv"), "a", buffering=1)
        _file.write(line)


@dataclass
class Trace:
    """What read() found; each field is filled by read() only."""

    at: dict[tuple[str, int], float] = field(default_factory=dict)  # (step, task id): its first stamp
    claimer: dict[int, int] = field(default_factory=dict)  # task id: pid of the worker whose claim took it
    heard: dict[int, list[float]] = field(default_factory=dict)  # pid: when it heard a notification


def read(folder: Path) -> Trace:
    """Every trace-<pid>.tsv in `folder`."""
    out = Trace()
    for path in Path(folder).glob("trace-*.tsv"):
        pid = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            at, name, ids = line.split("\t")
            if name == "heard":
                out.heard.setdefault(pid, []).append(float(at))
            for i in filter(None, ids.split(",")):
                out.at.setdefault((name, int(i)), float(at))
                if name == "claimed":
                    out.claimer.setdefault(int(i), pid)
    return out
