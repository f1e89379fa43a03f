"""A completion that claims the next stages in the same statement (outbox_complete_claim), and a
queued task's wake-up notification at commit, only for a task still queued then
(alembic/sql/0005_wake_at_commit.sql).

Revision ID: 0005
Revises: 0004
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0005_wake_at_commit.sql")


def downgrade() -> None:
    run_sql(function_definition("0001_functions.sql", "outbox_notify_task_queued"))
    run_sql_file("0005_downgrade.sql")
