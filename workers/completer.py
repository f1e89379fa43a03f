"""The completer service: group commit of results. Every completion waiting when the previous
commit ends goes into one completion transaction (outbox/completion.py), so under load round trips
per task fall while a lone task waits for none. The dispatcher may ride a claim on it: the next
stages the completions enqueue are then ours in the same round trip. When a commit's outcome is
unknown it reads back afterwards whether it committed, and says so."""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from outbox.completion import ClaimRequest, Completion, OutcomeUnknown, commit_completions
from outbox.errors import describe_error
from outbox.queue import ClaimedTask
from workers.logs import task_fields
from workers.pool import UNREACHABLE
from workers.state import Service

log = logging.getLogger("workers")

COMPLETION_BATCH = 200
# After a completion whose outcome is unknown, how often we try to read back whether it committed
# (with the listener's backoff between tries) before saying we could not tell.
OUTCOME_CHECK_TRIES = 8
READ_BACK = "SELECT task_id, attempt FROM stage_results WHERE task_id = ANY (%s)"


class Completer(Service):
    def __init__(self, *shared) -> None:
        super().__init__(*shared)
        # Put to by complete() (the executor's settle coroutines), taken from by run() only.
        self.waiting: asyncio.Queue[tuple[ClaimedTask, Completion, asyncio.Future]] = asyncio.Queue()
        # Written here only: read-backs of unknown outcomes still running.
        self.outcome_checks: set[asyncio.Task] = set()
        # Set by Worker to the dispatcher's: what to claim in a completion's transaction (None:
        # nothing), given the tasks being completed, and what to do with what it took.
        self.claim_with: Callable[[list[ClaimedTask]], ClaimRequest | None] = lambda _: None
        self.took: Callable[[list[dict]], None] = lambda _: None

    async def complete(self, task: ClaimedTask, completion: Completion) -> bool:
        """Waits for `completion` to be committed in the next group commit; True when the lease
        fence accepted it. Raises OutcomeUnknown, or the error that prevented the commit."""
        future = asyncio.get_running_loop().create_future()
        await self.waiting.put((task, completion, future))
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self.waiting.get()]
            while not self.waiting.empty() and len(batch) < COMPLETION_BATCH:
                batch.append(self.waiting.get_nowait())
            tasks = [task for task, _, _ in batch]
            try:
                claim = self.claim_with(tasks)
                try:
                    committed = await commit_completions(self.pool.connection, self.owner,
                                                         [c for _, c, _ in batch], claim, self.settings.db_timeout_s)
                except BaseException:
                    if claim is not None:
                        self.took([])  # gives back the slots the claim had reserved
                    raise
                # What the claim took goes to work before the futures let the completed tasks'
                # slots go, so the next stage starts as soon as possible.
                if claim is not None:
                    self.took(committed.claimed)
                for task, _, future in batch:
                    future.set_result(task.id in committed.accepted)
            except Exception as exc:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, OutcomeUnknown):
                    self._start_outcome_check(tasks)

    def _start_outcome_check(self, tasks: list[ClaimedTask]) -> None:
        check = asyncio.create_task(self._check_outcomes(tasks), name="outcome-check")
        self.outcome_checks.add(check)
        check.add_done_callback(self.outcome_checks.discard)

    async def cancel_outcome_checks(self) -> None:
        for check in list(self.outcome_checks):
            check.cancel()
        await asyncio.gather(*self.outcome_checks, return_exceptions=True)

    async def _check_outcomes(self, tasks: list[ClaimedTask]) -> None:
        """Reads back whether completions whose outcome was unknown committed: a task's result
        row (stage_results, one per task) carries the attempt that wrote it. Only a log line
        depends on it; the engine's state does not (the lease fence already made it safe).
        Tries with the listener's backoff while the database is away, a bounded number of times."""
        delay = self.settings.reconnect_delay_s
        last: BaseException | None = None
        for _ in range(OUTCOME_CHECK_TRIES):
            try:
                async with self.pool.connection() as conn:
                    rows = await (await conn.execute(READ_BACK, ([t.id for t in tasks],))).fetchall()
                break
            except UNREACHABLE as exc:
                last = exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
        else:
            log.warning("could not check whether the completion of task(s) %s committed (%s); the lease fence keeps "
                        "a retry safe either way", [t.id for t in tasks], describe_error(last))
            return
        stored = {row["task_id"]: row["attempt"] for row in rows}
        for task in tasks:
            attempt = stored.get(task.id)
            if attempt == task.attempt:
                self.metrics.completed.labels(task.stage).inc()
                log.info("task %s (%s, %s): outcome known now: attempt %d committed after all; its result stands",
                         task.id, task.stage, task.subject, task.attempt, extra=task_fields(task))
            elif attempt is None:
                # No row: not committed, or committed but refused by the fence (the lease had
                # passed to another attempt, or the job was cancelled); the same for the engine.
                log.warning("task %s (%s, %s): outcome known now: attempt %d not committed (no result; or the lease "
                            "fence refused it); the task is retried like any lost attempt", task.id, task.stage,
                            task.subject, task.attempt, extra=task_fields(task))
            else:
                log.warning("task %s (%s, %s): outcome known now: attempt %d not committed; attempt %d's result "
                            "stands", task.id, task.stage, task.subject, task.attempt, attempt,
                            extra=task_fields(task))
