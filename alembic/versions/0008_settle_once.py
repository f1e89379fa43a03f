"""outbox_job_settle leaves the fan-in of a job it has just closed to jobs_settle_on_close
instead of trying it twice in one commit (alembic/sql/0008_settle_once.sql).

Revision ID: 0008
Revises: 0007
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0008_settle_once.sql")


def downgrade() -> None:
    run_sql(function_definition("0003_edges.sql", "outbox_job_settle"))
