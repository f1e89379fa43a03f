"""The executor service: runs claimed tasks in the stage thread pool, in batches of the stage's
size, one GPU batch at a time per stage, each under the stage's timeout; then settles each
outcome: a result goes to the completer, an error to outbox_fail (retry, or failed for good)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from psycopg.types.json import Jsonb

from outbox import queue
from outbox.completion import Completion, OutcomeUnknown
from outbox.errors import describe_error
from outbox.queue import ClaimedTask
from stages.contract import PermanentStageError, StageSpec
from workers.completer import Completer
from workers.logs import task_fields
from workers.runner import TaskRunner
from workers.state import Service

log = logging.getLogger("workers")

# The smallest wait before acting on a deadline that has already passed: a task another worker
# is claiming right now shows as due but is locked; acting again at once would spin.
MIN_DEADLINE_WAIT_S = 0.05
DEFAULT_TIMEOUT_S = 300.0


class Executor(Service):
    def __init__(self, *shared, registry: dict[str, StageSpec], runner: TaskRunner, completer: Completer) -> None:
        super().__init__(*shared)
        self.registry = registry
        self.runner = runner
        self.completer = completer
        # Set by Worker at start-up from the stage graph, read-only afterwards.
        self.timeouts: dict[str, float] = {}
        # Written here only: the executions running now (Worker waits for them at shutdown).
        self.executions: set[asyncio.Task] = set()
        self.threads = ThreadPoolExecutor(max_workers=max(2, self.settings.concurrency * 2),
                                          thread_name_prefix="stage")
        self.device_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def start(self, tasks: list[ClaimedTask]) -> None:
        """Starts the claimed `tasks` (already in state.in_flight) in batches of their stage."""
        by_stage: dict[str, list[ClaimedTask]] = defaultdict(list)
        for task in tasks:
            self.metrics.claimed.labels(task.stage).inc()
            # None: a claim row without the wait (the previous release's outbox_claim); a 0 would skew it.
            if task.waited_s is not None:
                self.metrics.queue_wait.labels(task.stage).observe(task.waited_s)
            by_stage[task.stage].append(task)
        for stage, group in by_stage.items():
            size = max(1, self.registry[stage].max_batch)
            for i in range(0, len(group), size):
                batch = group[i:i + size]
                execution = asyncio.create_task(self.run_batch(batch, self._submit(batch)))
                self.executions.add(execution)
                execution.add_done_callback(self.executions.discard)

    def shutdown(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)

    def _submit(self, tasks: list[ClaimedTask]) -> asyncio.Future | None:
        """Hands a CPU stage's batch to a stage thread at once, before the event loop finishes the
        claim's bookkeeping (a hop waited 0.3-0.9 ms for it). None for a GPU stage: its batch
        waits for the device first (run_batch)."""
        spec = self.registry[tasks[0].stage]
        if spec.device == "gpu":
            return None
        return asyncio.get_running_loop().run_in_executor(self.threads, self.runner.run, spec, tasks)

    async def run_batch(self, tasks: list[ClaimedTask], submitted: asyncio.Future | None = None) -> None:
        spec = self.registry[tasks[0].stage]
        loop = asyncio.get_running_loop()
        timeout = self.timeouts.get(spec.name, DEFAULT_TIMEOUT_S)
        for task in tasks:
            log.info("[TRIGGER] stage %s started for %s (job %s, attempt %d/%d)", task.stage, task.subject,
                     task.job_id, task.attempt, task.max_attempts, extra=task_fields(task))
        started = time.monotonic()
        try:
            # GPU stages take the device one batch at a time: a second batch would only fight
            # the first for memory.
            lock = self.device_locks[spec.name] if spec.device == "gpu" else None
            if lock:
                await lock.acquire()
            try:
                running = submitted
                if running is None:
                    running = loop.run_in_executor(self.threads, self.runner.run, spec, tasks)
                outcomes = await asyncio.wait_for(running, timeout)
            finally:
                if lock:
                    lock.release()
        except asyncio.TimeoutError:
            outcomes = [TimeoutError(f"stage {spec.name} timed out after {timeout:.0f} s")] * len(tasks)
        except Exception as exc:  # the engine's side (loading inputs, a lost connection): retry
            outcomes = [exc] * len(tasks)
        elapsed = time.monotonic() - started
        # Once per batch, not per task, or a batch of 16 would read as 16 runs; and before the
        # settles, so a batch is on the histogram by the time its results are committed. A batch
        # that gave no result at all is left out: its time is the timeout's or an error's.
        if any(not isinstance(outcome, BaseException) for outcome in outcomes):
            self.metrics.duration.labels(spec.name).observe(elapsed)
            for _ in tasks:
                self.metrics.task_duration.labels(spec.name).observe(elapsed / len(tasks))
        await asyncio.gather(*(self.settle(task, outcome, elapsed) for task, outcome in zip(tasks, outcomes)))
        if self.state.saturated:
            self.state.kick()

    async def settle(self, task: ClaimedTask, outcome: Completion | BaseException, elapsed: float) -> None:
        state = self.state
        state.settling.add(task.id)
        try:
            if isinstance(outcome, BaseException):
                await self.fail(task, outcome)
            else:
                accepted = await self.completer.complete(task, outcome)
                if accepted:
                    self.metrics.completed.labels(task.stage).inc()
                    log.info("stage %s succeeded for %s in %.3f s", task.stage, task.subject, elapsed,
                             extra=task_fields(task))
                else:
                    self.metrics.lease_losses.inc()
                    log.warning("stage %s finished for %s but its lease was lost (another attempt owns it "
                                "now, or the job was cancelled): result dropped", task.stage, task.subject,
                                extra=task_fields(task))
        except Exception as exc:
            if isinstance(exc, OutcomeUnknown):
                # Not "could not record" alone: it may well have been recorded. The completer
                # reads it back once the database answers and logs which it was. Either way the
                # lease fence keeps it safe: a committed result ended the lease (a rescue then
                # finds nothing), an uncommitted one runs again as attempt+1.
                log.warning("could not record the outcome of task %s (%s) for certain: outcome unknown: the "
                            "connection failed during the commit (%s), so it may or may not have committed; the "
                            "lease fence makes a retry safe. Checking once the database answers", task.id,
                            task.stage, exc, extra=task_fields(task))
            else:
                log.error("could not record the outcome of task %s (%s): %s; its lease will expire and it runs again",
                          task.id, task.stage, describe_error(exc), extra=task_fields(task))
            # The task stays running under our name, no longer renewed (unless its completion
            # did commit). The database leaves our own leases out of the deadline it gives us (we
            # renew them), so wake when this one has run out and rescue it: a lone worker would
            # otherwise leave it running forever.
            when = asyncio.get_running_loop().time() + self.settings.lease_s + MIN_DEADLINE_WAIT_S
            state.orphan_deadline = max(state.orphan_deadline or 0.0, when)
            state.kick()
        finally:
            state.task_done(task.id)

    async def fail(self, task: ClaimedTask, exc: BaseException) -> None:
        permanent = isinstance(exc, PermanentStageError)
        details = getattr(exc, "details", None) or None
        message = f"{type(exc).__name__}: {exc}" if not permanent else str(exc)
        delay = queue.retry_delay(task.attempt, self.settings.retry_base_s, self.settings.retry_max_s)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(queue.FAIL, (
                task.id, self.owner, task.attempt, message[:10000], Jsonb(details) if details else None,
                permanent, delay))).fetchone()
        outcome = row["outcome"]
        if outcome == "retry":
            self.metrics.retries.labels(task.stage).inc()
            log.warning("stage %s failed for %s (attempt %d/%d): %s; retry in %.1f s", task.stage, task.subject,
                        task.attempt, task.max_attempts, message, delay, extra=task_fields(task))
        elif outcome == "failed":
            self.metrics.failed.labels(task.stage).inc()
            log.error("stage %s failed for %s%s: %s", task.stage, task.subject,
                      " (permanent)" if permanent else f" after {task.attempt} attempts", message,
                      extra=task_fields(task))
            self.completer.failed_for_good(task)
        else:
            self.metrics.lease_losses.inc()
            log.warning("stage %s failed for %s after its lease was lost: %s", task.stage, task.subject, message,
                        extra=task_fields(task))
