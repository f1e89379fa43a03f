"""The worker in this process, on the per-test database, with the test stages: its services run
a job to the end, and the test waits on the signals the worker exposes (WorkerState.serving, the
state's lifecycle, the database's rows), never on log text or a sleep."""
from __future__ import annotations

import asyncio
import os

import psycopg

from outbox import config
from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests.engine_stages import build_registry
from workers.dispatcher import LOCKED_RECHECK_S
from workers.runner import TaskRunner
from workers.state import ClaimMode, Lifecycle, Link
from workers.worker import Worker, WorkerSettings


def make_worker(db_url: str, **overrides) -> Worker:
    options = dict(concurrency=4, lease_s=5, heartbeat_s=1, grace_s=5, reconnect_delay_s=0.1, db_timeout_s=10,
                   health_addr=None)
    settings = WorkerSettings(url=db_url, **{**options, **overrides})
    return Worker(settings, build_registry(), TaskRunner(open_store(), config.asset_root()))


def submit(conn, image, copy: str, variants: int) -> str:
    return submit_job(conn, open_store(), [image], copy, tenant="acme", variants=variants).job_id


async def job_state(worker: Worker, job_id: str) -> str:
    """open, done, failed or cancelled: the database's one rule (outbox_job_state)."""
    async with worker.pool.connection() as conn:
        row = await (await conn.execute("SELECT outbox_job_state(status, current_step) AS state FROM jobs "
                                        "WHERE job_id = %s", (job_id,))).fetchone()
    return row["state"]


async def until_finished(worker: Worker, job_id: str, timeout: float = 60) -> str:
    """Waits on the job's own notifications (the old system's channel), not on a timer."""
    from outbox import db

    conn = await db.connect_async(worker.settings.url)
    async with conn:
        await conn.execute("LISTEN job_state_changed")
        async with asyncio.timeout(timeout):
            while (state := await job_state(worker, job_id)) == "open":
                async for _ in conn.notifies(timeout=1.0, stop_after=1):
                    pass
    return state


def test_a_worker_in_process_runs_a_job_and_stops_cleanly(conn, db_url, home, tiny_png):
    job_id = submit(conn, tiny_png, "Fresh coffee", variants=2)
    worker = make_worker(db_url)

    async def scenario():
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.state.serving.wait(), 30)
        status = worker.state.status()
        assert (status.lifecycle, status.link) == (Lifecycle.RUNNING, Link.UP)
        # Later pipeline stages first (see outbox_claim).
        assert status.stages[0] == "instagram_feed_gen" and status.stages[-1] == "vlm_analyze"
        finished = await until_finished(worker, job_id)
        worker.request_stop("test")
        code = await asyncio.wait_for(run, 30)
        return finished, code

    finished, code = asyncio.run(scenario())
    assert (finished, code) == ("done", 0)
    assert worker.state.lifecycle is Lifecycle.STOPPING and not worker.state.in_flight
    counts = conn.execute("SELECT status, count(*) AS n FROM stage_tasks WHERE job_id = %s GROUP BY status",
                          (job_id,)).fetchall()
    assert counts == [{"status": "done", "n": 2 * 8 + 2}]


def test_a_task_another_claim_holds_is_looked_at_again_later_not_at_once(conn, db_url, home, tiny_png):
    """A due task that the claim passed over (SKIP LOCKED: another worker's claim holds it) is
    that worker's in a moment: this one looks again after LOCKED_RECHECK_S, not after 50 ms (which
    sent every loser of a notification back to claim in the middle of the winner's chain), and
    it does look again: when that other claim fails, the task still runs."""
    job_id = submit(conn, tiny_png, "Fresh coffee", variants=1)
    holder = psycopg.connect(db_url)  # a concurrent claim, not committed yet
    holder.execute("SELECT id FROM stage_tasks WHERE job_id = %s FOR UPDATE", (job_id,))
    worker = make_worker(db_url)

    async def scenario():
        loop = asyncio.get_running_loop()
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.state.serving.wait(), 30)
        async with asyncio.timeout(10):  # the start-up claim, which passes over the held task
            while worker.dispatcher.deadline is None:
                await asyncio.sleep(0.01)
        wait = worker.dispatcher.deadline - loop.time()
        holder.rollback()  # that claim failed: the task is free again, and nobody notifies
        finished = await until_finished(worker, job_id)
        worker.request_stop("test")
        return wait, finished, await asyncio.wait_for(run, 30)

    try:
        wait, finished, code = asyncio.run(scenario())
    finally:
        holder.close()
    assert LOCKED_RECHECK_S - 0.5 < wait <= LOCKED_RECHECK_S
    assert (finished, code) == ("done", 0)


