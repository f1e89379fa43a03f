"""The fault suite's tools: real worker processes (start, SIGKILL, SIGSTOP, SIGTERM, restart),
job submission in bulk, the execution records of tests/faults/fault_stages.py, the invariant
checker, recovery-time measurement, and a TCP proxy that can black-hole its connections.

Scale: FAULTS_SOAK=1 (or FAULTS_SCALE=N) multiplies job counts and fault rounds.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from tests.helpers import wait_until
from workers import launch

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = "tests.faults.fault_stages:build_registry"
SOAK = os.environ.get("FAULTS_SOAK", "").strip().lower() in ("1", "true", "yes", "on")
SCALE = int(os.environ.get("FAULTS_SCALE") or (5 if SOAK else 1))
VARIANT_STAGES = ("vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
                  "iou_eval")
JOB_STAGES = ("ad_copy_gen_kor", "instagram_feed_gen")
# Worker flags of the suite: a short lease (recovery after a kill is about one lease), fast
# retries, a few tasks in flight per process.
LEASE_S = 2.0
FAST = ("--lease", str(LEASE_S), "--retry-base", "0.05", "--retry-max", "0.2", "--concurrency", "4", "--grace", "5")
# Every execution sleeps a little, so that a fault lands while stages run.
STAGE_SLEEP = "0.005,0.03"

METRICS: list[dict] = []


def jobs(n: int = 30) -> int:
    """How many jobs a scenario submits: n in the normal run, n x SCALE in soak mode."""
    return n * SCALE


def report(scenario: str, **values) -> None:
    """A measurement for docs/reliability.md: printed in pytest's summary, and appended as a JSON
    line to $FAULTS_REPORT when set."""
    entry = {"scenario": scenario, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in values.items()}}
    METRICS.append(entry)
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------ workers
class Worker:
    """One real `python -m workers start` process with the fault suite's stages."""

    def __init__(self, name: str, db_url: str, log_dir: Path, record_dir: Path, args=FAST, env: dict | None = None):
        self.name, self.db_url, self.args = name, db_url, tuple(args)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, "DATABASE_URL": db_url, "JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2",
                    "PYTHONUNBUFFERED": "1", "HEALTH_ADDR": "", "FAULTS_RECORD_DIR": str(record_dir), "FAULTS_STAGE_SLEEP": STAGE_SLEEP,
                    **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        self.start()

    def start(self) -> None:
        self.generation += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {self.generation} ===\n".encode())
            self.proc = launch.spawn_worker(["--registry", REGISTRY, *self.args], self.env, log)
        self._offset = self.log_path.stat().st_size

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def current_output(self) -> str:
        """The log of the current process only (since its start)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    @property
    def worker_id(self) -> str:
        """The lease owner name of the current process (hostname-pid-random)."""
        deadline = time.monotonic() + 60
        while not (found := re.search(r"worker (\S+) started:", self.current_output())):
            assert self.alive and time.monotonic() < deadline, f"{self.name} did not start:\n{self.current_output()}"
            time.sleep(0.05)
        return found.group(1)

    def wait_ready(self, timeout: float = 60, count: int = 1) -> None:
        """Until the current process has logged `LISTEN started` `count` times."""
        deadline = time.monotonic() + timeout
        while self.current_output().count("LISTEN started") < count:
            if not self.alive:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.current_output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not listening after {timeout} s:\n{self.current_output()[-4000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30, send: bool = True) -> int:
        """SIGTERM (once: a second one could land after the worker's own handlers are gone),
        wait; SIGKILL if it does not stop in time (then the return code says so)."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGCONT)
        if send:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def restart(self) -> None:
        if self.alive:
            self.kill()
        self.start()


class Fleet:
    def __init__(self, db_url: str, tmp_path: Path, n: int, args=FAST, env: dict | None = None, prefix: str = "w"):
        self.record_dir = tmp_path / "executions"
        self.record_dir.mkdir(exist_ok=True)
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.workers = [Worker(f"{prefix}{i}", db_url, self.log_dir, self.record_dir, args, env) for i in range(n)]

    def __iter__(self):
        return iter(self.workers)

    def __getitem__(self, i: int) -> Worker:
        return self.workers[i]

    def wait_ready(self, timeout: float = 60) -> None:
        for worker in self.workers:
            worker.wait_ready(timeout)

    def add(self, db_url: str, args=FAST, env: dict | None = None, name: str | None = None) -> Worker:
        worker = Worker(name or f"w{len(self.workers)}", db_url, self.log_dir, self.record_dir, args, env)
        self.workers.append(worker)
        return worker

    def stop(self) -> list[int]:
        """SIGTERM to all at once (after letting any process still starting up reach its signal
        handlers: before that, SIGTERM simply ends it); their exit codes."""
        for worker in self.workers:
            worker.signal(signal.SIGCONT)
            if worker.alive:
                try:
                    worker.wait_ready(30)
                except AssertionError:
                    pass
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        return [worker.stop(send=False) for worker in self.workers]

    def logs(self) -> str:
        return "\n".join(f"----- {w.name}\n{w.output()}" for w in self.workers)


def log_problems(text: str, expected: tuple[str, ...] = ()) -> list[str]:
    """Lines an operator would worry about: errors and tracebacks, less those the scenario
    expects (e.g. outcomes that could not be recorded while the database was away)."""
    return [line for line in text.splitlines()
            if (" ERROR " in line or "Traceback" in line or "CRITICAL" in line or "deadlock" in line.lower())
            and not any(e in line for e in expected)]


# ------------------------------------------------------------------------------------ jobs
def submit_jobs(conn, image: Path, n: int, variants: int = 3, copy: str = "Fresh coffee, 20% off",
                tenant: str = "acme") -> list[str]:
    from outbox.artifacts import open_store
    from outbox.jobs import submit_job

    store = open_store()
    return [submit_job(conn, store, [image], copy, tenant=tenant, variants=variants).job_id for _ in range(n)]


def wait_for_jobs(db_url: str, job_ids: list[str], timeout: float = 120) -> dict[str, str]:
    from tests.workerproc import wait_for_jobs as wait

    return wait(db_url, job_ids, timeout=timeout)


def db_now(conn) -> float:
    return conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8 AS t").fetchone()["t"]


def held_by(conn, worker_id: str) -> dict[int, dict]:
    """Running tasks whose lease this worker holds: id -> {subject, stage, attempt}."""
    return {r["id"]: r for r in conn.execute(
        "SELECT id, coalesce(job_variants_id, job_id)::text AS subject, stage, attempts AS attempt FROM stage_tasks "
        "WHERE status = 'running' AND lease_owner = %s", (worker_id,))}


def takeover_seconds(record_dir: Path, held: dict[int, dict], at: float) -> float | None:
    """After the run: how long after `at` (time.time()) the last of the held tasks started its
    next attempt somewhere else (from the execution records). None: none of them ran again
    (their completions had committed just before the fault)."""
    starts: dict[tuple, list] = defaultdict(list)
    for e in read_executions(record_dir):
        if e["ev"] == "start":
            starts[subject(e)].append((e["attempt"], e["t"]))
    worst = None
    for task in held.values():
        later = [t for attempt, t in starts[(task["subject"], task["stage"])] if attempt > task["attempt"]]
        if later:
            worst = max(worst or 0.0, min(later) - at)
    return worst


def wait_taken_over(conn, tasks: dict[int, dict], timeout: float = 60) -> float:
    """Waits until each task (id -> the attempt a stopped worker held) has been claimed again or
    has finished; returns the seconds that took."""
    started = time.monotonic()
    if not tasks:
        return 0.0

    def done():
        rows = conn.execute("SELECT id, attempts, status FROM stage_tasks WHERE id = ANY (%s)", (list(tasks),)).fetchall()
        return all(r["attempts"] > tasks[r["id"]]["attempt"] or r["status"] in ("done", "failed") for r in rows)

    wait_until(done, timeout, what=f"take-over of tasks {sorted(tasks)}")
    return time.monotonic() - started


def rescued_seconds(conn, held: dict[int, dict], at: float) -> float | None:
    """How long after `at` (time.time()) the last of the held tasks was put back in the queue by
    the lease rescue (error_details.requeued_at; run_after keeps the task's place in the queue).
    None: none was rescued."""
    rows = conn.execute("""
        SELECT id, (error_details->>'requeued_at')::float8 AS t FROM stage_tasks
        WHERE id = ANY (%s) AND expired_leases > 0 AND error_details ? 'requeued_at'""", (list(held),)).fetchall()
    later = [r["t"] - at for r in rows if r["t"] >= at]
    return max(later) if later else None


def rescue_delays(conn, kills: list[tuple[dict, float]]) -> list[float]:
    """rescued_seconds for each kill, counting a task only at the last kill that hit it (a
    task hit again later was requeued again, later)."""
    last = {task_id: i for i, (held, _) in enumerate(kills) for task_id in held}
    delays = []
    for i, (held, at) in enumerate(kills):
        mine = {task_id: t for task_id, t in held.items() if last[task_id] == i}
        if mine and (seconds := rescued_seconds(conn, mine, at)) is not None:
            delays.append(seconds)
    return delays


def results_after(conn, since_epoch: float) -> int:
    return conn.execute("SELECT count(*) AS n FROM stage_results WHERE created_at > to_timestamp(%s)",
                        (since_epoch,)).fetchone()["n"]


def wait_progress(conn, since_epoch: float, timeout: float = 60) -> float:
    """Seconds until a stage result commits after the given database time."""
    started = time.monotonic()
    wait_until(lambda: results_after(conn, since_epoch) > 0, timeout, what="progress")
    return time.monotonic() - started


# ------------------------------------------------------------------------------------ records
def read_executions(record_dir: Path) -> list[dict]:
    rows = []
    for path in Path(record_dir).glob("*.log"):
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def subject(row: dict) -> tuple[str, str]:
    return (row.get("variant") or row["job"], row["stage"])


@dataclass
class Summary:
    tasks: int
    executions: int
    reexecutions: int  # executions beyond one per task
    attempts: Counter  # attempts -> number of tasks
    states: dict  # job -> done/failed
    failed_tasks: list = field(default_factory=list)
    by_task: dict = field(default_factory=dict)  # (subject, stage) -> {"attempts", "starts", "status", ...}

    def __str__(self) -> str:
        return (f"{self.tasks} tasks, {self.executions} executions ({self.reexecutions} re-runs), "
                f"attempts {dict(sorted(self.attempts.items()))}, {len(self.failed_tasks)} failed task(s)")


def check_invariants(conn, record_dir: Path, job_ids: list[str], expect_failed: set[str] = frozenset(),
                     variants: int = 3, exactly_once: bool = False, degraded: set[str] = frozenset()) -> Summary:
    """The promises of DESIGN.md "Semantics", checked in SQL and against the execution records:

    - every job finished: done at (instagram_feed_gen, done), or failed when in expect_failed;
    - exactly one stage result per (variant, stage) and per (job, stage); a done job has all ten
      (unless in `degraded`: done with a variant the scenario's faults failed legitimately);
    - no task left queued or running; attempts never above max_attempts;
    - a task attempt executed at most once (the claim gives an attempt to one worker), never
      more executions than claims, and each committed result came from an execution of that
      very attempt that ran to its end (the result carries the executing pid);
    - job stages ran after the job's last variant finished, and once per attempt;
    - exactly_once: no fault touched execution, so every task ran once, at attempt 1.
    """
    ids = list(job_ids)
    rows = conn.execute("""
        SELECT job_id::text, status, current_step FROM jobs WHERE job_id = ANY (%s::uuid[])""", (ids,)).fetchall()
    states = {r["job_id"]: ("done" if (r["current_step"], r["status"]) == ("instagram_feed_gen", "done")
                            else r["status"]) for r in rows}
    assert len(states) == len(ids)
    wrong = {j: s for j, s in states.items() if s != ("failed" if j in expect_failed else "done")}
    assert not wrong, f"jobs in the wrong final state: {wrong}"

    dup = conn.execute("""
        SELECT coalesce(job_variants_id::text, job_id::text) AS subject, stage, count(*) AS n FROM stage_results
        WHERE job_id = ANY (%s::uuid[]) GROUP BY 1, 2 HAVING count(*) > 1""", (ids,)).fetchall()
    assert not dup, f"more than one result for: {dup}"
    open_tasks = conn.execute("""
        SELECT id, stage, status, lease_owner FROM stage_tasks
        WHERE job_id = ANY (%s::uuid[]) AND status IN ('queued', 'running')""", (ids,)).fetchall()
    assert not open_tasks, f"tasks left open: {open_tasks}"
    counts = conn.execute("""
        SELECT j.job_id::text,
               (SELECT count(*) FROM stage_results r WHERE r.job_id = j.job_id AND r.job_variants_id IS NOT NULL) AS vr,
               (SELECT count(*) FROM stage_results r WHERE r.job_id = j.job_id AND r.job_variants_id IS NULL) AS jr,
               (SELECT count(*) FROM jobs_variants v WHERE v.job_id = j.job_id) AS nv
        FROM jobs j WHERE j.job_id = ANY (%s::uuid[])""", (ids,)).fetchall()
    for row in counts:
        if states[row["job_id"]] == "done" and row["job_id"] not in degraded:
            assert row["nv"] == variants and row["vr"] == variants * len(VARIANT_STAGES) and row["jr"] == len(JOB_STAGES), row

    tasks = conn.execute("""
        SELECT t.id, t.job_id::text, t.job_variants_id::text AS variant, t.stage, t.status, t.attempts,
               t.max_attempts, t.last_error, extract(epoch FROM t.finished_at)::float8 AS finished,
               r.attempt AS result_attempt, r.result->>'pid' AS result_pid
        FROM stage_tasks t LEFT JOIN stage_results r ON r.task_id = t.id
        WHERE t.job_id = ANY (%s::uuid[])""", (ids,)).fetchall()
    execs = [e for e in read_executions(record_dir) if e["job"] in set(ids)]
    starts = Counter((subject(e), e["attempt"]) for e in execs if e["ev"] == "start")
    ends = defaultdict(set)
    for e in execs:
        if e["ev"] == "end":
            ends[(subject(e), e["attempt"])].add(e["pid"])
    starts_per_task = Counter()
    for (k, _), n in starts.items():
        starts_per_task[k] += n
    twice = {k: n for k, n in starts.items() if n > 1}
    assert not twice, f"a task attempt executed more than once (claimed twice?): {twice}"
    by_task = {}
    for t in tasks:
        key = (t["variant"] or t["job_id"], t["stage"])
        n_starts = starts_per_task[key]
        by_task[key] = {**t, "starts": n_starts}
        assert t["attempts"] <= t["max_attempts"], t
        assert n_starts <= t["attempts"], f"more executions ({n_starts}) than claims: {t}"
        if t["status"] == "done":
            assert t["result_attempt"] == t["attempts"], f"the result is not the last attempt's: {t}"
            pids = ends.get((key, t["attempts"]), set())
            assert int(t["result_pid"]) in pids, f"the committed result has no finished execution behind it: {t} {pids}"
        if exactly_once:
            assert t["attempts"] == 1 and n_starts == 1, f"expected exactly one execution: {t}, {n_starts} starts"

    # Job stages: after the last variant finished (fan-in), never before.
    last_variant = {r["job_id"]: r["t"] for r in conn.execute("""
        SELECT job_id::text, extract(epoch FROM max(finished_at))::float8 AS t FROM stage_tasks
        WHERE job_id = ANY (%s::uuid[]) AND job_variants_id IS NOT NULL GROUP BY job_id""", (ids,))}
    for e in execs:
        if e["variant"] is None and e["ev"] == "start":
            assert e["t"] >= last_variant[e["job"]] - 0.001, f"job stage {e['stage']} started before the fan-in: {e}"

    n_exec = sum(starts.values())
    return Summary(tasks=len(tasks), executions=n_exec, reexecutions=n_exec - len(tasks),
                   attempts=Counter(t["attempts"] for t in tasks), states=states,
                   failed_tasks=[t for t in tasks if t["status"] == "failed"], by_task=by_task)


# ------------------------------------------------------------------------------------ proxy
class _Pipe:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = client, upstream
        self.frozen = False
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            try:
                sock.close()
            except OSError:
                pass


class BlackholeProxy:
    """A TCP proxy on 127.0.0.1 that can silently stop forwarding: `blackhole()` freezes every
    connection open at that moment. A frozen connection stays open and its peers see nothing
    at all: the proxy neither reads nor writes, so the kernel keeps acknowledging (even TCP
    keepalive probes), exactly as a stuck middlebox or a NAT that dropped the flow would look
    to the application. New connections are forwarded normally."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.pipes: list[_Pipe] = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def url_for(self, url: str) -> str:
        """The same database URL, through this proxy."""
        return re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{self.port}/", url)

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pipe = _Pipe(client, upstream)
            with self.lock:
                self.pipes.append(pipe)
            threading.Thread(target=self._pump, args=(pipe, client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(pipe, upstream, client), daemon=True).start()

    @staticmethod
    def _pump(pipe: _Pipe, src: socket.socket, dst: socket.socket) -> None:
        while not pipe.closed:
            if pipe.frozen:
                time.sleep(0.05)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                if pipe.frozen:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        if not pipe.frozen:
            pipe.close()

    def blackhole(self) -> int:
        """Freezes every open connection; returns how many."""
        with self.lock:
            live = [p for p in self.pipes if not p.closed and not p.frozen]
            for pipe in live:
                pipe.frozen = True
        return len(live)

    def close(self) -> None:
        self.running = False
        self.listener.close()
        with self.lock:
            for pipe in self.pipes:
                pipe.close()
