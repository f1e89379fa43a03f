"""The worker's job, queue-wait, batch and build metrics (issue 15), scraped from real workers
running real jobs against the per-test database; what they should read is taken from the database."""
from __future__ import annotations

import dataclasses
import http.client
import time
from importlib.metadata import version

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from outbox.artifacts import open_store
from outbox.db import free_port
from outbox.jobs import submit_job
from tests.engine_stages import STAGES
from tests.helpers import wait_until
from tests.workerproc import WorkerProcess, wait_for_jobs
from workers.metrics import Metrics

BATCHED = "tests.test_metrics:batched_registry"
VLM_BATCH = 2


def batched_registry(profile: str | None = None, device: str = "cpu") -> dict:
    """The engine's test stages, with vlm_analyze taking batches of VLM_BATCH (as a GPU stage
    does): a batch of several tasks is what tells a per-batch count from a per-task one."""
    from tests.engine_stages import build_registry

    registry = build_registry(profile, device)
    registry["vlm_analyze"] = dataclasses.replace(registry["vlm_analyze"], max_batch=VLM_BATCH)
    return registry


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def start_worker(db_url, tmp_path, *args, env=None, name="w.log") -> tuple[WorkerProcess, int]:
    port = free_port()
    worker = WorkerProcess(db_url, tmp_path / name, "--health-addr", f"127.0.0.1:{port}", *args, env=env)
    worker.wait_ready()
    return worker, port


def submit(conn, image, copy: str, variants: int) -> str:
    return submit_job(conn, open_store(), [image], copy, tenant="acme", variants=variants).job_id


def attempts_by_stage(conn, job_ids: list[str]) -> dict[str, int]:
    rows = conn.execute("SELECT stage, sum(attempts)::int AS n FROM stage_tasks WHERE job_id = ANY (%s::uuid[]) "
                        "GROUP BY stage", (job_ids,)).fetchall()
    return {row["stage"]: row["n"] for row in rows}


def test_a_job_moves_queue_wait_batch_job_and_build_series(conn, db_url, home, tiny_png, tmp_path):
    worker, port = start_worker(db_url, tmp_path, "--registry", BATCHED, "--models", "tiny")  # the flag, as the demo starts them
    try:
        m = scrape(port)
        [info] = [dict(labels) for (name, labels) in m if name == "adflow_build_info"]
        assert info == {"version": version("adflow"), "model_profile": "tiny", "stages": ",".join(sorted(STAGES))}
        assert value(m, "adflow_build_info", **info) == 1
        for outcome in ("done", "failed"):  # there before any job ends
            assert value(m, "adflow_jobs_finished_total", outcome=outcome) == 0
            assert value(m, "adflow_job_duration_seconds_count", outcome=outcome) == 0

        # Three variants committed together: one claim takes the three vlm_analyze tasks, which
        # run as a batch of 2 and a batch of 1.
        job = submit(conn, tiny_png, "Fresh coffee", variants=3)
        assert wait_for_jobs(db_url, [job], timeout=60) == {job: "done"}
        wait_until(lambda: (m := scrape(port)) and value(m, "adflow_job_duration_seconds_count", outcome="done") == 1
                   and value(m, "adflow_tasks_completed_total", stage="instagram_feed_gen") == 1,
                   what="the job's end observed")
        m = scrape(port)
    finally:
        assert worker.stop() == 0, worker.output()

    claims = attempts_by_stage(conn, [job])
    assert sorted(claims) == sorted(STAGES) and sum(claims.values()) == 3 * 8 + 2
    for stage, n in claims.items():
        assert value(m, "adflow_tasks_claimed_total", stage=stage) == n, stage
        assert value(m, "adflow_queue_wait_seconds_count", stage=stage) == n, stage
        assert value(m, "adflow_tasks_completed_total", stage=stage) == n, stage
        # Every task of a batch that gave results gets its share of the batch's time.
        assert value(m, "adflow_task_duration_seconds_count", stage=stage) == n, stage
        batches = -(-n // VLM_BATCH) if stage == "vlm_analyze" else n
        assert value(m, "adflow_stage_duration_seconds_count", stage=stage) == batches, stage
    assert value(m, "adflow_stage_duration_seconds_count", stage="vlm_analyze") == 2  # not 3: one per batch

    assert value(m, "adflow_jobs_finished_total", outcome="done") == 1
    assert value(m, "adflow_jobs_finished_total", outcome="failed") == 0
    assert value(m, "adflow_job_duration_seconds_count", outcome="failed") == 0
    # From the job's creation (the database's clock, carried by the claim) to its last stage's
    # commit (the worker's clock, the same machine here): the database's figure, give or take the
    # commit's round trip.
    [row] = conn.execute("SELECT extract(epoch FROM t.finished_at - j.created_at)::float8 AS s FROM stage_tasks t "
                         "JOIN jobs j ON j.job_id = t.job_id WHERE t.job_id = %s AND t.stage = 'instagram_feed_gen'",
                         (job,)).fetchall()
    assert value(m, "adflow_job_duration_seconds_sum", outcome="done") == pytest.approx(row["s"], abs=0.5)


def test_each_job_end_is_counted_once_by_the_whole_fleet(conn, db_url, home, tiny_png, tmp_path):
    # One task at a time each: the variants of a job are spread over both workers, so the last
    # variants of `race` may fail on both at once, and both then find the job failed.
    workers = [start_worker(db_url, tmp_path, "--concurrency", "1", name=f"w{i}.log") for i in (1, 2)]
    try:
        jobs = {
            "fan_in": submit(conn, tiny_png, "Sale PERMANENT:vlm_analyze", variants=1),
            "race": submit(conn, tiny_png, "Sale PERMANENT:vlm_analyze", variants=3),
            "job_stage": submit(conn, tiny_png, "Sale PERMANENT:instagram_feed_gen", variants=2),
            "done": submit(conn, tiny_png, "Sale", variants=2),
        }
        states = wait_for_jobs(db_url, list(jobs.values()), timeout=90)
        assert states == {job: "done" if name == "done" else "failed" for name, job in jobs.items()}

        def fleet(name: str, **labels) -> float:
            return sum(value(scrape(port), name, **labels) or 0 for _, port in workers)

        wait_until(lambda: fleet("adflow_job_duration_seconds_count", outcome="failed") >= 3
                   and fleet("adflow_job_duration_seconds_count", outcome="done") >= 1, what="the job ends observed")
        time.sleep(0.5)  # room for a second count of the same end to show
        found = [scrape(port) for _, port in workers]
    finally:
        for worker, _ in workers:
            assert worker.stop() == 0, worker.output()

    def total(name: str, **labels) -> float:
        return sum(value(m, name, **labels) or 0 for m in found)

    # Four variants and one job stage failed for good; three jobs ended failed.
    assert total("adflow_tasks_failed_total", stage="vlm_analyze") == 4
    assert total("adflow_tasks_failed_total", stage="instagram_feed_gen") == 1
    assert total("adflow_jobs_finished_total", outcome="failed") == 3
    assert total("adflow_job_duration_seconds_count", outcome="failed") == 3
    assert total("adflow_jobs_finished_total", outcome="done") == 1
    assert total("adflow_job_duration_seconds_count", outcome="done") == 1
    claims = attempts_by_stage(conn, list(jobs.values()))
    for stage, n in claims.items():
        assert total("adflow_queue_wait_seconds_count", stage=stage) == n, stage
    for m in found:  # each worker observed a wait for each of its own claims
        claimed = sum(v for (name, _), v in m.items() if name == "adflow_tasks_claimed_total")
        waited = sum(v for (name, _), v in m.items() if name == "adflow_queue_wait_seconds_count")
        assert claimed == waited


def test_a_failure_counts_only_the_job_end_its_own_transaction_made(conn, db_url, home, tiny_png, tmp_path):
    """A job failed by another writer while its variants run: the worker whose tasks then fail for
    good finds the job failed, but did not fail it, and must not count it."""
    worker, port = start_worker(db_url, tmp_path)
    try:
        job = submit(conn, tiny_png, "Sale SLEEP:vlm_analyze:2 PERMANENT:vlm_analyze", variants=2)
        running = "SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND status = 'running'"
        wait_until(lambda: conn.execute(running, (job,)).fetchone()["n"] == 2, what="both variants running")
        conn.execute("UPDATE jobs SET status = 'failed' WHERE job_id = %s", (job,))  # as an outside writer may
        wait_until(lambda: value(scrape(port), "adflow_tasks_failed_total", stage="vlm_analyze") == 2,
                   what="both variants failed for good")
        time.sleep(0.5)  # room for the job-end queries that follow those failures
        m = scrape(port)
    finally:
        assert worker.stop() == 0, worker.output()
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] == "failed"
    assert value(m, "adflow_jobs_finished_total", outcome="failed") == 0
    assert value(m, "adflow_job_duration_seconds_count", outcome="failed") == 0


