#!/usr/bin/env python3
"""Where a hop's time goes: the latency workload of the peer harness (one job of three variants
at a time, no-op stages) with the worker's per-step time stamps (workers/trace.py).

For each enqueue hop (an outside writer's COMMIT to the first stage's entry) it splits the time
into: the notification heard by the worker that claimed (from COMMIT sent), the claim, the stage
thread starting, and the stage's entry; and, apart, when the COMMIT returned to the writer (with
several workers it often returns after the notification was heard: the woken processes take
the writer's backend's CPU). For each hop that rides on a completion (the variant chain): the
completing transaction's start (the next task's `created_at`, an upper bound) to the completion's
rows back in the worker, the stage thread starting, and the stage's entry. Durable PostgreSQL
settings, as the harness.

    .venv/bin/python bench/hop_profile.py [--workers 4] [--jobs 60] [--pg-bin DIR]

Wall-clock figures on a shared 2-core machine move by a millisecond between runs: compare
settings in one run, several times, and read medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_throughput import CONCURRENCY, VARIANTS, start_workers, stop_workers, wait_until  # noqa: E402
from outbox import migrate  # noqa: E402
from outbox.embedded import EmbeddedPostgres  # noqa: E402
from workers import trace as worker_trace  # noqa: E402

ENQUEUE_STEPS = ("to heard", "to claimed", "to thread", "to stage", "total", "(COMMIT returned)")
CHAIN_STEPS = ("to completion back", "to thread", "to stage", "total")


def run(workers: int, jobs: int, work: Path, server: EmbeddedPostgres) -> tuple[list[dict], list[dict]]:
    admin = psycopg.connect(server.url, autocommit=True)
    admin.execute("DROP DATABASE IF EXISTS bench_hops WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_hops")
    url = server.url.rsplit("/", 1)[0] + "/bench_hops"
    migrate.upgrade(url)
    home = work / "home"
    (home / "assets").mkdir(parents=True)
    (home / "assets" / "img.png").write_bytes(b"\x89PNG bench")
    trace_dir = work / "trace"
    trace_dir.mkdir()
    env = {**os.environ, "DATABASE_URL": url, "ADFLOW_HOME": str(home), "LOG_LEVEL": "INFO",
           "ADFLOW_TRACE_DIR": str(trace_dir)}
    conn = psycopg.connect(url, autocommit=True)
    asset = conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES ('bench', 'file:img.png') "
                         "RETURNING image_asset_id").fetchone()[0]
    argv = lambda i: [sys.executable, "-m", "workers", "start", "--registry", "bench.noop_stages:build_registry",
                      "--concurrency", str(CONCURRENCY)]
    log_dir = work / "logs"
    log_dir.mkdir()
    procs = start_workers(argv, workers, env, log_dir, "LISTEN started")
    commits: dict[str, tuple[float, float]] = {}
    try:
        time.sleep(1.0)
        for _ in range(jobs):
            # As the harness's adapter: the job, its input and its variants at (img_gen, done) in
            # one outside transaction, on a new connection.
            with psycopg.connect(url) as c:
                job = c.execute("""
                    WITH j AS (INSERT INTO jobs (tenant_id, status, current_step)
                               VALUES ('bench', 'running', 'img_gen') RETURNING job_id),
                         i AS (INSERT INTO job_inputs (job_id, ad_copy) SELECT job_id, 'x' FROM j)
                    INSERT INTO jobs_variants (job_id, img_asset_id, creation_order, status, current_step)
                    SELECT j.job_id, %s, v, 'done', 'img_gen' FROM j, generate_series(1, %s) v
                    RETURNING job_id""", (asset, VARIANTS)).fetchone()[0]
                sent = time.time()
                c.commit()
                commits[str(job)] = (sent, time.time())
            wait_until(conn, f"SELECT count(*) FROM jobs WHERE job_id = '{job}' AND current_step = 'instagram_feed_gen' "
                             "AND status = 'done'", 1)
            time.sleep(0.1)
    finally:
        stop_workers(procs)
    rows = conn.execute("""
        SELECT t.id, t.job_id::text, t.stage, extract(epoch FROM t.created_at)::float8,
               (r.result->>'started_at')::float8
        FROM stage_tasks t JOIN stage_results r ON r.task_id = t.id WHERE t.job_variants_id IS NOT NULL""").fetchall()
    conn.close()
    admin.close()
    trace = worker_trace.read(trace_dir)
    enqueue, chain = [], []
    for task_id, job, stage, created, started in rows:
        thread = trace.at.get(("thread", task_id))
        if thread is None:
            continue
        if stage == "vlm_analyze":
            claimed, pid = trace.at.get(("claimed", task_id)), trace.claimer.get(task_id)
            if claimed is None:
                continue
            sent, back = commits[job]
            heard = min((t for t in trace.heard.get(pid, []) if sent - 0.001 <= t <= claimed), default=None)
            if heard is None:
                continue
            enqueue.append({"(COMMIT returned)": back - sent, "to heard": heard - sent, "to claimed": claimed - heard,
                            "to thread": thread - claimed, "to stage": started - thread, "total": started - sent})
        else:
            rode = trace.at.get(("rode", task_id))
            if rode is None:
                continue  # claimed by a dispatcher after a notification, not on a completion
            chain.append({"to completion back": rode - created, "to thread": thread - rode,
                          "to stage": started - thread, "total": started - created})
    return enqueue, chain


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def table(title: str, rows: list[dict], steps: tuple[str, ...]) -> None:
    print(f"\n{title} ({len(rows)} hops, ms)\n")
    print("| step | p50 | p90 | p99 |")
    print("|---|---|---|---|")
    for step in steps:
        xs = [r[step] * 1000 for r in rows]
        if xs:
            print(f"| {step} | {pct(xs, 50):.2f} | {pct(xs, 90):.2f} | {pct(xs, 99):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin" if Path("/usr/lib/postgresql/15/bin").is_dir() else None)
    args = parser.parse_args()
    if args.pg_bin:
        os.environ["PG_BIN_DIR"] = args.pg_bin
    work = Path(tempfile.mkdtemp(prefix="hop-profile-"))
    server = EmbeddedPostgres(work / "data", settings={"max_connections": "300"})
    server.start()
    try:
        version = psycopg.connect(server.url).execute("SHOW server_version").fetchone()[0]
        enqueue, chain = run(args.workers, args.jobs, work, server)
    finally:
        server.stop()
    print(f"PostgreSQL {version}, durable settings, {args.workers} worker processes x {CONCURRENCY}, "
          f"{args.jobs} jobs x {VARIANTS} variants one at a time")
    table("Enqueue to first stage, from the outside COMMIT sent", enqueue, ENQUEUE_STEPS)
    table("Variant chain, from the completing transaction's start", chain, CHAIN_STEPS)
    print("\nmedian step shares of the enqueue hop: " + ", ".join(
        f"{s} {statistics.median(r[s] for r in enqueue) / statistics.median(r['total'] for r in enqueue):.0%}"
        for s in ENQUEUE_STEPS[:4]))


if __name__ == "__main__":
    main()
