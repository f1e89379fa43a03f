"""Following a job live, driven by LISTEN on the old system's state channels, never by polling."""
from __future__ import annotations

import json
from typing import Iterator

from psycopg import Connection

from outbox.jobs import job_detail
from outbox.queue import JOB_CHANNEL, VARIANT_CHANNEL

FINAL_STATUSES = {"failed", "cancelled"}


def final_job_stage(conn: Connection) -> str:
    return conn.execute("""SELECT g.stage FROM stage_graph g WHERE g.level = 'job' AND NOT EXISTS
                           (SELECT 1 FROM stage_graph n WHERE n.level = 'job' AND n.after_step = g.stage)""").fetchone()["stage"]


def job_finished(job: dict, final_stage: str) -> bool:
    return job["status"] in FINAL_STATUSES or (job["status"] == "done" and job["current_step"] == final_stage)


def watch_job(conn: Connection, job_id: str) -> Iterator[dict]:
    """Yields the job's detail once, then each state change of the job or its variants
    ({"channel", "payload"}), and ends when the job is finished. LISTEN comes before the first
    read, so no change between the two is missed."""
    final_stage = final_job_stage(conn)
    conn.execute(f"LISTEN {VARIANT_CHANNEL}")
    conn.execute(f"LISTEN {JOB_CHANNEL}")
    try:
        job = job_detail(conn, job_id)
        yield {"channel": "snapshot", "payload": job}
        if job_finished(job, final_stage):
            return
        for note in conn.notifies():
            payload = json.loads(note.payload)
            if payload.get("job_id") != job["job_id"]:
                continue
            yield {"channel": note.channel, "payload": payload}
            if note.channel == JOB_CHANNEL and job_finished(payload, final_stage):
                return
    finally:
        conn.execute(f"UNLISTEN {VARIANT_CHANNEL}")
        conn.execute(f"UNLISTEN {JOB_CHANNEL}")
