"""The same chain with procrastinate 3.10, written the way its users would: one task per stage,
each marks its variant in the application's table and defers the next; the last variant stage
counts the job's variants under a lock on the job row and defers the job stages.

Run as a worker: PROCRASTINATE_BENCH_URL=... python -m bench.procrastinate_chain CONCURRENCY
"""
from __future__ import annotations

import os
import sys
import time

import procrastinate
from psycopg_pool import AsyncConnectionPool

VARIANT_STAGES = ("vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
                  "iou_eval")
APP_SCHEMA = """
CREATE TABLE IF NOT EXISTS pb_jobs (job_id bigint PRIMARY KEY, status text NOT NULL DEFAULT 'running',
                                    current_step text);
CREATE TABLE IF NOT EXISTS pb_variants (variant_id bigint PRIMARY KEY, job_id bigint NOT NULL REFERENCES pb_jobs,
                                        status text NOT NULL, current_step text NOT NULL);
CREATE TABLE IF NOT EXISTS pb_starts (variant_id bigint, stage text, started_at double precision);
"""

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("PROCRASTINATE_BENCH_URL", "")))
pool: AsyncConnectionPool | None = None


async def set_variant(variant_id: int, stage: str, status: str) -> None:
    async with pool.connection() as conn:
        await conn.execute("UPDATE pb_variants SET current_step = %s, status = %s WHERE variant_id = %s",
                           (stage, status, variant_id))


def variant_task(stage: str, next_stage: str | None):
    @app.task(name=stage)
    async def run(variant_id: int) -> None:
        if stage == "vlm_analyze":
            async with pool.connection() as conn:
                await conn.execute("INSERT INTO pb_starts VALUES (%s, %s, %s)", (variant_id, stage, time.time()))
        await set_variant(variant_id, stage, "running")
        if next_stage:
            await set_variant(variant_id, stage, "done")
            await app.tasks[next_stage].defer_async(variant_id=variant_id)
            return
        async with pool.connection() as conn:
            async with conn.transaction():
                job = await (await conn.execute(
                    "SELECT j.job_id FROM pb_jobs j JOIN pb_variants v ON v.job_id = j.job_id "
                    "WHERE v.variant_id = %s FOR UPDATE OF j", (variant_id,))).fetchone()
                await conn.execute("UPDATE pb_variants SET current_step = %s, status = 'done' WHERE variant_id = %s",
                                   (stage, variant_id))
                left = await (await conn.execute(
                    "SELECT count(*) FROM pb_variants WHERE job_id = %s AND NOT (current_step = %s AND status = 'done')",
                    (job[0], stage))).fetchone()
        if left[0] == 0:
            await app.tasks["ad_copy_gen_kor"].defer_async(job_id=job[0])

    return run


for i, name in enumerate(VARIANT_STAGES):
    variant_task(name, VARIANT_STAGES[i + 1] if i + 1 < len(VARIANT_STAGES) else None)


@app.task(name="ad_copy_gen_kor")
async def ad_copy_gen_kor(job_id: int) -> None:
    async with pool.connection() as conn:
        await conn.execute("UPDATE pb_jobs SET current_step = 'ad_copy_gen_kor', status = 'done' WHERE job_id = %s",
                           (job_id,))
    await app.tasks["instagram_feed_gen"].defer_async(job_id=job_id)


@app.task(name="instagram_feed_gen")
async def instagram_feed_gen(job_id: int) -> None:
    async with pool.connection() as conn:
        await conn.execute("UPDATE pb_jobs SET current_step = 'instagram_feed_gen', status = 'done' WHERE job_id = %s",
                           (job_id,))


async def main(concurrency: int) -> None:
    global pool
    url = os.environ["PROCRASTINATE_BENCH_URL"]
    pool = AsyncConnectionPool(url, min_size=1, max_size=concurrency + 1, kwargs={"autocommit": True}, open=False)
    await pool.open()
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency)


if __name__ == "__main__":
    import asyncio

    asyncio.run(main(int(sys.argv[1])))
