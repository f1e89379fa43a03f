"""The completion transaction: a batch of results, and the artifacts stored in the database with
them, commit together or not at all; the artifacts of results the fence refused go with them.

One function, so the rule is read in one place: workers/completer.py calls it for every group
commit, `cli.py run-stage` through the same service.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncContextManager, Callable, Sequence

import psycopg
from psycopg.types.json import Jsonb

from outbox.artifacts import INSERT_ARTIFACT
from outbox.errors import describe_error

COMPLETE_MANY = "SELECT outbox_complete_many(%s, %s) AS accepted"
COMPLETE_CLAIM = "SELECT * FROM outbox_complete_claim_v2(%s, %s, %s, %s, %s, %s)"
DROP_REFUSED = "DELETE FROM artifacts WHERE key = ANY (%s)"
# First in a completion's explicit transaction (one with artifacts). A connection can freeze
# half-open between its statements (the fault suite's proxy does it): the server then holds the
# transaction's row locks until it learns the client is gone, and every SKIP LOCKED claim and
# rescue passes over those tasks meanwhile. With this the server ends such a transaction itself.
IDLE_LIMIT = "SELECT set_config('idle_in_transaction_session_timeout', %s, true)"


@dataclass
class Completion:
    """One attempt's outcome to commit: its JSON result and, for stores in the database, the
    artifacts (key -> bytes) written in the same transaction."""

    task_id: int
    attempt: int
    result: dict
    artifacts: dict[str, bytes] = field(default_factory=dict)


class OutcomeUnknown(Exception):
    """The commit was under way (sent, or being sent) when its connection failed or timed out: it
    may have committed or not, and only reading the database afterwards can tell. A class of its
    own because "could not record the outcome" was logged for results that had in fact committed
    (a worker frozen with SIGSTOP past its lease: on SIGCONT the answer was in the socket, but the
    operation's timeout had expired first)."""

    def __init__(self, cause: BaseException):
        super().__init__(describe_error(cause))
        self.cause = cause


@dataclass(frozen=True)
class ClaimRequest:
    """A claim to make in the completion's own statement (outbox_claim's arguments): the tasks
    the completion enqueues (the next stage of each variant) are then the completing worker's at
    once, with no notification, wake-up and separate claim in between."""

    stages: Sequence[str]
    limit: int
    lease_s: float
    alone: bool


@dataclass
class Committed:
    accepted: set[int]  # ids the lease fence accepted
    claimed: list[dict] = field(default_factory=list)  # outbox_claim's rows, when a claim was asked for


async def commit_completions(connection: Callable[[], AsyncContextManager[psycopg.AsyncConnection]], owner: str,
                             batch: Sequence[Completion], claim: ClaimRequest | None = None,
                             idle_limit_s: float = 30.0) -> Committed:
    """Commits `batch` under `owner`'s leases on an autocommit connection from `connection()` (the
    caller's bounded pool checkout: its timeout, raised as the block ends, counts as a failure of
    the commit); the ids the fence refused are those whose attempt lost its lease, or whose job
    was cancelled. With `claim`, claims in the same statement, after the completions, so it sees
    the tasks they enqueued (outbox_complete_claim). Without artifacts to write that is one
    statement in its own transaction, as the completion alone was.

    `idle_limit_s`: how long the server keeps the explicit transaction of a completion with
    artifacts open while it waits for its client (see IDLE_LIMIT).

    Raises the original error when nothing can have committed (the failure came before the
    commit), OutcomeUnknown when it may have."""
    items = Jsonb([{"id": c.task_id, "attempt": c.attempt, "result": c.result} for c in batch])
    pending = [(key, data, len(data)) for c in batch for key, data in c.artifacts.items()]
    committing = False

    async def complete(conn) -> Committed:
        if claim is None:
            row = await (await conn.execute(COMPLETE_MANY, (owner, items))).fetchone()
            return Committed(set(row["accepted"]))
        rows = await (await conn.execute(COMPLETE_CLAIM, (owner, items, list(claim.stages), claim.limit,
                                                          claim.lease_s, claim.alone))).fetchall()
        return Committed(set(rows[0]["accepted"]), rows)

    try:
        async with connection() as conn:
            if not pending:
                committing = True  # autocommit: the statement is its own transaction
                return await complete(conn)
            async with conn.transaction():
                await conn.execute(IDLE_LIMIT, (f"{max(1, round(idle_limit_s * 1000))}ms",))
                async with conn.cursor() as cur:
                    await cur.executemany(INSERT_ARTIFACT, pending)
                committed = await complete(conn)
                refused = [key for c in batch if c.task_id not in committed.accepted for key in c.artifacts]
                if refused:
                    await conn.execute(DROP_REFUSED, (refused,))
                committing = True  # the COMMIT goes out as this block ends
            return committed
    except Exception as exc:
        if committing:
            raise OutcomeUnknown(exc) from exc
        raise
