"""The stage graph (the stage_graph table: migrations 0001 and later), read once per process and
database. Every Python reader asks here: the worker's start check, the CLI's stage arguments,
run-stage, the report, terminal progress and the console. The SQL functions read the table
themselves (outbox_last_variant_stage, outbox_last_job_stage, outbox_is_stage)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from psycopg import Connection

GRAPH = "SELECT stage, level, after_step, device, max_attempts, timeout_s FROM stage_graph ORDER BY position"


class UnknownStage(ValueError):
    """A stage the graph does not have; its message lists those it does."""


@dataclass(frozen=True)
class Stage:
    name: str
    level: str  # 'variant' or 'job'
    after_step: str
    device: str
    max_attempts: int
    timeout_s: int


@dataclass(frozen=True)
class StageGraph:
    stages: tuple[Stage, ...]  # pipeline order

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "StageGraph":
        return cls(tuple(Stage(r["stage"], r["level"], r["after_step"], r["device"], r["max_attempts"],
                               r["timeout_s"]) for r in rows))

    def names(self, level: str | None = None) -> list[str]:
        return [s.name for s in self.stages if level is None or s.level == level]

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.stages)

    def get(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise UnknownStage(f"unknown stage {name!r}; stages are: {', '.join(self.names())}")

    def last(self, level: str) -> str:
        """The stage of `level` no other stage of that level follows: the variant part's end, or
        the job's (the rule of outbox_last_variant_stage and outbox_last_job_stage)."""
        names = self.names(level)
        follows = {s.after_step for s in self.stages if s.level == level}
        [last] = [n for n in names if n not in follows]
        return last

    def rows(self) -> list[dict]:
        """As the table's rows (stage, level, ...): what the report's and console's data carry."""
        return [{"stage": s.name, "level": s.level, "after_step": s.after_step, "device": s.device,
                 "max_attempts": s.max_attempts, "timeout_s": s.timeout_s} for s in self.stages]


# Keyed by the database (host, port, name): tests open many databases in one process, each
# cloned from the same template. The graph changes only with a migration, which a running
# process does not pick up for its stages either. Written under _lock by whichever thread reads
# a database first.
_cache: dict[tuple, StageGraph] = {}
_lock = threading.Lock()


def _key(conn) -> tuple:
    info = conn.info
    return (info.host, info.port, info.dbname)


def _cached(conn) -> StageGraph | None:
    with _lock:
        return _cache.get(_key(conn))


def _keep(conn, rows: list[dict]) -> StageGraph:
    graph = StageGraph.from_rows(rows)
    if graph.stages:  # an empty table is a database being migrated: ask again next time
        with _lock:
            _cache[_key(conn)] = graph
    return graph


def read(conn: Connection) -> StageGraph:
    return _cached(conn) or _keep(conn, conn.execute(GRAPH).fetchall())


async def read_async(conn) -> StageGraph:
    """read() for the worker's async connections (the same cache)."""
    return _cached(conn) or _keep(conn, await (await conn.execute(GRAPH)).fetchall())
