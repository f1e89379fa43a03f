"""The dispatcher service: sleeps until it is kicked (a notification, a freed slot) or until the
earliest deadline the database gave it, then rescues expired leases when due and claims as many
tasks as there are free slots, handing them to the executor. The only service that claims."""
from __future__ import annotations

import asyncio
import logging

from outbox import queue
from outbox.completion import ClaimRequest
from outbox.queue import ClaimedTask
from outbox.errors import describe_error
from workers.executor import MIN_DEADLINE_WAIT_S, Executor
from workers.logs import task_fields
from workers import trace
from workers.pool import UNREACHABLE
from workers.state import ClaimMode, Service

log = logging.getLogger("workers")

RESCUE_BATCH = 1000
# A claim that took fewer tasks than it asked for took every task it could lock, so a task it
# still sees as due is being claimed by another worker at that moment (SKIP LOCKED passed over
# it) and is theirs within milliseconds. Acting on that deadline after MIN_DEADLINE_WAIT_S sent
# every worker that lost a notification's race back to claim and rescue 50 ms later, in the
# middle of the chain the winner had just started (bench/hop_profile.py: three empty claims and
# rescues per job). The look stays, later: it finds such a task again if that claim failed.
LOCKED_RECHECK_S = 1.0


def deadline_wait(seconds: float | None, took_all: bool) -> float | None:
    """Seconds until the dispatcher should act on the deadline a claim returned; `took_all`: the
    claim took fewer tasks than its limit, so every task it could lock."""
    if seconds is None:
        return None
    if took_all and seconds <= 0:
        return LOCKED_RECHECK_S
    return max(seconds, MIN_DEADLINE_WAIT_S)


