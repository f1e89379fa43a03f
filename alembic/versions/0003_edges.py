"""No dead ends whatever an outside writer does: refused re-signals, a closed variant set before
the fan-in, cancel in one transaction, tenant ids checked where rows are written, rescued tasks
keep their place (alembic/sql/0003_edges.sql, docs/semantics.md).

Revision ID: 0003
Revises: 0002
"""
from outbox.migrate import function_definition, run_sql, run_sql_file

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The functions 0003 replaced, and the file holding the definition each goes back to.
RESTORED = {
    "outbox_fan_in": "0001_functions.sql",
    "notify_job_variant_state_change": "0001_functions.sql",
    "notify_job_state_change": "0001_functions.sql",
    "outbox_fail": "0001_functions.sql",
    "outbox_rescue_expired": "0001_functions.sql",
    "outbox_hand_back": "0001_functions.sql",
    "outbox_complete_many": "0001_functions.sql",
    "outbox_next_deadline": "0002_claim_planning.sql",
}
# 0002 turned JIT off on these with ALTER FUNCTION, which a CREATE OR REPLACE undoes.
JIT_OFF = ("outbox_fail", "outbox_rescue_expired", "outbox_hand_back", "outbox_complete_many")


def upgrade() -> None:
    run_sql_file("0003_edges.sql")


def downgrade() -> None:
    for function, file in RESTORED.items():
        run_sql(function_definition(file, function))
    for function in JIT_OFF:
        run_sql(f"ALTER FUNCTION {function} SET jit = off")
    run_sql_file("0003_downgrade.sql")
    # After the triggers that read them are back to 0001's.
    run_sql("DROP FUNCTION IF EXISTS outbox_variant_write_refusal, outbox_job_write_refusal, "
            "outbox_job_past_fan_in, outbox_last_job_stage, outbox_is_stage")
    run_sql("ALTER TABLE jobs DROP COLUMN IF EXISTS variants_closed_at, DROP COLUMN IF EXISTS expected_variants")
