"""What operators look at: a workers table written at a worker's start and stop, one SQL rule
for a job's and a variant's state, and an index for listing the newest jobs
(alembic/sql/0004_workers.sql).

Revision ID: 0004
Revises: 0003
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0004_workers.sql")


def downgrade() -> None:
    # 0003's cancel first: it must not call outbox_job_state once that is gone.
    run_sql(function_definition("0003_edges.sql", "outbox_cancel"))
    run_sql_file("0004_downgrade.sql")
