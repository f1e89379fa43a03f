#!/usr/bin/env python3
"""Claim throughput with 1 million finished task rows in stage_tasks against an empty table:
the partial index over claimable rows should keep the two within 10%.

Four connections claim vlm_analyze tasks 8 at a time through the real SQL functions until 20,000
queued tasks are gone: first claims alone (the issue's figure), then, with the same tasks queued
again, each claim followed by the batch's completion (which writes results and enqueues
yolo_detect, which nobody claims here). The finished rows carry their results, as in production.
Durable PostgreSQL settings. The rows of each kind belong to one job: that shape
once misled the planner into reading the whole queue per claim (migration 0002), so it stays the
hard case here.

    .venv/bin/python bench/claim_history.py [--history 1000000] [--queued 20000] [--rounds 5]
                                            [--shared-buffers 128MB]
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
    variants, and one task per (variant, stage) in `status`, with a result when it is done."""
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
    if status == "done":  # a finished task has its result, as in production
        conn.execute("""INSERT INTO stage_results (task_id, job_id, job_variants_id, stage, attempt, result)
                        SELECT id, job_id, job_variants_id, stage, 1, '{"ok": true}' FROM stage_tasks
                        WHERE job_id = %s""", (job,))
    conn.execute("RESET session_replication_role")


def claim_rate(url: str, queued: int, complete: bool) -> float:
    """Tasks per second that four connections get through until the queue is empty: claims
    alone, or each claim followed by the batch's completion."""
    done = [0]
    lock = threading.Lock()

    def claimer(i: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                rows = conn.execute("SELECT id, attempt FROM outbox_claim_v2(%s, %s, %s, 30, NULL) WHERE id IS NOT NULL",
                                    (f"bench{i}", ["vlm_analyze"], BATCH)).fetchall()
                if not rows:
                    return
                if complete:
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


def requeue_claimed(conn) -> None:
    """Puts the tasks the claim-only run took back in the queue, as they were, and vacuums, so
    the second run starts from the same table."""
    conn.execute("SET session_replication_role = replica")
    conn.execute("UPDATE stage_tasks SET status = 'queued', attempts = 0, lease_owner = NULL, lease_expires_at = NULL, "
                 "started_at = NULL WHERE status = 'running'")
    conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'img_gen' WHERE status = 'running'")
    conn.execute("RESET session_replication_role")
    conn.execute("VACUUM ANALYZE")


def round_trip(server, history: int, queued: int) -> dict[str, float]:
    """One round: for the empty table, then the one with history, claims alone and then claims
    with completions. Returns the four rates."""
    rates = {}
    for with_history in (False, True):
        admin = psycopg.connect(server.url, autocommit=True)
        admin.execute("DROP DATABASE IF EXISTS bench_claims WITH (FORCE)")
        admin.execute("CREATE DATABASE bench_claims")
        admin.close()
        url = server.url.rsplit("/", 1)[0] + "/bench_claims"
        migrate.upgrade(url)
        table = "history" if with_history else "empty"
        with psycopg.connect(url, autocommit=True) as conn:
            if with_history:
                stages = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval",
                          "readability_eval", "iou_eval"]
                load(conn, history // len(stages), "done", "iou_eval", stages)
            load(conn, queued, "queued", "img_gen", ["vlm_analyze"])
            conn.execute("VACUUM ANALYZE")
            total = conn.execute("SELECT count(*) FROM stage_tasks").fetchone()[0]
            rates[f"claim/{table}"] = claim_rate(url, queued, complete=False)
            requeue_claimed(conn)
            rates[f"cycle/{table}"] = claim_rate(url, queued, complete=True)
        print(f"  {total:>9,} task rows ({table}): {rates[f'claim/{table}']:,.0f} tasks claimed/s, "
              f"{rates[f'cycle/{table}']:,.0f} claimed+completed/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shared-buffers", default="128MB",
                        help="PostgreSQL's shared_buffers (its default, 128MB, unless given)")
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin" if Path("/usr/lib/postgresql/15/bin").is_dir() else None)
    args = parser.parse_args()
    if args.pg_bin:
        os.environ["PG_BIN_DIR"] = args.pg_bin
    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="bench-claims-")) / "data",
                              settings={"shared_buffers": args.shared_buffers})
    server.start()
    try:
        results = [round_trip(server, args.history, args.queued) for _ in range(args.rounds)]
    finally:
        server.stop()
    print(f"\n| tasks/s (median of {args.rounds} rounds) | {args.queued:,} queued only "
          f"| {args.queued:,} queued + {args.history:,} done | history / empty: median of the rounds' ratios (each round) |")
    print("|---|---|---|---|")
    for kind, label in (("claim", "claims alone"), ("cycle", "claim, then complete")):
        empty = statistics.median(r[f"{kind}/empty"] for r in results)
        full = statistics.median(r[f"{kind}/history"] for r in results)
        # Each round measures both tables back to back, so its ratio is the figure least
        # disturbed by whatever else the machine does between rounds.
        ratios = [r[f"{kind}/history"] / r[f"{kind}/empty"] for r in results]
        ratio = statistics.median(ratios)
        print(f"| {label} | {empty:,.0f} | {full:,.0f} | **{ratio:.2f}** ({(ratio - 1) * 100:+.1f}%; "
              f"{', '.join(f'{x:.2f}' for x in ratios)}) |")


if __name__ == "__main__":
    main()