def test_a_job_failed_by_a_lease_rescue_is_counted_by_the_rescuing_worker(conn, db_url, home, tiny_png, tmp_path):
    # A one-variant job whose task's worker died on its last attempt: the next worker's rescue
    # fails the task for good, which fails the job (no variant left), and that worker counts it.
    job = submit(conn, tiny_png, "Sale", variants=1)
    conn.execute("UPDATE stage_tasks SET status = 'running', attempts = max_attempts, lease_owner = 'dead-worker', "
                 "lease_expires_at = now() - interval '1 s', started_at = now() WHERE job_id = %s", (job,))
    worker, port = start_worker(db_url, tmp_path)
    try:
        wait_until(lambda: value(scrape(port), "adflow_jobs_finished_total", outcome="failed") == 1,
                   what="the rescued job counted", detail=worker.output)
        m = scrape(port)
    finally:
        assert worker.stop() == 0, worker.output()
    assert conn.execute("SELECT outbox_job_state(status, current_step) AS s FROM jobs WHERE job_id = %s",
                        (job,)).fetchone()["s"] == "failed"
    assert value(m, "adflow_lease_rescues_total") == 1 and value(m, "adflow_job_duration_seconds_count", outcome="failed") == 1


def build_info(m: Metrics) -> dict:
    [family] = [f for f in m.registry.collect() if f.name == "adflow_build_info"]
    [sample] = family.samples
    assert sample.value == 1
    return sample.labels


def test_build_info_names_the_profile_the_registry_resolves(monkeypatch):
    monkeypatch.delenv("MODEL_PROFILE", raising=False)
    assert build_info(Metrics())["model_profile"] == "real"  # the registry's default
    monkeypatch.setenv("MODEL_PROFILE", "TINY")
    assert build_info(Metrics())["model_profile"] == "tiny"
    monkeypatch.setenv("MODEL_PROFILE", "huge")  # a worker given --models starts anyway
    assert build_info(Metrics())["model_profile"] == "unknown"
    assert build_info(Metrics(model_profile="tiny"))["model_profile"] == "tiny"
    stages = []
    m = Metrics(stages=lambda: stages)
    assert build_info(m)["stages"] == ""
    stages[:] = ["yolo_detect", "vlm_analyze"]  # known after the worker's start-up check
    assert build_info(m)["stages"] == "vlm_analyze,yolo_detect"
    assert b'adflow_build_info{model_profile="unknown",stages="vlm_analyze,yolo_detect"' in generate_latest(m.registry)

