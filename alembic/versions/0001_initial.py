"""Tables, indexes, the stage graph, trigger functions and outbox operations.

Revision ID: 0001
Revises:
"""
from outbox.migrate import run_sql_file

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0001_schema.sql")
    run_sql_file("0001_functions.sql")


def downgrade() -> None:
    run_sql_file("0001_downgrade.sql")
