"""The worker supervisor (`workers start --processes N`, workers/supervisor.py), run for real as a
subprocess with trivial children (no PostgreSQL, no models): each child is `python -S -c CHILD`,
and CHILD's behaviour per slot (ADFLOW_WORKER_SLOT, set by the supervisor) comes from env vars.

Live children are read from /proc (ppid = the supervisor, state not Z), so a child counts as
alive from its fork to its death, whatever the supervisor's log says.

FAULTS_SOAK=1 (as in `make soak`) makes the kill storm last a minute instead of 12 s."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
SOAK = os.environ.get("FAULTS_SOAK", "").strip().lower() in ("1", "true", "yes", "on")

# The child: TEST_CRASH_SLOTS exit 1 at once (a crash loop); TEST_STOP_CODES ("slot:code,...")
# is the exit code on SIGTERM (default 0, like a worker's graceful stop); TEST_IGNORE_TERM_SLOTS
# ignore SIGTERM (a stuck worker).
CHILD = """
import os, signal, sys, time
slot = os.environ.get("ADFLOW_WORKER_SLOT", "")
if slot in os.environ.get("TEST_CRASH_SLOTS", "").split(","):
    sys.exit(1)
codes = dict(item.split(":") for item in os.environ.get("TEST_STOP_CODES", "").split(",") if item)
if slot in os.environ.get("TEST_IGNORE_TERM_SLOTS", "").split(","):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(int(codes.get(slot, 0))))
while True:
    time.sleep(1e6)
"""

DRIVER = """
import logging, os, sys
sys.path.insert(0, {root!r})
import workers.supervisor as supervisor
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
if os.environ.get("TEST_STOP_MARGIN_S"):
    supervisor.STOP_MARGIN_S = float(os.environ["TEST_STOP_MARGIN_S"])
child = [sys.executable, "-S", "-c", {child!r}]
sys.exit(supervisor.supervise([], int(sys.argv[1]), dict(os.environ), float(sys.argv[2]), command=child))
"""


def live_children(pid: int) -> list[int]:
    """Pids whose parent is `pid` and that are not zombies (dead, not yet reaped)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry))
    return found


def slot_of(pid: int) -> str | None:
    """A child's ADFLOW_WORKER_SLOT (None between fork and exec, or once it is gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            for item in environ.read().split(b"\0"):
                if item.startswith(b"ADFLOW_WORKER_SLOT="):
                    return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"


def wait_for(predicate, timeout: float, what: str, log=lambda: ""):
    return wait_until(predicate, timeout, 0.02, what, log)


class Supervisor:
    def __init__(self, tmp_path: Path, processes: int, grace_s: float = 5.0, env: dict | None = None):
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER.format(root=str(ROOT), child=CHILD))
        self.log_path = tmp_path / "supervisor.log"
        self.log_file = open(self.log_path, "ab")
        self.processes = processes
        self.seen: set[int] = set()
        self.proc = subprocess.Popen([sys.executable, str(driver), str(processes), str(grace_s)], cwd=ROOT,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def children(self) -> list[int]:
        pids = live_children(self.proc.pid)
        self.seen.update(pids)
        return pids

    def by_slot(self) -> dict[str, int]:
        return {slot: pid for pid in self.children() if (slot := slot_of(pid)) is not None}

    def wait_slots(self, predicate, timeout: float, what: str) -> dict[str, int]:
        """by_slot() once predicate(by_slot()) holds."""
        def check():
            slots = self.by_slot()
            return slots if predicate(slots) else None

        return wait_for(check, timeout, what, self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Teardown: whatever the test did, no process of it survives."""
        if self.proc.poll() is None:
            self.children()
            self.proc.kill()
            self.proc.wait()
        for pid in self.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log_file.close()


@pytest.fixture
def start(tmp_path):
    started: list[Supervisor] = []

    def _start(processes: int, **kwargs) -> Supervisor:
        supervisor = Supervisor(tmp_path, processes, **kwargs)
        started.append(supervisor)
        return supervisor

    yield _start
    for supervisor in started:
        supervisor.close()


