"""The stage graph as Python reads it (outbox/graph.py): once per database, and the same rules as
the SQL functions."""
from __future__ import annotations

import pytest

from outbox import graph


def test_the_graph_is_read_once_per_database_and_agrees_with_the_sql_rules(conn):
    first = graph.read(conn)
    assert graph.read(conn) is first  # from the cache: no second query
    assert first.names() == [r["stage"] for r in conn.execute("SELECT stage FROM stage_graph ORDER BY position")]
    assert first.last("variant") == conn.execute("SELECT outbox_last_variant_stage() AS s").fetchone()["s"]
    assert first.last("job") == conn.execute("SELECT outbox_last_job_stage() AS s").fetchone()["s"]
    assert first.get("planner").level == "variant" and first.get("ad_copy_gen_kor").level == "job"
    assert "planner" in first and "img_gen" not in first
    with pytest.raises(graph.UnknownStage, match="unknown stage 'nope'; stages are: vlm_analyze, "):
        first.get("nope")
