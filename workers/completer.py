"""The completer service: group commit of results. Every completion waiting when the previous
commit ends goes into one completion transaction (outbox/completion.py), so under load round trips
per task fall while a lone task waits for none. The dispatcher may ride a claim on it: the next
stages the completions enqueue are then ours in the same round trip. When a commit's outcome is
unknown it reads back afterwards whether it committed, and says so. It also counts the jobs whose
end was this worker's commit (adflow_jobs_finished_total), so that the fleet counts each once."""
from __future__ import annotations

import asyncio
import logging
import time
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
# The job's age when the task failed (the database's clock), only if the transaction that failed
# the task is the one that failed the job: both finished_at and updated_at (the touch trigger's)
# are that transaction's now(). Of two workers failing a job's last two variants at once, both
# find the job failed afterwards, but only the second one's transaction ran the fan-in that
# failed it.
JOB_FAILED_BY = """
SELECT extract(epoch FROM t.finished_at - j.created_at)::float8 AS seconds
FROM stage_tasks t JOIN jobs j ON j.job_id = t.job_id
WHERE t.id = %s AND j.status = 'failed' AND j.updated_at = t.finished_at"""


class Completer(Service):
    def __init__(self, *shared) -> None:
        super().__init__(*shared)
        # Put to by complete() (the executor's settle coroutines), taken from by run() only.
        self.waiting: asyncio.Queue[tuple[ClaimedTask, Completion, asyncio.Future]] = asyncio.Queue()
        # Written here only: read-backs of unknown outcomes still running, and the counts of job
        # ends waiting for their query.
        self.outcome_checks: set[asyncio.Task] = set()
        self.job_ends: set[asyncio.Task] = set()
        # Set by Worker to the dispatcher's: what to claim in a completion's transaction (None:
        # nothing), given the tasks being completed, and what to do with what it took.
        self.claim_with: Callable[[list[ClaimedTask]], ClaimRequest | None] = lambda _: None
        # Set by Worker from the stage graph before the services start: the job's last stage.
        self.last_job_stage: str | None = None
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
                for task in tasks:
                    if task.variant_id is None and task.id in committed.accepted:
                        self._job_done(task)
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
        """Also the job-end counts still waiting for their query: a stopping worker loses them."""
        checks = self.outcome_checks | self.job_ends
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    def failed_for_good(self, task: ClaimedTask) -> None:
        """`task` ended failed (outbox_fail said 'failed'): counts its job's end if that failure
        ended the job. A variant's failure ends it only when it was the last variant left and no
        variant succeeded, which only the database can tell: one query per failure for good (as
        rare as a finished job), never per task."""
        self._count_job_failure(task.id, task_fields(task))

    def rescue_failed(self, task_id: int) -> None:
        """This worker's lease rescue failed task `task_id` for good (its last attempt's worker
        died): counted like a failure for good, if it ended the job."""
        self._count_job_failure(task_id, {"task_id": task_id})

    def _job_done(self, task: ClaimedTask) -> None:
        """`task`, a job-level task whose completion this worker committed: the fence accepted it
        from this worker alone, so a job's last stage is counted once in the fleet. No query: the
        claim carried the job's created_at. Its duration is on the worker's clock against the
        database's, which NTP keeps within milliseconds of each other."""
        if task.stage != self.last_job_stage:
            return  # a job stage with another after it: the job goes on
        self.metrics.jobs_finished.labels("done").inc()
        if task.job_created_at is not None:  # None: a claim of the previous release's function
            # An outside writer may set created_at (the jobs table is shared): never below 0.
            self.metrics.job_duration.labels("done").observe(max(0.0, time.time() - task.job_created_at.timestamp()))

    def _count_job_failure(self, task_id: int, fields: dict) -> None:
        # Apart from the commit loop and the settles: the query must not delay the next group
        # commit, nor hold the task's slot.
        check = asyncio.create_task(self._job_failed(task_id, fields), name="job-end")
        self.job_ends.add(check)
        check.add_done_callback(self.job_ends.discard)

    async def _job_failed(self, task_id: int, fields: dict) -> None:
        """Task `task_id` failed for good here: whether that failure ended its job, which costs one
        query (made only for a failure for good)."""
        try:
            async with self.pool.connection() as conn:
                row = await (await conn.execute(JOB_FAILED_BY, (task_id,))).fetchone()
        except Exception as exc:
            log.warning("metrics: could not tell whether the failure of task %s ended its job, or when: %s; its end "
                        "may be missing from adflow_jobs_finished_total and adflow_job_duration_seconds", task_id,
                        describe_error(exc), extra=fields)
            return
        if row is None:
            return  # the job goes on (other variants), or another transaction ended it
        self.metrics.jobs_finished.labels("failed").inc()
        # An outside writer may set created_at (the jobs table is shared): never below 0.
        self.metrics.job_duration.labels("failed").observe(max(0.0, row["seconds"]))

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
                if task.variant_id is None:
                    self._job_done(task)
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
