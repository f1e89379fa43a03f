"""Schema migrations through Alembic, on a given URL."""
from __future__ import annotations

from functools import lru_cache

from alembic import command
from alembic.config import Config

from outbox.config import PROJECT_ROOT

SQL_DIR = PROJECT_ROOT / "alembic" / "sql"


def alembic_config(url: str) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def run_sql(sql: str) -> None:
    """Run SQL text inside the current migration. Straight to psycopg, without parameters: the
    files hold PL/pgSQL with '%' in format() strings, which SQLAlchemy or a parameterised execute
    would try to interpret."""
    from alembic import op

    op.get_bind().connection.driver_connection.execute(sql)


def run_sql_file(name: str) -> None:
    run_sql((SQL_DIR / name).read_text())


def function_definition(file: str, function: str) -> str:
    """One function's CREATE statement, taken from a migration's SQL file and made
    CREATE OR REPLACE: a downgrade restores the definition an older migration shipped without
    keeping a second copy of it."""
    text = (SQL_DIR / file).read_text()
    for opening in (f"CREATE FUNCTION {function}(", f"CREATE OR REPLACE FUNCTION {function}("):
        if opening in text:
            start = text.index(opening) + len(opening) - len(f"FUNCTION {function}(")
            break
    else:
        raise KeyError(f"{file} defines no function {function}")
    body = text.index("$$", start) + 2
    end = text.index("$$;", body) + len("$$;")
    return "CREATE OR REPLACE " + text[start:end]


# The revision(s) the database is at: first whether it was ever migrated, then the rows.
HAS_SCHEMA = "SELECT to_regclass('alembic_version') IS NOT NULL AND to_regclass('stage_tasks') IS NOT NULL AS ok"
CURRENT_REVISIONS = "SELECT version_num FROM alembic_version"


@lru_cache(maxsize=1)
def script_revisions() -> tuple[frozenset[str], frozenset[str]]:
    """(heads, every revision) of the migrations this code ships, read from alembic/versions."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("postgresql://localhost/unused"))
    return frozenset(script.get_heads()), frozenset(s.revision for s in script.walk_revisions())


def schema_state(current: set[str] | frozenset[str]) -> str:
    """'missing' (never migrated), 'behind' (an older revision this code knows: run `db upgrade`),
    'head' (what this code expects), or 'ahead' (a revision this code does not know: a newer
    release migrated first, which expand-only migrations keep working for the older workers)."""
    heads, known = script_revisions()
    if not current:
        return "missing"
    if set(current) == set(heads):
        return "head"
    return "behind" if set(current) <= known else "ahead"


def check_schema(url: str) -> tuple[str, list[str], list[str]]:
    """(state, current revisions, head revisions) of the database at `url`."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        migrated = conn.execute(HAS_SCHEMA).fetchone()[0]
        current = sorted(r[0] for r in conn.execute(CURRENT_REVISIONS).fetchall()) if migrated else []
    heads, _ = script_revisions()
    return schema_state(set(current)), current, sorted(heads)
