"""The migrations build exactly the schema outbox/schema.py describes, and downgrade cleanly."""
from __future__ import annotations

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from outbox import db, migrate, schema


def test_migrated_schema_matches_the_declared_tables(db_url):
    engine = create_engine(db.sqlalchemy_url(db_url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), schema.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_to_base_and_upgrade_again(empty_db_url):
    url = empty_db_url
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    with psycopg.connect(url) as conn:
        left = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'").fetchone()[0]
        funcs = conn.execute("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                             "WHERE n.nspname = 'public'").fetchone()[0]
    assert left == 0 and funcs == 0
    migrate.upgrade(url)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM stage_graph").fetchone()[0] == 10


def test_stage_graph_is_one_chain_per_level(conn):
    graph = conn.execute("SELECT stage, level, after_step FROM stage_graph ORDER BY position").fetchall()
    variant = [g for g in graph if g["level"] == "variant"]
    job = [g for g in graph if g["level"] == "job"]
    for chain, first in ((variant, "img_gen"), (job, "iou_eval")):
        assert chain[0]["after_step"] == first
        for prev, nxt in zip(chain, chain[1:]):
            assert nxt["after_step"] == prev["stage"]
