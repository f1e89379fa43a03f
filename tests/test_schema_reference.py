"""The migrations build exactly the head schema written in alembic/sql/current.sql (functions,
triggers, indexes, constraints, columns, the stage graph), as procrastinate checks its schema.sql:
a migration changed without the reference, or the reference edited by hand, fails here."""
from __future__ import annotations

import difflib

import pytest

from outbox import schema_reference


def test_the_migrated_database_matches_the_reference_file(conn):
    if schema_reference.server_major(conn) != schema_reference.reference_major():
        pytest.skip(f"the reference was printed by PostgreSQL {schema_reference.reference_major()}, this server is "
                    f"{schema_reference.server_major(conn)}: definitions may print differently (PG_BIN_DIR?)")
    expected = schema_reference.REFERENCE.read_text()
    actual = schema_reference.dump(conn)
    diff = "".join(difflib.unified_diff(expected.splitlines(True), actual.splitlines(True),
                                        "alembic/sql/current.sql", "migrated database", n=2))
    assert not diff, ("the migrations and alembic/sql/current.sql disagree; if the migration is right, run "
                      "`.venv/bin/python -m outbox.schema_reference --write`\n" + diff[:6000])


def test_the_reference_holds_the_engine_s_entry_points(conn):
    """The file a newcomer reads: the claim, the fenced completion, the fan-in and the triggers
    that enqueue, each in its head definition."""
    text = schema_reference.REFERENCE.read_text()
    for name in ("FUNCTION public.outbox_claim_v2(", "FUNCTION public.outbox_claim(", "FUNCTION public.outbox_complete_many(",
                 "FUNCTION public.outbox_fan_in(", "CREATE TRIGGER", "INSERT INTO stage_graph VALUES ('vlm_analyze'"):
        assert name in text, name
    assert text.count("CREATE OR REPLACE FUNCTION public.outbox_claim_v2(") == 1
