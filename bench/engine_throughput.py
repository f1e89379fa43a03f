#!/usr/bin/env python3
"""Engine benchmark: adflow against procrastinate 3.10 on the same chain, in the same run.

Workload (shared/TARGETS.md): N jobs x 3 variants, 8 variant stages, fan-in, 2 job stages = 26
stage executions per job, no-op stages, 4 worker processes x 8 concurrent slots, durable
PostgreSQL settings (fsync and synchronous_commit on). Measures stage executions per second,
commit-to-start latency (one job at a time: an outside commit of (img_gen, done) to the first
stage starting) and statements per second while idle (pg_stat_statements).

    .venv/bin/python bench/engine_throughput.py [--jobs 200] [--rounds 3] [--pg-bin DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from outbox import migrate  # noqa: E402
from outbox.embedded import EmbeddedPostgres  # noqa: E402
from workers import launch  # noqa: E402

PROCESSES, CONCURRENCY, VARIANTS = int(os.environ.get("BENCH_PROCESSES", 4)), 8, 3
LATENCY_JOBS = 30  # as the peer harness: 30 jobs one at a time, 780 hops
EXECUTIONS_PER_JOB = VARIANTS * 8 + 2


def start_workers(argv_for, count, env, log_dir: Path, ready_text: str | None):
    procs = []
    for i in range(count):
        log = open(log_dir / f"worker{i}.log", "wb")
        procs.append((launch.spawn(argv_for(i), env, log), log))
    if ready_text:
        deadline = time.monotonic() + 60
        while sum(ready_text in (log_dir / f"worker{i}.log").read_text(errors="replace") for i in range(count)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready; see {log_dir}")
            time.sleep(0.05)
    else:
        time.sleep(3)
    return procs


def stop_workers(procs):
    for proc, _ in procs:
        proc.terminate()
    for proc, log in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_until(conn, sql, target, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        if conn.execute(sql).fetchone()[0] >= target:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {sql}")
        time.sleep(0.01)


def idle_statements_per_s(admin, dbname, window=20.0, settle=35.0):
    """Statements the database runs while its workers sit idle, counted by pg_stat_statements
    (exact, per statement). pg_stat_database's transaction counter is no use here: backends that
    were busy report their counts late, whenever they next wake, so a quiet window shows the load
    before it. Settle first: an adflow worker may wake once at the lease expiry of a task it saw
    running elsewhere (30 s leases)."""
    time.sleep(settle)
    sql = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
           "WHERE d.datname = %s")
    before = admin.execute(sql, (dbname,)).fetchone()[0]
    time.sleep(window)
    after = admin.execute(sql, (dbname,)).fetchone()[0]
    return float(after - before) / window


# ------------------------------------------------------------------------------- adflow
def adflow_insert_jobs(conn, count, variants, asset_id):
    with conn.transaction():
        conn.execute("""
            WITH j AS (INSERT INTO jobs (tenant_id, status, current_step)
                       SELECT 'bench', 'running', 'img_gen' FROM generate_series(1, %s) RETURNING job_id),
                 i AS (INSERT INTO job_inputs (job_id, ad_copy) SELECT job_id, 'Benchmark copy' FROM j)
            INSERT INTO jobs_variants (job_id, img_asset_id, creation_order, status, current_step)
            SELECT j.job_id, %s, n, 'done', 'img_gen' FROM j, generate_series(1, %s) n""", (count, asset_id, variants))


def adflow_round(server, jobs, log_dir):
    admin = psycopg.connect(server.url, autocommit=True)
    admin.execute("DROP DATABASE IF EXISTS bench_adflow WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_adflow")
    url = server.url.rsplit("/", 1)[0] + "/bench_adflow"
    migrate.upgrade(url)
    home = Path(tempfile.mkdtemp(prefix="adflow-bench-"))
    (home / "assets").mkdir()
    (home / "assets" / "img.png").write_bytes(b"\x89PNG bench")
    env = {**os.environ, "DATABASE_URL": url, "ADFLOW_HOME": str(home), "LOG_LEVEL": "WARNING"}
    conn = psycopg.connect(url, autocommit=True)
    asset = conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES ('bench', 'file:img.png') "
                         "RETURNING image_asset_id").fetchone()[0]
    argv = lambda i: [sys.executable, "-m", "workers", "start", "--registry", "bench.noop_stages:build_registry",
                      "--concurrency", str(CONCURRENCY)]
    env_ready = {**env, "LOG_LEVEL": "INFO"}
    procs = start_workers(argv, PROCESSES, env_ready, log_dir, "LISTEN started")
    try:
        # latency: one job of three variants at a time, every hop timed (as the shared peer harness
        # does): from the enqueuing transaction's start (stage_tasks.created_at, now() of the
        # transaction whose trigger wrote the task: an upper bound, it includes that commit) to the
        # stage's entry. The first hop is also timed from the outside COMMIT's return, as before.
        latencies, latency_jobs = [], []
        for _ in range(LATENCY_JOBS):
            job = conn.execute("INSERT INTO jobs (tenant_id, status, current_step, expected_variants) "
                               "VALUES ('bench', 'running', 'img_gen', %s) RETURNING job_id", (VARIANTS,)).fetchone()[0]
            conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'x')", (job,))
            conn.execute("INSERT INTO jobs_variants (job_id, img_asset_id, creation_order, status, current_step) "
                         "SELECT %s, %s, v, 'running', 'img_gen' FROM generate_series(1, %s) v", (job, asset, VARIANTS))
            conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id = %s", (job,))
            committed = time.time()
            wait_until(conn, f"SELECT count(*) FROM jobs WHERE job_id = '{job}' AND current_step = 'instagram_feed_gen' "
                             "AND status = 'done'", 1)
            started = conn.execute("SELECT min((result->>'started_at')::float) FROM stage_results WHERE job_id = %s "
                                   "AND stage = 'vlm_analyze'", (job,)).fetchone()[0]
            latencies.append((started - committed) * 1000)
            latency_jobs.append(job)
        hops = hop_latencies(conn, latency_jobs)
        base = conn.execute("SELECT count(*) FROM jobs WHERE current_step = 'instagram_feed_gen' AND status = 'done'").fetchone()[0]
        t0 = time.perf_counter()
        adflow_insert_jobs(conn, jobs, VARIANTS, asset)
        t1 = wait_until(conn, "SELECT count(*) FROM jobs WHERE current_step = 'instagram_feed_gen' AND status = 'done'",
                        base + jobs)
        executions = conn.execute("SELECT count(*) FROM stage_results").fetchone()[0] - LATENCY_JOBS * EXECUTIONS_PER_JOB
        assert executions == jobs * EXECUTIONS_PER_JOB, executions
        idle = idle_statements_per_s(admin, "bench_adflow")
    finally:
        stop_workers(procs)
        conn.close()
        admin.close()
    return {"throughput": executions / (t1 - t0), "latencies": latencies, "hops": hops, "idle": idle}


HOP_KINDS = {"vlm_analyze": "enqueue to first stage", "ad_copy_gen_kor": "fan-in to job",
             "instagram_feed_gen": "job chain"}


def hop_latencies(conn, jobs) -> dict[str, list[float]]:
    """ms per hop kind (and "every hop"), from the enqueuing transaction's start to the stage's entry."""
    rows = conn.execute("""
        SELECT t.stage, (r.result->>'started_at')::float8 - extract(epoch FROM t.created_at) AS s
        FROM stage_results r JOIN stage_tasks t ON t.id = r.task_id
        WHERE t.job_id = ANY (%s)""", (jobs,)).fetchall()
    out: dict[str, list[float]] = {"every hop": []}
    for stage, seconds in rows:
        out.setdefault(HOP_KINDS.get(stage, "variant chain"), []).append(seconds * 1000)
        out["every hop"].append(seconds * 1000)
    return out


# ------------------------------------------------------------------------------- procrastinate
def procrastinate_round(server, jobs, log_dir):
    admin = psycopg.connect(server.url, autocommit=True)
    admin.execute("DROP DATABASE IF EXISTS bench_procrastinate WITH (FORCE)")
    admin.execute("CREATE DATABASE bench_procrastinate")
    url = server.url.rsplit("/", 1)[0] + "/bench_procrastinate"
    os.environ["PROCRASTINATE_BENCH_URL"] = url
    from bench import procrastinate_chain as chain

    conn = psycopg.connect(url, autocommit=True)
    conn.execute(chain.APP_SCHEMA)

    async def setup_and_defer(job_ids, variant_ids):
        async with chain.app.open_async():
            if not job_ids:
                await chain.app.schema_manager.apply_schema_async()
                return
            await chain.app.tasks["vlm_analyze"].batch_defer_async(*({"variant_id": v} for v in variant_ids))

    asyncio.run(setup_and_defer([], []))
    env = {**os.environ, "PROCRASTINATE_BENCH_URL": url}
    argv = lambda i: [sys.executable, "-m", "bench.procrastinate_chain", str(CONCURRENCY)]
    procs = start_workers(argv, PROCESSES, env, log_dir, None)

    async def one_defer(variant_id):
        async with chain.app.open_async():
            await chain.app.tasks["vlm_analyze"].defer_async(variant_id=variant_id)
            return time.time()

    try:
        latencies, next_id = [], 1
        for _ in range(100):
            conn.execute("INSERT INTO pb_jobs (job_id) VALUES (%s)", (next_id,))
            conn.execute("INSERT INTO pb_variants VALUES (%s, %s, 'done', 'img_gen')", (next_id, next_id))
            committed = asyncio.run(one_defer(next_id))
            wait_until(conn, f"SELECT count(*) FROM pb_jobs WHERE job_id = {next_id} AND current_step = 'instagram_feed_gen'", 1)
            started = conn.execute("SELECT started_at FROM pb_starts WHERE variant_id = %s", (next_id,)).fetchone()[0]
            latencies.append((started - committed) * 1000)
            next_id += 1
        job_ids = list(range(next_id, next_id + jobs))
        with conn.transaction():
            conn.execute("INSERT INTO pb_jobs (job_id) SELECT generate_series(%s::bigint, %s::bigint)", (job_ids[0], job_ids[-1]))
            conn.execute("INSERT INTO pb_variants SELECT j * 10 + n, j, 'done', 'img_gen' "
                         "FROM generate_series(%s::bigint, %s::bigint) j, generate_series(1, %s) n", (job_ids[0], job_ids[-1], VARIANTS))
        variant_ids = [j * 10 + n for j in job_ids for n in range(1, VARIANTS + 1)]
        t0 = time.perf_counter()
        asyncio.run(setup_and_defer(job_ids, variant_ids))
        t1 = wait_until(conn, f"SELECT count(*) FROM pb_jobs WHERE job_id >= {job_ids[0]} AND current_step = 'instagram_feed_gen'",
                        jobs)
        idle = idle_statements_per_s(admin, "bench_procrastinate")
    finally:
        stop_workers(procs)
        conn.close()
        admin.close()
    return {"throughput": jobs * EXECUTIONS_PER_JOB / (t1 - t0), "latencies": latencies, "idle": idle}


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-bin", default="/usr/lib/postgresql/15/bin" if Path("/usr/lib/postgresql/15/bin").is_dir() else None)
    parser.add_argument("--skip-procrastinate", action="store_true")
    args = parser.parse_args()
    if args.pg_bin:
        os.environ["PG_BIN_DIR"] = args.pg_bin
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    server = EmbeddedPostgres(work / "data", settings={"max_connections": "300",
                                                       "shared_preload_libraries": "pg_stat_statements"})
    server.start()
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    version = psycopg.connect(server.url).execute("SHOW server_version").fetchone()[0]
    results = {"adflow": [], "procrastinate": []}
    try:
        for r in range(args.rounds):
            for name, fn in (("adflow", adflow_round), ("procrastinate", procrastinate_round)):
                if name == "procrastinate" and args.skip_procrastinate:
                    continue
                log_dir = work / f"{name}-{r}"
                log_dir.mkdir()
                res = fn(server, args.jobs, log_dir)
                results[name].append(res)
                print(f"round {r + 1} {name}: {res['throughput']:.0f} stage executions/s, "
                      f"p50 {pct(res['latencies'], 50):.2f} ms, p99 {pct(res['latencies'], 99):.2f} ms, "
                      f"idle {res['idle']:.2f} statements/s", flush=True)
    finally:
        server.stop()
    print(f"\nPostgreSQL {version}, durable settings, {args.jobs} jobs x {VARIANTS} variants "
          f"({EXECUTIONS_PER_JOB} stage executions per job), {PROCESSES} processes x {CONCURRENCY} slots, "
          f"medians of {args.rounds} round(s)\n")
    print("| implementation | stage executions/s | commit-to-start p50 / p99 | idle statements/s |")
    print("|---|---|---|---|")
    summary = {}
    for name, rounds in results.items():
        if not rounds:
            continue
        thr = statistics.median(r["throughput"] for r in rounds)
        p50 = statistics.median(pct(r["latencies"], 50) for r in rounds)
        p99 = statistics.median(pct(r["latencies"], 99) for r in rounds)
        idle = statistics.median(r["idle"] for r in rounds)
        summary[name] = thr
        print(f"| {name} | {thr:,.0f} | {p50:.2f} / {p99:.2f} ms | {idle:.2f} |")
    if results["adflow"]:
        print("\nadflow, every hop at low load (ms, upper bound from the enqueuing transaction's start; medians of rounds):\n")
        print("| hop kind | n | p50 | p99 |")
        print("|---|---|---|---|")
        for kind in ("every hop", "enqueue to first stage", "variant chain", "fan-in to job", "job chain"):
            per = [r["hops"].get(kind, []) for r in results["adflow"]]
            print(f"| {kind} | {sum(map(len, per))} | {statistics.median(pct(v, 50) for v in per):.2f} | "
                  f"{statistics.median(pct(v, 99) for v in per):.2f} |")
    if len(summary) == 2:
        print(f"\nadflow / procrastinate throughput: {summary['adflow'] / summary['procrastinate']:.2f}x")


if __name__ == "__main__":
    main()