def restarts(log: str, slot: int | str) -> list[tuple[str, float, str]]:
    """(exit code, delay, reason) of each logged restart of a slot."""
    return [(code, float(delay), reason) for code, delay, reason in re.findall(
        rf"worker process {slot} \(pid \d+\) died with (-?\d+); restarting in ([\d.]+) s: (.+)", log)]


def test_kill_storm_keeps_nearly_all_children_alive(start):
    """For 12 s (a minute in soak mode) a random live child is SIGKILLed every 0.3 s; the number
    of live children is sampled every 50 ms. An outside kill is restarted at once, with no
    backoff, and no restart waits for another: at least 3 of 4 are alive in 90% of the samples."""
    supervisor = start(4)
    wait_for(lambda: len(supervisor.by_slot()) == 4, 20, "4 children started", supervisor.log)
    rng = random.Random(12)
    duration = 60.0 if SOAK else 12.0
    samples: list[int] = []
    kills = 0
    empty_since: float | None = None
    longest_gap = 0.0
    ends = time.monotonic() + duration
    next_kill = time.monotonic()
    while (now := time.monotonic()) < ends:
        pids = supervisor.children()
        samples.append(len(pids))
        if len(pids) == 0:
            empty_since = empty_since or now
            longest_gap = max(longest_gap, now - empty_since)
        else:
            empty_since = None
        if now >= next_kill and pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
            next_kill = now + 0.3
        time.sleep(0.05)
    assert supervisor.proc.poll() is None, supervisor.log()
    mean = sum(samples) / len(samples)
    three_or_more = sum(n >= 3 for n in samples) / len(samples)
    none = sum(n == 0 for n in samples) / len(samples)
    print(f"\nkill storm: {kills} kills in {duration:.0f} s, {len(samples)} samples: mean {mean:.2f} of 4 alive, "
          f">=3 alive {three_or_more:.1%}, none alive {none:.1%}, longest time with none {longest_gap:.2f} s")
    assert three_or_more >= 0.9, (samples, supervisor.log())
    # Every restart was logged as an outside kill, restarted at the floor delay, and none grew.
    log = supervisor.log()
    logged = [r for slot in range(4) for r in restarts(log, slot)]
    assert len(logged) >= kills * 0.8, log
    assert {(code, delay) for code, delay, _ in logged} == {("-9", 0.1)}, log
    assert all("SIGKILL" in reason and "not counted as a crash" in reason for _, _, reason in logged), log
    wait_for(lambda: len(supervisor.by_slot()) == 4, 5, "all 4 back after the storm", supervisor.log)


def test_a_crash_looping_slot_does_not_delay_another_slots_restart(start):
    """Slot 0 exits 1 at once, every time: a crash loop, whose backoff doubles from 0.5 s. While it
    waits out a 4 s backoff, slot 1's child is SIGKILLed: it is back within 2 s (the old supervisor
    slept the backoff inside its wait loop, so slot 1 waited for slot 0)."""
    supervisor = start(4, env={"TEST_CRASH_SLOTS": "0"})
    wait_for(lambda: any(delay >= 4.0 for _, delay, _ in restarts(supervisor.log(), 0)), 30,
             "slot 0's backoff reached 4 s", supervisor.log)
    slots = supervisor.by_slot()
    assert "0" not in slots and {"1", "2", "3"} <= set(slots), (slots, supervisor.log())
    victim = slots["1"]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    back = wait_for(lambda: (pid := supervisor.by_slot().get("1")) not in (None, victim) and pid, 2.0,
                    "slot 1 restarted after SIGKILL", supervisor.log)
    print(f"\nslot 1 back {time.monotonic() - killed_at:.2f} s after SIGKILL (pid {victim} -> {back})")
    log = supervisor.log()
    crash_delays = [delay for _, delay, _ in restarts(log, 0)]
    assert crash_delays[:4] == [0.5, 1.0, 2.0, 4.0], log
    assert all(code == "1" and "crash" in reason for code, _, reason in restarts(log, 0)), log
    assert [(code, delay) for code, delay, _ in restarts(log, 1)] == [("-9", 0.1)], log
    # Slots 2 and 3 were left alone the whole time.
    assert restarts(log, 2) == [] and restarts(log, 3) == [], log


