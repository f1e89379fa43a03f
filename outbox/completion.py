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
DROP_REFUSED = "DELETE FROM artifacts WHERE key = ANY (%s)"


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


async def commit_completions(connection: Callable[[], AsyncContextManager[psycopg.AsyncConnection]], owner: str,
                             batch: Sequence[Completion]) -> set[int]:
    """Commits `batch` under `owner`'s leases on an autocommit connection from `connection()` (the
    caller's bounded pool checkout: its timeout, raised as the block ends, counts as a failure of
    the commit); returns the ids the fence accepted (the others' attempts lost their lease, or
    their job was cancelled).

    Raises the original error when nothing can have committed (the failure came before the
    commit), OutcomeUnknown when it may have."""
    items = Jsonb([{"id": c.task_id, "attempt": c.attempt, "result": c.result} for c in batch])
    pending = [(key, data, len(data)) for c in batch for key, data in c.artifacts.items()]
    committing = False
    try:
        async with connection() as conn:
            if not pending:
                committing = True  # autocommit: the statement is its own transaction
                row = await (await conn.execute(COMPLETE_MANY, (owner, items))).fetchone()
                return set(row["accepted"])
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(INSERT_ARTIFACT, pending)
                row = await (await conn.execute(COMPLETE_MANY, (owner, items))).fetchone()
                accepted = set(row["accepted"])
                refused = [key for c in batch if c.task_id not in accepted for key in c.artifacts]
                if refused:
                    await conn.execute(DROP_REFUSED, (refused,))
                committing = True  # the COMMIT goes out as this block ends
            return accepted
    except Exception as exc:
        if committing:
            raise OutcomeUnknown(exc) from exc
        raise
