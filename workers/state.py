"""The state a worker's services share: its lifecycle, its listening link and its claim mode, as
enums whose transitions are all written here, with which service writes each field, and the frozen
Status that the health endpoints read.

Everything runs on the worker's one event loop thread (stages run in a thread pool but never touch
this), so a field needs no lock; what it needs is one writer, or writers named below.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from outbox.queue import ClaimedTask


class Lifecycle(enum.Enum):
    STARTING = "starting"  # the graph is checked; LISTEN has not been up yet
    RUNNING = "running"    # LISTEN has been up at least once
    STOPPING = "stopping"  # no new claims: tasks in flight finish, or are handed back at the grace


class Link(enum.Enum):
    DOWN = "down"  # not connected yet, or lost and reconnecting
    UP = "up"      # LISTEN is on and its self-test came back


class ClaimMode(enum.Enum):
    NORMAL = "normal"
    ALONE = "alone"          # a task that lost its worker before runs here, alone (crash isolation)
    WAIT_IDLE = "wait_idle"  # a task waits to run alone: take nothing until ours have finished


@dataclass(frozen=True)
class Status:
    """What the probes and the metrics see, taken at one instant."""

    lifecycle: Lifecycle
    link: Link
    in_flight: int
    stages: tuple[str, ...]

    @property
    def stopping(self) -> bool:
        return self.lifecycle is Lifecycle.STOPPING

    @property
    def started(self) -> bool:
        """LISTEN has been up once (a later loss is a reconnect, not a start)."""
        return self.lifecycle is not Lifecycle.STARTING

    @property
    def listening(self) -> bool:
        return self.link is Link.UP


class WorkerState:
    def __init__(self) -> None:
        # Written by Worker (start-up, request_stop); read by every service.
        self.lifecycle = Lifecycle.STARTING
        self.stages: tuple[str, ...] = ()  # the stages this worker claims, later pipeline stages first
        # Written by the Listener only (linked / unlinked).
        self.link = Link.DOWN
        # Added to by the Dispatcher when it claims, removed by the Executor when an outcome is
        # settled (task_done); read by the heartbeat and at shutdown.
        self.in_flight: dict[int, ClaimedTask] = {}
        # Written by the Executor: tasks whose outcome is being recorded now (the heartbeat does
        # not call their lease lost: the completion may have committed, ending it).
        self.settling: set[int] = set()
        # Written by the Dispatcher: the last claim may have left claimable tasks behind (slots
        # were full), so a freed slot must claim again; read by the Executor. Otherwise the
        # notification of new work wakes us, and an extra wake would only cost an empty claim.
        self.saturated = False
        # Entered by the Dispatcher (claimed), left by the Executor (task_done).
        self.claim_mode = ClaimMode.NORMAL
        self.alone_task: int | None = None
        # Set by the Listener (after a reconnect) and the Dispatcher (a deadline passed); cleared
        # by the Dispatcher when it rescues expired leases.
        self.rescue_due = False
        # Armed by the Executor when an outcome could not be recorded (loop time when its lease
        # has run out, so a lone worker rescues its own orphan); disarmed by the Dispatcher.
        self.orphan_deadline: float | None = None
        # Anyone sets them (kick: claim; rethink: only the deadline moved); the Dispatcher waits
        # on wake and clears both.
        self.wake = asyncio.Event()
        self.fill_due = False
        # Set once, by request_stop.
        self.stopped = asyncio.Event()
        # Set while the link is up: a signal for tests and for start-up, not for control flow.
        self.serving = asyncio.Event()

    # ----------------------------------------------------------------- the transitions
    def kick(self) -> None:
        """Wakes the dispatcher to claim."""
        self.fill_due = True
        self.wake.set()

    def rethink(self) -> None:
        """Wakes the dispatcher to recompute its wait only (its deadline moved earlier)."""
        self.wake.set()

    def linked(self) -> None:
        """The listener is connected and heard its self-test: start, or resume after a loss."""
        self.link = Link.UP
        if self.lifecycle is Lifecycle.STARTING:
            self.lifecycle = Lifecycle.RUNNING
        self.rescue_due = True
        self.serving.set()
        self.kick()  # drain: anything enqueued while we were away is claimed now

    def unlinked(self) -> None:
        self.link = Link.DOWN
        self.serving.clear()

    def stop(self) -> bool:
        """Enters STOPPING; True the first time."""
        first = self.lifecycle is not Lifecycle.STOPPING
        self.lifecycle = Lifecycle.STOPPING
        self.stopped.set()
        self.kick()
        return first

    @property
    def stopping(self) -> bool:
        return self.lifecycle is Lifecycle.STOPPING

    @property
    def listening(self) -> bool:
        return self.link is Link.UP

    def may_claim(self) -> bool:
        """Crash isolation (outbox_claim): nothing is taken while a task runs alone here, or while
        one waits to run alone and ours have not finished (the last of them kicks us)."""
        if self.claim_mode is ClaimMode.ALONE:
            return False
        return not (self.claim_mode is ClaimMode.WAIT_IDLE and self.in_flight)

    def claimed(self, tasks: list[ClaimedTask], waiting: bool) -> None:
        """A claim returned `tasks`; `waiting`: a task is waiting to run alone somewhere."""
        for task in tasks:
            self.in_flight[task.id] = task
        if tasks and tasks[0].alone:
            self.claim_mode, self.alone_task = ClaimMode.ALONE, tasks[0].id
        else:
            self.claim_mode = ClaimMode.WAIT_IDLE if waiting else ClaimMode.NORMAL

    def task_done(self, task_id: int) -> None:
        self.in_flight.pop(task_id, None)
        self.settling.discard(task_id)
        if self.claim_mode is ClaimMode.ALONE and task_id == self.alone_task:
            self.claim_mode, self.alone_task = ClaimMode.NORMAL, None
            self.kick()
        elif self.claim_mode is ClaimMode.WAIT_IDLE and not self.in_flight:
            self.kick()  # idle now: take the task that waits to run alone

    def status(self) -> Status:
        return Status(self.lifecycle, self.link, len(self.in_flight), self.stages)


class Service:
    """What every service is given: the settings (read-only), the shared state, the bounded pool,
    the metrics and the worker's id (its name on leases). Subclasses own the fields they add."""

    def __init__(self, settings, state: WorkerState, pool, metrics, owner: str):
        self.settings = settings
        self.state = state
        self.pool = pool
        self.metrics = metrics
        self.owner = owner
