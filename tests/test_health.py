"""The worker's HTTP endpoints (/healthz, /readyz, /metrics) and its logs, on real worker processes."""
from __future__ import annotations

import http.client
import json
import socket
import sys
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox import migrate
from outbox.artifacts import open_store
from outbox.db import free_port
from outbox.jobs import submit_job
from tests.helpers import wait_until
from tests.workerproc import WorkerProcess, wait_for_jobs
from workers import health
from workers.metrics import Metrics

FAST = ("--retry-base", "0.05", "--retry-max", "0.2")


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), dict(resp.getheaders())
    finally:
        conn.close()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))




def submit(conn, image, copy="Fresh coffee", variants=2):
    return submit_job(conn, open_store(), [image], copy, tenant="acme", variants=variants).job_id


def start_worker(db_url, tmp_path, *args, port=None, env=None, name="w.log", probe="/readyz"):
    port = port or free_port()
    worker = WorkerProcess(db_url, tmp_path / name, "--health-addr", f"127.0.0.1:{port}", *args, env=env)
    worker.wait_ready(path=probe)
    return worker, port


def test_metrics_move_with_real_work_and_queue_gauges_come_from_the_database(conn, db_url, home, tiny_png, tmp_path):
    worker, port = start_worker(db_url, tmp_path, "--stages", "vlm_analyze", *FAST)
    try:
        assert get(port, "/healthz")[0] == 200
        status, body, _ = get(port, "/readyz")
        assert status == 200 and body.startswith("ready: stages vlm_analyze; schema ")
        ok = submit(conn, tiny_png, "Sale FLAKY:vlm_analyze:1", variants=2)
        bad = submit(conn, tiny_png, "Sale PERMANENT:vlm_analyze", variants=1)
        wait_until(lambda: conn.execute(
            "SELECT count(*) AS n FROM stage_tasks WHERE stage = 'vlm_analyze' AND status IN ('done', 'failed')"
        ).fetchone()["n"] == 3, what="vlm_analyze finished for 3 variants")
        status, text, headers = get(port, "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        m = samples(text)
        stage = {"stage": "vlm_analyze"}
        assert value(m, "adflow_tasks_claimed_total", **stage) == 5  # 2 variants x 2 attempts + 1
        assert value(m, "adflow_tasks_completed_total", **stage) == 2
        assert value(m, "adflow_tasks_failed_total", **stage) == 1
        assert value(m, "adflow_task_retries_total", **stage) == 2
        assert value(m, "adflow_stage_duration_seconds_count", **stage) == 2
        assert value(m, "adflow_notifications_received_total") >= 1
        assert value(m, "adflow_lease_losses_total") == 0
        assert value(m, "adflow_listener_connected") == 1
        assert value(m, "adflow_worker_ready") == 1
        assert value(m, "adflow_tasks_in_flight") == 0
        # The next stage waits (this worker does not run it): the queue gauges read the database.
        assert value(m, "adflow_queue_depth", stage="yolo_detect") == 2
        assert value(m, "adflow_queue_oldest_age_seconds", stage="yolo_detect") > 0
        assert value(m, "adflow_queue_depth", stage="vlm_analyze") == 0
        assert value(m, "adflow_queue_delayed", stage="vlm_analyze") == 0
        assert value(m, "adflow_queue_depth", stage="instagram_feed_gen") == 0  # every graph stage is present
        assert ok not in text and bad not in text  # no job content on the endpoints
        # A lost listening connection is counted, and the worker is alive again after it.
        dbname = db_url.rsplit("/", 1)[1]
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND query LIKE 'LISTEN outbox_stage_tasks%%'", (dbname,))
        wait_until(lambda: worker.output().count("LISTEN started") >= 2, what="listener reconnect")
        m = samples(get(port, "/metrics")[1])
        assert value(m, "adflow_listener_reconnects_total") >= 1
        assert get(port, "/healthz")[0] == 200
    finally:
        assert worker.stop() == 0


def test_only_get_on_three_paths(db_url, home, tmp_path):
    worker, port = start_worker(db_url, tmp_path)
    try:
        assert get(port, "/metrics?name[]=adflow_tasks_claimed_total")[0] == 200  # query strings are ignored
        assert get(port, "/")[0] == 404
        assert get(port, "/healthz/../metrics")[0] == 404
        assert get(port, "/debug/vars")[0] == 404
        status, _, headers = get(port, "/metrics", "POST")
        assert status == 405 and headers["Allow"] == "GET"
        assert get(port, "/healthz", "HEAD")[0] == 405
        assert get(port, "/readyz", "DELETE")[0] == 405
        assert raw(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
        raw(port, b"")  # a bare TCP connect and close answers nothing and harms nothing
        assert get(port, "/healthz")[0] == 200
    finally:
        assert worker.stop() == 0
    assert "health endpoints on http://127.0.0.1:" in worker.output()


def test_readyz_waits_for_the_migrated_schema(conn, db_url, home, tmp_path):
    conn.execute("DELETE FROM alembic_version")  # tables there, revision not recorded: not migrated
    worker, port = start_worker(db_url, tmp_path, probe="/healthz")
    try:
        assert get(port, "/healthz")[0] == 200  # alive: a restart would not help
        status, body, _ = get(port, "/readyz")
        assert status == 503 and "database schema missing" in body and "db upgrade" in body
        conn.execute("INSERT INTO alembic_version (version_num) VALUES (%s)", (max(migrate.script_revisions()[0]),))
        assert get(port, "/readyz")[0] == 200
    finally:
        assert worker.stop() == 0


def test_each_process_of_a_supervisor_serves_its_own_port(db_url, home, tmp_path):
    port = two_free_ports()
    worker = WorkerProcess(db_url, tmp_path / "w.log", "--processes", "2", "--health-addr", f"127.0.0.1:{port}")
    try:
        wait_until(lambda: worker.output().count("LISTEN started") >= 2, what="two listeners")
        wait_until(lambda: worker.output().count("health endpoints on") >= 2, what="two health servers")
        for p in (port, port + 1):
            assert get(p, "/readyz")[0] == 200
        workers = {get(p, "/metrics")[0] for p in (port, port + 1)}
        assert workers == {200}
    finally:
        assert worker.stop() == 0


def two_free_ports() -> int:
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def test_health_address_parsing():
    assert health.parse_addr("0.0.0.0:8080") == ("0.0.0.0", 8080)
    assert health.parse_addr(":9000") == ("0.0.0.0", 9000)
    assert health.parse_addr("[::]:8080") == ("::", 8080)
    assert health.parse_addr("") is None and health.parse_addr("off") is None
    for bad in ("8080", "host:", "host:99999", "host:http"):
        with pytest.raises(health.AddressError):
            health.parse_addr(bad)
    assert health.offset_addr("127.0.0.1:8080", 0) == "127.0.0.1:8080"
    assert health.offset_addr("127.0.0.1:8080", 3) == "127.0.0.1:8083"
    assert health.offset_addr("[::]:8080", 1) == "[::]:8081"
    assert health.offset_addr("", 2) == ""


def test_gpu_memory_gauges_only_when_torch_already_runs_cuda(monkeypatch):
    m = Metrics()
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    health.gpu_memory(m)  # torch not imported: nothing read, nothing imported
    assert "torch" not in sys.modules
    cuda = types.SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: 2,
                                 memory_allocated=lambda i: 1000 * (i + 1), memory_reserved=lambda i: 4096)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    health.gpu_memory(m)
    from prometheus_client import generate_latest

    found = samples(generate_latest(m.registry).decode())
    assert value(found, "adflow_gpu_memory_allocated_bytes", device="cuda:1") == 2000
    assert value(found, "adflow_gpu_memory_reserved_bytes", device="cuda:0") == 4096


# ----------------------------------------------------------------- logs
def test_json_logs_one_object_per_line_with_task_fields(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, "Sale FLAKY:planner:1", variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", *FAST, env={"LOG_FORMAT": "json"})
    try:
        assert wait_for_jobs(db_url, [job], timeout=60) == {job: "done"}
    finally:
        assert worker.stop() == 0
    lines = [line for line in worker.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "worker_id", "message"} <= set(e) for e in entries)
    assert len({e["worker_id"] for e in entries}) == 1
    triggers = [e for e in entries if e["message"].startswith("[TRIGGER]")]
    assert len(triggers) == 11  # 8 variant stages, one retried, and 2 job stages
    variant_id = conn.execute("SELECT job_variants_id::text AS v FROM jobs_variants WHERE job_id = %s", (job,)).fetchone()["v"]
    planner = [e for e in triggers if e["stage"] == "planner"]
    assert [e["attempt"] for e in planner] == [1, 2]
    for e in planner:
        assert e["job_id"] == job and e["variant_id"] == variant_id and isinstance(e["task_id"], int)
    job_level = [e for e in triggers if e["stage"] == "instagram_feed_gen"]
    assert job_level and "variant_id" not in job_level[0]
    assert any("retry in" in e["message"] and e["stage"] == "planner" and e["level"] == "warning" for e in entries)
    assert any(e["message"].startswith("[LISTENER] LISTEN started") for e in entries)


def test_text_logs_keep_the_old_keywords(conn, db_url, home, tiny_png, tmp_path):
    job = submit(conn, tiny_png, variants=1)
    worker = WorkerProcess(db_url, tmp_path / "w.log", env={"LOG_FORMAT": "text"})
    try:
        assert wait_for_jobs(db_url, [job], timeout=60) == {job: "done"}
    finally:
        assert worker.stop() == 0
    out = worker.output()
    assert "[LISTENER] LISTEN started" in out
    assert "[TRIGGER] stage vlm_analyze started" in out and "[TRIGGER] stage instagram_feed_gen started" in out
    assert "stage iou_eval succeeded" in out
    assert not any(line.lstrip().startswith("{") for line in out.splitlines())
