"""Workers say why: a start against a database that is not there names the cause (it logged
"worker stopped: " with nothing after it), exceptions are formatted with their type and cause
chain, and a completion whose commit outcome is unknown is reported as unknown, then checked."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys

import psycopg
import pytest

from outbox import completion, db, queue
from outbox.errors import describe_error
from tests.conftest import ROOT
from tests.helpers import claim, insert_job
from tests.workerproc import TEST_REGISTRY


# ------------------------------------------------------------------------ describe_error
def raised(make):
    try:
        make()
    except BaseException as exc:  # noqa: BLE001 - the helper under test takes anything
        return exc
    raise AssertionError("nothing raised")


def test_describe_error_names_a_message_less_exception_by_its_type():
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(ValueError("bad value")) == "ValueError: bad value"


def test_describe_error_joins_a_multi_line_message():
    exc = psycopg.OperationalError('connection failed: port 1 failed: Connection refused\n'
                                   '\tIs the server running on that host?\n')
    assert describe_error(exc) == ("OperationalError: connection failed: port 1 failed: Connection refused "
                                   "Is the server running on that host?")


def test_describe_error_follows_the_cause_chain_and_leaves_out_what_adds_nothing():
    def chained():
        try:
            try:
                raise ConnectionRefusedError("Connection refused")
            except OSError as low:
                raise psycopg.OperationalError("connection failed") from low
        except psycopg.OperationalError as mid:
            raise RuntimeError("worker cannot start") from mid

    assert describe_error(raised(chained)) == ("RuntimeError: worker cannot start; caused by OperationalError: "
                                               "connection failed; caused by ConnectionRefusedError: Connection refused")

    def repeated():  # the cause's message is already in the outer one (db.connect does this)
        try:
            raise psycopg.OperationalError("Connection refused")
        except psycopg.OperationalError as exc:
            raise db.DatabaseUnavailable(f"cannot connect to PostgreSQL at h:1/x: {exc}") from exc

    assert describe_error(raised(repeated)) == "DatabaseUnavailable: cannot connect to PostgreSQL at h:1/x: Connection refused"

    async def timed_out():  # asyncio's TimeoutError: empty, caused by an empty CancelledError
        async with asyncio.timeout(0):
            await asyncio.sleep(1)

    assert describe_error(raised(lambda: asyncio.run(timed_out()))) == "TimeoutError"


def test_describe_error_shows_the_context_unless_asked_not_to():
    def during_handling():
        try:
            raise KeyError("k")
        except KeyError:
            raise ValueError("cleanup failed")

    exc = raised(during_handling)
    assert describe_error(exc) == "ValueError: cleanup failed; while handling KeyError: 'k'"
    assert describe_error(exc, context=False) == "ValueError: cleanup failed"

    def suppressed():
        try:
            raise KeyError("k")
        except KeyError:
            raise ValueError("clean") from None

    assert describe_error(raised(suppressed)) == "ValueError: clean"


# ------------------------------------------------------------------------ start without a database
def test_worker_started_while_the_database_is_down_names_the_cause():
    port = db.free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "workers", "start", "--registry", TEST_REGISTRY], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
        env={**os.environ, "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/adflow",
             "DB_OPERATION_TIMEOUT": "1", "HEALTH_ADDR": "", "PYTHONUNBUFFERED": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    [line] = [line for line in output.splitlines() if "worker stopped:" in line]
    assert not line.rstrip().endswith("worker stopped:"), line
    assert f"cannot use the database at 127.0.0.1:{port}/adflow" in line, line
    assert "no answer from the database within 1 s (DB_OPERATION_TIMEOUT)" in line, line
    assert "Connection refused" in line, line  # from the direct attempt: the cause itself
    assert "Traceback" not in output, output


# ------------------------------------------------------------------------ outcome unknown
class CommitTrouble:
    """A pooled connection whose first completion statement goes wrong the way a real one can.

    "answered-late": the statement runs and commits, then the caller gets TimeoutError, as a
    worker frozen (SIGSTOP) past DB_OPERATION_TIMEOUT does on SIGCONT: the answer is in the
    socket, but the operation's deadline passed first. "lost": the connection dies as the
    statement is sent, and nothing reaches the server."""

    def __init__(self, conn, mode: str, state: dict):
        self.conn, self.mode, self.state = conn, mode, state

    async def execute(self, query, params=None):
        if query == completion.COMPLETE_MANY and not self.state.get("done"):
            self.state["done"] = True
            if self.mode == "answered-late":
                await self.conn.execute(query, params)
                raise TimeoutError("no answer from the database within 30 s (DB_OPERATION_TIMEOUT)")
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await self.conn.execute(query, params)

    def __getattr__(self, name):
        return getattr(self.conn, name)


@pytest.mark.parametrize("mode, verdict", [("answered-late", "attempt 1 committed after all; its result stands"),
                                           ("lost", "attempt 1 not committed")])
def test_a_completion_with_an_unknown_outcome_says_so_and_is_checked(conn, db_url, caplog, mode, verdict):
    """The executor and the completer in-process, on the per-test database, with a pool whose
    first completion goes wrong."""
    from outbox.completion import Completion
    from workers.worker import Worker, WorkerSettings

    caplog.set_level(logging.INFO, logger="workers")
    insert_job(conn, variants=1)
    worker = Worker(WorkerSettings(url=db_url, db_timeout_s=5, reconnect_delay_s=0.05), {}, None)
    rows: list[dict] = []
    claim(conn, owner=worker.owner, stages=["vlm_analyze"], rows_out=rows)
    [task], _ = queue.split_claim(rows)

    async def scenario():
        await worker.pool.open(wait=True)
        plain, trouble = worker.pool.connection, {}

        @contextlib.asynccontextmanager
        async def troubled():
            async with plain() as pooled:
                yield CommitTrouble(pooled, mode, trouble)

        worker.pool.connection = troubled
        completer = asyncio.create_task(worker.completer.run())
        try:
            worker.state.claimed([task], waiting=False)
            await worker.executor.settle(task, Completion(task.id, task.attempt, {"ok": True}), 0.01)
            await asyncio.wait_for(asyncio.gather(*worker.completer.outcome_checks), 10)
        finally:
            completer.cancel()
            await worker.completer.cancel_outcome_checks()
            await worker.pool.close()
            worker.executor.shutdown()

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "workers"]
    unknown = [m for m in messages if "outcome unknown" in m]
    assert len(unknown) == 1, messages
    # Still "could not record the outcome": the fault suite and operators' alerts look for it.
    assert unknown[0].startswith(f"could not record the outcome of task {task.id} (vlm_analyze) for certain"), unknown
    assert "the lease fence makes a retry safe" in unknown[0]
    assert ("TimeoutError: no answer" if mode == "answered-late" else "server closed the connection") in unknown[0]
    checked = [m for m in messages if "outcome known now" in m]
    assert len(checked) == 1 and verdict in checked[0], messages
    assert messages.index(unknown[0]) < messages.index(checked[0])
    stored = conn.execute("SELECT attempt FROM stage_results WHERE task_id = %s", (task.id,)).fetchall()
    assert stored == ([{"attempt": 1}] if mode == "answered-late" else [])
    # The rescue stays armed: the task left in_flight, but its lease is still ours until it runs out.
    assert task.id not in worker.state.in_flight and worker.state.orphan_deadline is not None


def test_a_heartbeat_that_times_out_says_what_timed_out(conn, db_url, caplog):
    """The heartbeat's warning read "heartbeat failed ()": asyncio's TimeoutError is empty."""
    from workers.worker import Worker, WorkerSettings

    caplog.set_level(logging.WARNING, logger="workers")
    nowhere = f"postgresql://postgres@127.0.0.1:{db.free_port()}/adflow"
    worker = Worker(WorkerSettings(url=nowhere, db_timeout_s=0.3, heartbeat_s=0.05), {}, None)
    insert_job(conn, variants=1)
    rows: list[dict] = []
    claim(conn, owner=worker.owner, stages=["vlm_analyze"], rows_out=rows)
    [task], _ = queue.split_claim(rows)
    worker.state.claimed([task], waiting=False)

    async def scenario():
        await worker.pool.open(wait=False)
        try:
            await worker.heartbeat.renew()  # one renewal, waited for: no sleeping on log text
        finally:
            await worker.pool.close()
            worker.executor.shutdown()

    asyncio.run(scenario())
    [line, *_] = [r.getMessage() for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert line.startswith("heartbeat failed (TimeoutError: no answer from the database within 0.3 s "
                           "(DB_OPERATION_TIMEOUT)); leases run out in"), line