def test_sigterm_stops_every_child_cancels_pending_restarts_and_exits(start):
    """SIGTERM to the supervisor: SIGTERM to each child, the crash-looping slot's pending restart is
    cancelled, the supervisor waits for the children and exits with the first non-zero code a
    child stopped with (here slot 2's 3), as before."""
    supervisor = start(4, env={"TEST_CRASH_SLOTS": "3", "TEST_STOP_CODES": "2:3"})
    wait_for(lambda: any(delay >= 4.0 for _, delay, _ in restarts(supervisor.log(), 3)), 30,
             "slot 3 waits out a 4 s backoff", supervisor.log)
    children = supervisor.wait_slots(lambda slots: {"0", "1", "2"} <= set(slots), 10, "slots 0-2 alive")
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(10) == 3, supervisor.log()
    assert not any(alive(pid) for pid in children.values()), children
    log = supervisor.log()
    after = log[log.index("stopping"):]
    assert "started (pid" not in after, log  # slot 3's pending restart was cancelled
    for slot in ("0", "1", "2"):
        assert f"worker process {slot} (pid {children[slot]}) exited with {3 if slot == '2' else 0}" in after, log


def test_a_child_stuck_past_its_grace_is_killed(start):
    """A child that ignores SIGTERM (stuck) is SIGKILLed once grace_s plus the supervisor's margin
    has passed, and the supervisor exits 1; the other children stopped cleanly."""
    supervisor = start(2, grace_s=0.5, env={"TEST_IGNORE_TERM_SLOTS": "1", "TEST_STOP_MARGIN_S": "0.5"})
    children = supervisor.wait_slots(lambda slots: len(slots) == 2, 20, "2 children started")
    time.sleep(0.3)  # let slot 1's child put its SIG_IGN in place
    supervisor.proc.send_signal(signal.SIGTERM)
    assert supervisor.proc.wait(10) == 1, supervisor.log()
    assert not any(alive(pid) for pid in children.values()), children
    log = supervisor.log()
    assert f"worker process 1 (pid {children['1']}) still running" in log, log
    assert f"worker process 1 (pid {children['1']}) exited with -9" in log, log


def test_a_supervised_child_gets_every_option_its_parent_was_given():
    """The child's command line is built from the `start` command's own declaration: each option,
    given a value that is not its default, reaches the child unchanged (the list was spelled by
    hand once, and an option missing from it silently fell back to its default in every child)."""
    import typer.main

    from workers.cli import app, child_argv

    group = typer.main.get_command(app)
    start = group.get_command(None, "start")
    given = ["--processes", "3", "--concurrency", "5", "--stages", "planner,overlay", "--gpu", "--models", "tiny",
             "--registry", "tests.engine_stages:build_registry", "--lease", "12.5", "--grace", "7.0",
             "--retry-base", "0.5", "--retry-max", "9.0", "--health-addr", "127.0.0.1:9100"]
    options = [p for p in start.params if p.name != "processes"]
    assert {p.opts[0] for p in options} <= set(given), "give every option a value in this test"
    parent = start.make_context("start", list(given))
    argv = child_argv(parent, health_addr="127.0.0.1:9101")
    assert argv[0] == "start" and "--processes" not in argv
    child = start.make_context("start", argv[1:])
    expected = {**parent.params, "health_addr": "127.0.0.1:9101"}
    expected.pop("processes")
    assert child.params == {**expected, "processes": 1}
