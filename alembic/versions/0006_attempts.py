"""Every attempt of a task kept on it (stage_tasks.attempt_log), the claim's queue wait
(outbox_claim_v2, outbox_complete_claim_v2), and outbox_fail_job for a job nobody will finish
(alembic/sql/0006_attempts.sql).

Revision ID: 0006
Revises: 0005
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (file, function) of each definition 0006 replaced, as it was at 0005.
REPLACED = (("0002_claim_planning.sql", "outbox_claim"), ("0001_functions.sql", "outbox_complete"),
            ("0003_edges.sql", "outbox_fail"), ("0003_edges.sql", "outbox_rescue_expired"),
            ("0001_functions.sql", "outbox_cancel_tasks"), ("0003_edges.sql", "outbox_cancel_leftovers"),
            ("0001_functions.sql", "outbox_cancel_job"))


def upgrade() -> None:
    run_sql_file("0006_attempts.sql")


def downgrade() -> None:
    for file, function in REPLACED:
        run_sql(function_definition(file, function))
        # 0002 set jit = off on the older definitions with ALTER FUNCTION; a replacement resets it.
        run_sql(f"ALTER FUNCTION {function} SET jit = off")
    run_sql_file("0006_downgrade.sql")