class Dispatcher(Service):
    def __init__(self, *shared, executor: Executor) -> None:
        super().__init__(*shared)
        self.executor = executor
        # Written here only: loop time of the next deadline the database told us (a retry that
        # becomes due, a lease that runs out), or of a backoff after a failed claim.
        self.deadline: float | None = None
        self.waiting_until: float | None = None  # the wake-up time of the wait in progress
        self.last_rescue = 0.0  # loop time of the last rescue
        # Slots promised to the claim riding on the completion in progress (one at a time: the
        # completer commits one batch after another), so that fill() and it never take more
        # than concurrency together. Set by claim_with, cleared by took.
        self.reserved = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        state = self.state
        failures = 0
        while not state.stopping:
            # orphan_deadline: see Executor.settle. Not while disconnected (nothing to do then:
            # the reconnect kicks us, and the deadline stays for afterwards).
            wake_at = min((d for d in (self.deadline, state.orphan_deadline if state.listening else None)
                           if d is not None), default=None)
            timeout = None if wake_at is None else max(0.0, wake_at - loop.time())
            self.waiting_until = wake_at
            due = False
            try:
                await asyncio.wait_for(state.wake.wait(), timeout)
            except asyncio.TimeoutError:
                due = True
            if wake_at is not None and loop.time() >= wake_at:
                due = True  # woken by a notification just as the deadline passed
            state.wake.clear()
            if due:
                state.rescue_due = True
            elif not state.fill_due:
                continue  # rethink(): a claim riding on a completion moved the deadline earlier
            state.fill_due = False
            if state.stopping or not state.listening:
                # Without a listener we could miss work; the reconnect kicks us once it is back.
                self.deadline = None
                continue
            try:
                await self.fill()
                failures = 0
            except UNREACHABLE as exc:
                failures += 1
                backoff = min(self.settings.reconnect_delay_s * failures, self.settings.reconnect_max_s)
                log.warning("claim failed (%s); trying again in %.1f s", describe_error(exc), backoff)
                self.deadline = loop.time() + backoff

    def claim_with(self, completing: list[ClaimedTask]) -> ClaimRequest | None:
        """The claim to ride on a completion of `completing` (the completer asks): as many tasks as
        slots will be free once those are done, under the same rules as fill(). None while a
        claim here would be wrong: stopping, disconnected, or a task runs or waits to run alone."""
        state = self.state
        if state.stopping or not state.listening or state.claim_mode is not ClaimMode.NORMAL:
            return None
        others = len(state.in_flight) - sum(1 for t in completing if t.id in state.in_flight)
        free = self.settings.concurrency - others
        if free <= 0:
            return None
        self.reserved = free
        return ClaimRequest(stages=state.stages, limit=free, lease_s=self.settings.lease_s, alone=others == 0)

    def took(self, rows: list[dict]) -> None:
        """Starts what a claim riding on a completion took, and keeps what the dispatcher would
        have learnt from claiming itself: the next deadline (a retry, a foreign lease: a worker
        fed only by its completions must still wake to rescue), and the rescue at least every
        heartbeat interval while busy."""
        loop = asyncio.get_running_loop()
        limit, self.reserved = self.reserved, 0
        tasks, seconds = queue.split_claim(rows)
        trace.step("rode", (t.id for t in tasks))
        wait = deadline_wait(seconds, len(tasks) < limit)
        if wait is not None:
            self.deadline = loop.time() + wait
            if self.waiting_until is None or self.deadline < self.waiting_until:
                self.state.rethink()
        if loop.time() - self.last_rescue >= self.settings.heartbeat_s:
            self.state.kick()
        if not tasks:
            return
        self.state.claimed(tasks, queue.suspect_waiting(rows))
        self.executor.start(tasks)
        if self.state.claim_mode is ClaimMode.ALONE:
            task = tasks[0]
            log.warning("task %s (%s, %s) lost its worker before and this is its last attempt: it runs "
                        "alone", task.id, task.stage, task.subject, extra=task_fields(task))

    async def fill(self) -> None:
        loop = asyncio.get_running_loop()
        state = self.state
        async with self.pool.connection() as conn:
            # Also at most every heartbeat interval while busy: a worker that keeps being woken
            # by notifications, or whose slots are full (it then learns no deadline), never times
            # out waiting, and under steady load another worker's expired lease would otherwise
            # wait for a lull to be rescued (found by the fault suite: 20 s and more in soak).
            if state.rescue_due or loop.time() - self.last_rescue >= self.settings.heartbeat_s:
                state.rescue_due = False
                self.last_rescue = loop.time()
                rescued = await (await conn.execute(queue.RESCUE_EXPIRED, (RESCUE_BATCH,))).fetchall()
                if state.orphan_deadline is not None and loop.time() >= state.orphan_deadline:
                    state.orphan_deadline = None
                for row in rescued:
                    log.warning("recovery: task %s had an expired lease: %s", row["id"], row["outcome"])
                    self.metrics.lease_rescues.inc()
                    if row["outcome"] == "failed":  # its last attempt: that may end the job
                        self.executor.completer.rescue_failed(row["id"])
            seconds, took_all = None, False
            while not state.stopping:
                if not state.may_claim():
                    self.deadline = None
                    return
                free = self.settings.concurrency - len(state.in_flight) - self.reserved
                if free <= 0:
                    state.saturated = True
                    self.deadline = None  # a completion will wake us
                    return
                rows = await (await conn.execute(queue.CLAIM, (
                    self.owner, list(state.stages), free, self.settings.lease_s, None, not state.in_flight))).fetchall()
                tasks, seconds = queue.split_claim(rows)
                trace.step("claimed", (t.id for t in tasks))
                state.claimed(tasks, queue.suspect_waiting(rows))
                self.executor.start(tasks)
                if state.claim_mode is ClaimMode.ALONE:
                    task = tasks[0]
                    log.warning("task %s (%s, %s) lost its worker before and this is its last attempt: it runs "
                                "alone", task.id, task.stage, task.subject, extra=task_fields(task))
                    continue
                if len(tasks) < free:
                    state.saturated, took_all = False, True
                    break
        wait = deadline_wait(seconds, took_all)
        self.deadline = None if wait is None else loop.time() + wait
