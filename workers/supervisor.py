"""`workers start --processes N`: N worker processes under one supervisor that forwards SIGTERM and
SIGINT, and restarts a child that dies on its own (with backoff)."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("workers.supervisor")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(child_argv: list[str], processes: int, env: dict[str, str], grace_s: float) -> int:
    stopping = False
    children: dict[int, tuple[int, subprocess.Popen, float]] = {}  # pid -> (slot, process, started)
    failures = [0] * processes

    def spawn(slot: int) -> None:
        # The slot moves each child's health port (--health-addr PORT + slot).
        proc = subprocess.Popen([sys.executable, "-m", "workers", *child_argv], env={**env, "ADFLOW_WORKER_SLOT": str(slot)},
                                preexec_fn=_die_with_parent)
        children[proc.pid] = (slot, proc, time.monotonic())
        log.info("worker process %d started (pid %d)", slot, proc.pid)

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for _, proc, _ in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for slot in range(processes):
        spawn(slot)
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        slot, proc, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
        if stopping:
            log.info("worker process %d (pid %d) exited with %d", slot, pid, code)
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        failures[slot] = 0 if time.monotonic() - started > 60 else failures[slot] + 1
        delay = min(30.0, 0.5 * (2 ** failures[slot]))
        log.error("worker process %d (pid %d) died with %d; restarting in %.1f s", slot, pid, code, delay)
        time.sleep(delay)
        if not stopping:
            spawn(slot)
    return exit_code