def test_a_service_that_dies_stops_the_worker_with_exit_1(conn, db_url, home):
    """A service never ends on its own: one that does leaves the worker half-alive, so it stops."""
    worker = make_worker(db_url)

    async def broken() -> None:
        raise RuntimeError("planted")

    worker.heartbeat.run = broken

    async def scenario():
        return await asyncio.wait_for(worker.run(), 30)

    assert asyncio.run(scenario()) == 1
    assert worker.state.lifecycle is Lifecycle.STOPPING


def test_shutdown_hands_back_what_did_not_finish_in_the_grace(conn, db_url, home, tiny_png):
    job_id = submit(conn, tiny_png, "Slow SLEEP:vlm_analyze:30", variants=1)
    worker = make_worker(db_url, grace_s=0.2)

    async def scenario():
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.state.serving.wait(), 30)
        while not worker.state.in_flight:  # the dispatcher has claimed it
            await asyncio.sleep(0.02)
        worker.request_stop("test")
        return await asyncio.wait_for(run, 30)

    assert asyncio.run(scenario()) == 0
    task = conn.execute("SELECT status, lease_owner, attempts FROM stage_tasks WHERE job_id = %s AND stage = 'vlm_analyze'",
                        (job_id,)).fetchone()
    assert task["status"] == "queued" and task["lease_owner"] is None, task


def test_the_claim_mode_transitions_live_in_one_place():
    """ALONE is left when the lone task ends (and the dispatcher kicked), WAIT_IDLE blocks claims
    while anything is in flight."""
    from outbox.queue import ClaimedTask
    from workers.state import WorkerState

    def task(i: int, alone: bool = False) -> ClaimedTask:
        return ClaimedTask(id=i, job_id="j", variant_id="v", stage="planner", attempt=1, max_attempts=3,
                           tenant_id="acme", alone=alone)

    state = WorkerState()
    state.claimed([task(1, alone=True)], waiting=False)
    assert state.claim_mode is ClaimMode.ALONE and not state.may_claim()
    state.wake.clear()
    state.task_done(1)
    assert state.claim_mode is ClaimMode.NORMAL and state.may_claim() and state.wake.is_set()
    state.claimed([task(2)], waiting=True)
    assert state.claim_mode is ClaimMode.WAIT_IDLE and not state.may_claim()
    state.wake.clear()
    state.task_done(2)
    assert state.may_claim() and state.wake.is_set()


def test_the_hop_trace_stamps_each_task_claimed_then_started(conn, db_url, home, tiny_png, tmp_path, monkeypatch):
    """bench/hop_profile.py reads these stamps: every task is claimed (by the dispatcher after a
    notification, or riding on a completion) before a stage thread starts on it, and a
    notification was heard before the first claim."""
    from workers import trace

    monkeypatch.setattr(trace, "_DIR", str(tmp_path))
    monkeypatch.setattr(trace, "_file", None)
    worker = make_worker(db_url)

    async def scenario():
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.state.serving.wait(), 30)
        # Submitted once the worker listens, so that its first claim follows a notification.
        job_id = await asyncio.to_thread(submit, conn, tiny_png, "Fresh coffee", 2)
        finished = await until_finished(worker, job_id)
        worker.request_stop("test")
        await asyncio.wait_for(run, 30)
        return job_id, finished

    job_id, finished = asyncio.run(scenario())
    assert finished == "done"
    trace._file.close()
    found = trace.read(tmp_path)
    assert list(found.heard) == [os.getpid()]
    stamps, heard = found.at, found.heard[os.getpid()]
    ids = [r["id"] for r in conn.execute("SELECT id FROM stage_tasks WHERE job_id = %s", (job_id,)).fetchall()]
    assert len(ids) == 2 * 8 + 2
    for task_id in ids:
        took = [stamps[(s, task_id)] for s in ("claimed", "rode") if (s, task_id) in stamps]
        assert len(took) == 1, (task_id, took)  # claimed exactly one way
        assert took[0] <= stamps[("thread", task_id)]
    first_claim = min(stamps[("claimed", i)] for i in ids if ("claimed", i) in stamps)
    assert heard and min(heard) <= first_claim
