"""Claims that stay fast whatever the table holds: JIT off for the worker operations; the claim
keeps one generic, index-only plan per session and skips cancelled jobs' tasks without an
anti-join the planner could misjudge; the next deadline is planned once per session instead of
once per claim.

Revision ID: 0002
Revises: 0001
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_sql_file("0002_claim_planning.sql")


def downgrade() -> None:
    run_sql_file("0002_downgrade.sql")
    for function in ("outbox_claim", "outbox_next_deadline"):
        run_sql(function_definition("0001_functions.sql", function))
