"""Tables, indexes, the stage graph, trigger functions and outbox operations.

Revision ID: 0001
Revises:
"""
from pathlib import Path

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def run_sql_file(name: str) -> None:
    # Straight to psycopg, without parameters: the files hold PL/pgSQL with '%' in format()
    # strings, which SQLAlchemy or a parameterised execute would try to interpret.
    op.get_bind().connection.driver_connection.execute((SQL_DIR / name).read_text())


def upgrade() -> None:
    run_sql_file("0001_schema.sql")
    run_sql_file("0001_functions.sql")


def downgrade() -> None:
    run_sql_file("0001_downgrade.sql")
