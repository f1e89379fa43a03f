"""Queries the console needs that outbox/views.py does not have (yet): each is a candidate to move
there, so that the CLI could show the same numbers."""
from __future__ import annotations

from psycopg import Connection

# Per stage, what finished in the last hour: through the partial index on failed tasks and the
# stage's own rows; finished_at is set when a task ends done or failed.
LAST_HOUR_SQL = """
    SELECT g.stage,
           count(t.id) FILTER (WHERE t.status = 'done') AS done,
           count(t.id) FILTER (WHERE t.status = 'failed') AS failed
    FROM stage_graph g
    LEFT JOIN stage_tasks t ON t.stage = g.stage AND t.finished_at >= now() - interval '1 hour'
                           AND t.status IN ('done', 'failed')
    GROUP BY g.stage, g.position ORDER BY g.position"""


def last_hour(conn: Connection) -> dict[str, dict]:
    """{stage: {"done": n, "failed": n}} for tasks that finished in the last hour."""
    return {r["stage"]: {"done": r["done"], "failed": r["failed"]} for r in conn.execute(LAST_HOUR_SQL)}
