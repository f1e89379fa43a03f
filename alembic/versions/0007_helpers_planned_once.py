"""outbox_last_variant_stage in plpgsql, so that a session plans its query once instead of once
per calling statement (alembic/sql/0007_helpers_planned_once.sql).

Revision ID: 0007
Revises: 0006
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0007_helpers_planned_once.sql")


def downgrade() -> None:
    run_sql(function_definition("0001_functions.sql", "outbox_last_variant_stage"))
