"""The head schema as one readable file, alembic/sql/current.sql: every function, trigger, index
and constraint the migrations leave behind, as PostgreSQL itself prints them, each table's columns
and the stage graph's rows. A newcomer reads outbox_claim there once instead of following it through 0001..0003, and
tests/test_schema_reference.py fails when the migrations and the file disagree.

    .venv/bin/python -m outbox.schema_reference --write   # after changing a migration
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg
from psycopg.rows import tuple_row

REFERENCE = Path(__file__).resolve().parent.parent / "alembic" / "sql" / "current.sql"
HEADER = """-- The head schema, printed from a migrated database by outbox/schema_reference.py.
-- Generated: edit the migrations (alembic/sql/, alembic/versions/), then run
--     .venv/bin/python -m outbox.schema_reference --write
-- tests/test_schema_reference.py checks that the migrations build exactly this.
"""

TABLES = """
SELECT c.relname AS table_name, a.attname AS column_name, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS default_value
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname <> 'alembic_version'
ORDER BY c.relname, a.attnum
"""
CONSTRAINTS = """
SELECT con.conrelid::regclass::text AS table_name, con.conname AS name, pg_get_constraintdef(con.oid) AS definition,
       con.convalidated AS validated
FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
WHERE n.nspname = 'public' AND con.contype IN ('c', 'f', 'p', 'u', 'x') AND con.conrelid <> 0
  AND con.conrelid::regclass::text <> 'alembic_version'
ORDER BY 1, 2
"""
INDEXES = """
SELECT pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND i.indrelid::regclass::text <> 'alembic_version'
ORDER BY c.relname
"""
FUNCTIONS = """
SELECT pg_get_functiondef(p.oid) AS definition
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = 'public' AND p.prokind IN ('f', 'p')
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid)
"""
GRAPH = """
SELECT format('INSERT INTO stage_graph VALUES (%L, %L, %L, %L, %s, %s, %s);',
              stage, level, after_step, device, max_attempts, timeout_s, position)
FROM stage_graph ORDER BY position
"""
TRIGGERS = """
SELECT pg_get_triggerdef(t.oid) AS definition
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND NOT t.tgisinternal
ORDER BY c.relname, t.tgname
"""


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000


def reference_major() -> int | None:
    for line in REFERENCE.read_text().splitlines()[:8]:
        if line.startswith("-- Printed by PostgreSQL "):
            return int(line.split()[4])
    return None


def dump(conn: psycopg.Connection) -> str:
    """The reference text of the database `conn` is connected to."""
    cur = conn.cursor(row_factory=tuple_row)  # whatever row factory the caller's connection has
    out = [HEADER, f"-- Printed by PostgreSQL {server_major(conn)} (another major version may print some definitions differently).\n"]
    out.append("\n-- ================================================================ tables\n")
    table = None
    for name, column, type_, not_null, default in cur.execute(TABLES).fetchall():
        if name != table:
            out.append(f"\n-- {name}\n")
            table = name
        out.append(f"--   {column} {type_}{' NOT NULL' if not_null else ''}"
                   f"{' DEFAULT ' + default if default else ''}\n")
    out.append("\n-- ================================================================ the stage graph (data)\n")
    out.extend(f"{row};\n".replace(";;", ";") for (row,) in cur.execute(GRAPH).fetchall())
    out.append("\n-- ================================================================ constraints\n")
    for name, constraint, definition, validated in cur.execute(CONSTRAINTS).fetchall():
        out.append(f"ALTER TABLE {name} ADD CONSTRAINT {constraint} {definition}"
                   f"{'' if validated else ' NOT VALID'};\n")
    out.append("\n-- ================================================================ indexes\n")
    out.extend(f"{definition};\n" for (definition,) in cur.execute(INDEXES).fetchall())
    out.append("\n-- ================================================================ functions\n")
    out.extend(f"\n{definition.strip()};\n" for (definition,) in cur.execute(FUNCTIONS).fetchall())
    out.append("\n-- ================================================================ triggers\n")
    out.extend(f"{definition};\n" for (definition,) in cur.execute(TRIGGERS).fetchall())
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="migrate a scratch embedded database and write the file")
    parser.add_argument("--url", help="print the reference of this (migrated) database instead")
    args = parser.parse_args(argv)
    if args.url:
        with psycopg.connect(args.url) as conn:
            sys.stdout.write(dump(conn))
        return 0
    if not args.write:
        parser.error("give --write or --url")
    import tempfile

    from outbox import migrate
    from outbox.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory() as scratch:
        server = EmbeddedPostgres(Path(scratch) / "data", fast=True)
        server.start()
        try:
            migrate.upgrade(server.url)
            with psycopg.connect(server.url) as conn:
                REFERENCE.write_text(dump(conn))
        finally:
            server.stop()
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
