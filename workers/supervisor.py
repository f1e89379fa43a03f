"""`workers start --processes N`: N worker processes under one supervisor that forwards SIGTERM and
SIGINT, and restarts each child that dies, on its own schedule.

Why it is built this way: the first supervisor restarted children one at a time and slept each
backoff inside its `os.wait()` loop, so one crash-looping child held back every other slot's
restart, and an outside SIGKILL grew the backoff like a crash of the code. In a kill storm (a
random child SIGKILLed every 0.3 s) that left on average 0.2 to 1 of 4 children alive. Now:

- Each slot has its own restart deadline and its own backoff. Nothing sleeps: the loop blocks in
  one `select()` until the earliest of a child exiting (SIGCHLD), a stop signal, or the next
  pending restart's deadline. With nothing pending it blocks with no timeout (no polling).
- A death from outside (killed by SIGKILL, SIGTERM, SIGINT or SIGHUP, or a clean exit 0, which is
  what a worker does after an outside SIGTERM) is not the code's fault: that slot is restarted
  after OUTSIDE_STOP_DELAY_S and its backoff does not grow. A non-zero exit or another fatal
  signal (SIGSEGV, SIGABRT, ...) is a crash: that slot waits 0.5 s, doubling per crash in a row up
  to 30 s; a child that ran HEALTHY_S (60 s) before it died starts the count again.

Who owns which state: everything (the slots, the pid table, the stop state, the exit code) is a
local of one `supervise()` call and is read and written only by its loop, in the main thread.
The signal handlers only count the stop signals they saw (`stops`) and leave it to the loop;
the wakeup pipe's bytes only wake the loop up, they carry no state. Each child owns its own
graceful stop (its `--grace`); the supervisor forwards SIGTERM, waits, and SIGKILLs only a child
still there STOP_MARGIN_S after that grace (stuck), so a stop ends even then.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass

from workers import launch

log = logging.getLogger("workers.supervisor")

FIRST_BACKOFF_S = 0.5     # the first crash's restart delay; doubles per crash in a row
MAX_BACKOFF_S = 30.0
HEALTHY_S = 60.0          # a child that ran this long before dying resets its slot's backoff
OUTSIDE_STOP_DELAY_S = 0.1  # a floor, so that a child that is killed at once cannot spin the loop
STOP_MARGIN_S = 10.0      # after SIGTERM, a child still running grace_s + this later is stuck
# Signals that end a process only when someone (an operator, an orchestrator, the OOM killer)
# sends them: a child killed by one of these did not crash. SIGSEGV, SIGABRT, SIGBUS, SIGFPE,
# SIGILL come from the code itself and count as crashes.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


@dataclass
class _Slot:
    """One of the N places for a child. Owned by the supervise() loop."""
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    crashes: int = 0                  # crashes in a row: sets the next backoff
    restart_at: float | None = None   # when to (re)start this slot; None: nothing pending

    def backoff(self) -> float:
        """The delay after the next crash (crashes counts those so far)."""
        return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** self.crashes)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def supervise(child_argv: list[str], processes: int, env: dict[str, str], grace_s: float,
              command: list[str] | None = None) -> int:
    """Runs `processes` children `[*command, *child_argv]` (command defaults to this Python's
    `-m workers`), child i with ADFLOW_WORKER_SLOT=i, and restarts each one that dies until
    SIGTERM or SIGINT. Then it forwards SIGTERM to every child, cancels pending restarts, waits for
    them and returns the first non-zero exit code a child stopped with (a child killed by a signal
    while stopping does not count), or 1 if one had to be killed as stuck, else 0. Main thread only
    (signal handlers)."""
    command = list(command) if command is not None else launch.worker_command()[:-1]  # child_argv starts with "start"
    slots = [_Slot(i, restart_at=time.monotonic()) for i in range(processes)]  # the first start is a due restart
    by_pid: dict[int, _Slot] = {}
    stops: list[str] = []      # appended by the handler; the loop handles entries past `handled`
    handled = 0
    kill_at: float | None = None  # set at the stop: when a child still running counts as stuck
    killed_stuck = False
    exit_code = 0

    def spawn(slot: _Slot, now: float) -> None:
        slot.restart_at = None
        try:
            # The slot moves each child's health port (--health-addr PORT + slot).
            proc = launch.spawn([*command, *child_argv], {**env, "ADFLOW_WORKER_SLOT": str(slot.index)})
        except OSError as exc:
            # fork or exec failed (out of memory or processes, a bad executable): like a crash,
            # so that a lasting cause backs off instead of failing in a tight loop.
            delay = slot.backoff()
            slot.crashes += 1
            slot.restart_at = now + delay
            log.error("worker process %d could not start: %s; retrying in %.1f s (crash %d in a row)",
                      slot.index, exc, delay, slot.crashes)
            return
        slot.proc, slot.started = proc, time.monotonic()
        by_pid[proc.pid] = slot
        log.info("worker process %d started (pid %d)", slot.index, proc.pid)

    def exited(slot: _Slot, pid: int, code: int, now: float) -> None:
        nonlocal exit_code
        slot.proc.returncode = code  # reaped here: Popen must not wait for it again
        slot.proc = None
        ran = now - slot.started
        if kill_at is not None:
            log.info("worker process %d (pid %d) exited with %d", slot.index, pid, code)
            exit_code = exit_code or (code if code > 0 else 0)
            return
        if ran >= HEALTHY_S:
            slot.crashes = 0
        if code == 0 or (code < 0 and -code in OUTSIDE_SIGNALS):
            # Stopped or killed from outside (exit 0 is how a worker ends after an outside
            # SIGTERM): bring it back at once; the backoff stays where it was.
            delay = OUTSIDE_STOP_DELAY_S
            how = "stopped cleanly" if code == 0 else f"{_describe(code)} from outside"
            reason = f"{how} after {ran:.1f} s, not counted as a crash (next crash backoff {slot.backoff():.1f} s)"
            level = logging.WARNING
        else:
            delay = slot.backoff()
            slot.crashes += 1
            reason = f"crash {slot.crashes} in a row ({_describe(code)} after {ran:.1f} s)"
            level = logging.ERROR
        slot.restart_at = now + delay
        log.log(level, "worker process %d (pid %d) died with %d; restarting in %.1f s: %s",
                slot.index, pid, code, delay, reason)

    def reap(now: float) -> None:
        # WNOHANG until none is left to reap: one SIGCHLD can stand for several exits.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = by_pid.pop(pid, None)
            if slot is not None:
                exited(slot, pid, os.waitstatus_to_exitcode(status), now)

    def signal_child(pid: int, sig: signal.Signals) -> None:
        # os.kill, not Popen.send_signal: that one first polls, and would reap (and hide from
        # reap()) a child that just exited. A pid still in by_pid is not reaped yet, so it
        # cannot have been reused by another process.
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def on_stop(signum, _frame) -> None:
        stops.append(signal.Signals(signum).name)

    # The self-pipe: a signal's C-level handler writes a byte to wake_w, so a signal that lands
    # just before select() still wakes it (a flag alone could be missed until the next wakeup).
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)}
    previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        # SIGCHLD's default is to be ignored, which writes no wakeup byte: a no-op handler does.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        while True:
            now = time.monotonic()
            if handled < len(stops):
                if kill_at is None:
                    kill_at = now + grace_s + STOP_MARGIN_S
                    cancelled = [s.index for s in slots if s.restart_at is not None]
                    for s in slots:
                        s.restart_at = None
                    log.info("stopping (%s): SIGTERM to %d worker process(es)%s; they have %.1f s of grace",
                             stops[-1], len(by_pid), f", pending restarts of {cancelled} cancelled" if cancelled else "",
                             grace_s)
                else:
                    log.info("%s again while stopping: SIGTERM again to %d worker process(es)", stops[-1], len(by_pid))
                handled = len(stops)
                for pid in list(by_pid):
                    signal_child(pid, signal.SIGTERM)
            reap(now)
            if kill_at is not None:
                if not by_pid:
                    break
                if not killed_stuck and now >= kill_at:
                    # Past its own grace and our margin: stuck (e.g. in a C call that never
                    # returns to run its handler). Waiting longer would make the stop hang.
                    killed_stuck = True
                    for pid, s in by_pid.items():
                        log.error("worker process %d (pid %d) still running %.1f s after SIGTERM "
                                  "(grace %.1f s + margin %.1f s); killing it", s.index, pid,
                                  grace_s + STOP_MARGIN_S + now - kill_at, grace_s, STOP_MARGIN_S)
                        signal_child(pid, signal.SIGKILL)
                deadlines = [] if killed_stuck else [kill_at]
            else:
                for s in slots:
                    if s.restart_at is not None and s.restart_at <= now:
                        spawn(s, now)
                deadlines = [s.restart_at for s in slots if s.restart_at is not None]
            # Block until a signal (SIGCHLD, SIGTERM, SIGINT) or the earliest deadline; with
            # none pending, without a timeout.
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            select.select([wake_r], [], [], timeout)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        os.close(wake_r)
        os.close(wake_w)
    return exit_code or (1 if killed_stuck else 0)
