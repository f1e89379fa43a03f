#!/usr/bin/env python3
"""Claim throughput with 1 million finished task rows in stage_tasks against an empty table:
the partial index over claimable rows should keep the two within 10%.

Four connections claim vlm_analyze tasks 8 at a time and complete them through the real SQL
functions (the completion enqueues yolo_detect, which nobody claims here), until 20,000 queued
tasks are gone. Durable PostgreSQL settings. The rows of each kind belong to one job: that shape
once misled the planner into reading the whole queue per claim (migration 0002), so it stays the
hard case here.

    .venv/bin/python bench/claim_history.py [--history 1000000] [--queued 20000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outbox import migrate  # noqa: E402
from outbox.embedded import EmbeddedPostgres  # noqa: E402

CLAIMERS, BATCH = 4, 8


def load(conn, variants: int, status: str, step: str, stages: list[str]) -> None:
    """Bulk rows with the triggers off (session_replication_role = replica): one job, `variants`
    variants, and one task per (variant, stage) in `status`."""
    conn.execute("SET session_replication_role = replica")
    job = conn.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('bench', 'running', 'img_gen') "
                       "RETURNING job_id").fetchone()[0]
    conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'x')", (job,))
    conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                 "SELECT %s, n, 'done', %s FROM generate_series(1, %s) n", (job, step, variants))
    conn.execute("""INSERT INTO stage_tasks (job_id, job_variants_id, stage, status, attempts, max_attempts,
                                             started_at, finished_at)
                    SELECT v.job_id, v.job_variants_id, s, %s, CASE WHEN %s = 'done' THEN 1 ELSE 0 END, 3,
                           CASE WHEN %s = 'done' THEN now() END, CASE WHEN %s = 'done' THEN now() END
                    FROM jobs_variants v, unnest(%s::text[]) s
                    WHERE v.job_id = %s""", (status, status, status, status, stages, job))
    conn.execute("RESET session_replication_role")


def claim_rate(url: str, queued: int) -> float:
    done = [0]
    lock = threading.Lock()

    def claimer(i: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                rows = conn.execute("SELECT id, attempt FROM outbox_claim(%s, %s, %s, 30, NULL) WHERE id IS NOT NULL",
                                    (f"bench{i}", ["vlm_analyze"], BATCH)).fetchall()
                if not rows:
                    return
                items = Jsonb([{"id": r[0], "attempt": r[1], "result": {}} for r in rows])
                conn.execute("SELECT outbox_complete_many(%s, %s)", (f"bench{i}", items))
                with lock:
                    done[0] += len(rows)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(CLAIMERS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    assert done[0] == queued, done[0]
    return queued / elapsed


def round_trip(server, history: int, queued: int) -> tuple[float, float]:
    rates = []
    for with_history in (False, True):
        admin = psycopg.connect(server.url, autocommit=True)
        admin.execute("DROP DATABASE IF EXISTS bench_claims WITH (FORCE)")
        admin.execute("CREATE DATABASE bench_claims")
        admin.close()
        url = server.url.rsplit("/", 1)[0] + "/bench_claims"
        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            if with_history:
                stages = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval",
                          "readability_eval", "iou_eval"]
                load(conn, history // len(stages), "done", "iou_eval", stages)
            load(conn, queued, "queued", "img_gen", ["vlm_analyze"])
            conn.execute("VACUUM ANALYZE")
            total = conn.execute("SELECT count(*) FROM stage_tasks").fetchone()[0]
        rate = claim_rate(url, queued)
        print(f"  {total:>9,} task rows ({'with' if with_history else 'no'} history): {rate:,.0f} tasks claimed+completed/s",
              flush=True)
        rates.append(rate)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin" if Path("/usr/lib/postgresql/15/bin").is_dir() else None)
    args = parser.parse_args()
    if args.pg_bin:
        os.environ["PG_BIN_DIR"] = args.pg_bin
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bench-claims-")) / "data")
    server.start()
    try:
        results = [round_trip(server, args.history, args.queued) for _ in range(args.rounds)]
    finally:
        server.stop()
    empty = statistics.median(r[0] for r in results)
    full = statistics.median(r[1] for r in results)
    # Each round measures both tables back to back, so its ratio is the figure least disturbed
    # by whatever else the machine does between rounds.
    ratios = [r[1] / r[0] for r in results]
    ratio = statistics.median(ratios)
    print(f"\n| stage_tasks | claimed+completed tasks/s (median of {args.rounds}) |\n|---|---|")
    print(f"| {args.queued:,} queued only | {empty:,.0f} |")
    print(f"| {args.queued:,} queued + {args.history:,} done | {full:,.0f} |")
    print(f"\nwith history / empty, per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"median: {ratio:.2f} ({(ratio - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
