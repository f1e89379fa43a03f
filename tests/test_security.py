"""Security and bad input at the engine level: tenant isolation in the worker, input refused
whole at submit (API and CLI), validation at the CLI edges, parameterised SQL only, and a worker
that runs with a database role holding only the grants it needs (deploy/sql/)."""
from __future__ import annotations

import ast
import os
import uuid
from pathlib import Path

import psycopg
import pytest

from outbox.artifacts import open_store
from outbox.jobs import InvalidInput, submit_job
from tests.conftest import ROOT, cli
from tests.workerproc import WorkerProcess, wait_for_jobs

FAULT_REGISTRY = "tests.faults.fault_stages:build_registry"
TABLES = ("jobs", "job_inputs", "jobs_variants", "image_assets", "stage_tasks", "stage_results")


def counts(conn) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"] for t in TABLES}


def stored_files(home: Path) -> list[Path]:
    return sorted(p for p in (home / "artifacts").rglob("*") if p.is_file()) if (home / "artifacts").exists() else []


def fault_worker(db_url, tmp_path, name="w", *args, env=None):
    (tmp_path / "executions").mkdir(exist_ok=True)
    return WorkerProcess(db_url, tmp_path / f"{name}.log", "--registry", FAULT_REGISTRY, "--retry-base", "0.05",
                         "--retry-max", "0.2", *args,
                         env={"FAULTS_RECORD_DIR": str(tmp_path / "executions"), **(env or {})})


# ----------------------------------------------------------------------------- tenant isolation
def test_a_variant_pointing_at_another_tenants_image_is_refused(conn, db_url, home, tiny_png, tmp_path):
    """An outside writer plants, in tenant acme's job, a variant whose img_asset_id is tenant
    beta's image (and one whose file: path leaves the asset root). Those variants fail at once,
    permanently, saying why; the job's honest variant and other jobs go on."""
    store = open_store()
    beta = submit_job(conn, store, [tiny_png], "Beta's secret launch", tenant="beta", variants=1)
    acme = submit_job(conn, store, [tiny_png], "Acme sale", tenant="acme", variants=1)
    evil_file = conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES ('acme', 'file:../../etc/passwd') "
                             "RETURNING image_asset_id").fetchone()["image_asset_id"]
    planted = []
    for order, asset in ((2, beta.asset_ids[0]), (3, evil_file)):
        vid = str(uuid.uuid4())
        conn.execute("INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, creation_order, status, "
                     "current_step) VALUES (%s, %s, %s, %s, 'done', 'img_gen')", (vid, acme.job_id, asset, order))
        planted.append(vid)
    worker = fault_worker(db_url, tmp_path)
    try:
        states = wait_for_jobs(db_url, [beta.job_id, acme.job_id])
    finally:
        assert worker.stop() == 0
    assert states == {beta.job_id: "done", acme.job_id: "done"}  # a job with a good variant finishes
    rows = {r["vid"]: r for r in conn.execute(
        "SELECT job_variants_id::text AS vid, v.status, t.stage, t.attempts, t.last_error FROM jobs_variants v "
        "JOIN stage_tasks t USING (job_variants_id) WHERE v.job_id = %s AND t.status = 'failed'", (acme.job_id,))}
    assert set(rows) == set(planted)
    cross, path = rows[planted[0]], rows[planted[1]]
    assert cross["status"] == "failed" and cross["stage"] == "vlm_analyze" and cross["attempts"] == 1
    assert "belongs to tenant 'beta', not the job's tenant 'acme': refused" in cross["last_error"]
    assert "outside the asset root: refused" in path["last_error"] and path["attempts"] == 1
    assert "(permanent)" in worker.output()


def test_a_result_naming_another_tenants_artifact_is_refused(conn, db_url, home, tiny_png, tmp_path):
    """overlay writes an artifact that vlm_judge reads back (as the real stages do). Between
    the two, one variant's overlay result is tampered with to name tenant beta's artifact:
    that variant fails permanently at vlm_judge; its siblings read their own and finish."""
    store = open_store()
    beta = submit_job(conn, store, [tiny_png], "Beta", tenant="beta", variants=1)
    acme = submit_job(conn, store, [tiny_png], "Acme ARTIFACT:overlay READ_ARTIFACTS:vlm_judge", tenant="acme",
                      variants=3)
    first = fault_worker(db_url, tmp_path, "first", "--stages", "vlm_analyze,yolo_detect,planner,overlay")
    try:
        def judged_queued():
            return conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND stage = 'vlm_judge'",
                                (acme.job_id,)).fetchone()["n"] == 3
        import time

        deadline = time.monotonic() + 60
        while not judged_queued():
            assert time.monotonic() < deadline, first.output()
            time.sleep(0.05)
    finally:
        assert first.stop() == 0
    beta_key = conn.execute("SELECT uri FROM image_assets WHERE tenant_id = 'beta'").fetchone()["uri"]
    assert store.get(beta_key)  # it exists: only the tenant check stands in the way
    victim = acme.variant_ids[0]
    conn.execute("UPDATE stage_results SET result = jsonb_set(result, '{artifacts,out.bin}', to_jsonb(%s::text)) "
                 "WHERE job_variants_id = %s AND stage = 'overlay'", (beta_key, victim))
    worker = fault_worker(db_url, tmp_path)
    try:
        states = wait_for_jobs(db_url, [beta.job_id, acme.job_id])
    finally:
        assert worker.stop() == 0
    assert states[acme.job_id] == "done"
    task = conn.execute("SELECT status, attempts, last_error FROM stage_tasks WHERE job_variants_id = %s "
                        "AND stage = 'vlm_judge'", (victim,)).fetchone()
    assert task["status"] == "failed" and task["attempts"] == 1
    assert f"artifact '{beta_key}' belongs to another tenant: refused" in task["last_error"]
    judged = conn.execute("SELECT result FROM stage_results WHERE job_id = %s AND stage = 'vlm_judge'",
                          (acme.job_id,)).fetchall()
    assert len(judged) == 2 and all(list(r["result"]["read_artifacts"])[0].startswith("acme/") for r in judged)


# ----------------------------------------------------------------------------- bad input at submit
BAD_SUBMITS = [
    ({"ad_copy": "Sale\x00 now"}, "NUL byte"),
    ({"ad_copy": "Sale \udcff\udcfe"}, "not valid UTF-8"),
    ({"ad_copy": ""}, "empty"),
    ({"ad_copy": " \n\t "}, "empty"),
    ({"ad_copy": "x" * 2001}, "the limit is 2000"),
    ({"tenant": "../beta"}, "invalid tenant id"),
    ({"tenant": "acme\x00"}, "invalid tenant id"),
    ({"tenant": ""}, "invalid tenant id"),
    ({"tenant": "a" * 256}, "invalid tenant id"),
    ({"tenant": "acme'; DROP TABLE jobs; --"}, "invalid tenant id"),
    ({"variants": 0}, "at least one variant"),
]


@pytest.mark.parametrize("bad,message", BAD_SUBMITS, ids=[m for _, m in BAD_SUBMITS])
def test_submit_refuses_bad_input_whole(conn, home, tiny_png, bad, message):
    before, files = counts(conn), stored_files(home)
    args = {"ad_copy": "Fresh coffee", "tenant": "acme", "variants": 2, **bad}
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        submit_job(conn, open_store(), [tiny_png], args.pop("ad_copy"), **args)
    assert counts(conn) == before and stored_files(home) == files


def test_cli_refuses_bad_input_with_exit_code_2_and_writes_nothing(conn, db_url, home, tiny_png):
    env = {"DATABASE_URL": db_url}
    before, files = counts(conn), stored_files(home)
    job = str(uuid.uuid4())
    cases = [
        (["submit", str(tiny_png), "--copy", b"Sale \xff\xfe today"], "not valid UTF-8"),
        (["submit", str(tiny_png), "--copy", ""], "ad copy is empty"),
        (["submit", str(tiny_png), "--copy", "Sale", "--tenant", "../beta"], "invalid tenant id"),
        (["submit", str(tiny_png), "--copy", "Sale", "--tenant", b"ac\xffme"], "invalid tenant id"),
        (["status", "1 OR 1=1"], "is not a UUID"),
        (["run-stage", "not-a-uuid", "planner"], "is not a UUID"),
        (["run-stage", job, "planner; DROP TABLE jobs"], "unknown stage"),
        (["replay-failed", "--stage", "x' OR '1'='1"], "unknown stage"),
        (["replay-failed", "--job", "'; --"], "is not a UUID"),
        (["workers", "start", "--registry", FAULT_REGISTRY, "--stages", "planner;rm -rf"], "unknown stage"),
    ]
    for args, message in cases:
        done = cli(*args, env=env)
        assert done.returncode == 2, (args, done.returncode, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
    assert counts(conn) == before and stored_files(home) == files


# ----------------------------------------------------------------------------- SQL
SQL_CALLS = {"execute", "executemany"}


def constant_sql(node: ast.AST) -> bool:
    """A literal, a name (a module constant or a local holding a literal), a concatenation of
    those, or an f-string over UPPER_CASE module constants only (column lists, channel names:
    LISTEN cannot take a parameter). Never a value from outside."""
    if isinstance(node, (ast.Constant, ast.Name, ast.Attribute)):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return constant_sql(node.left) and constant_sql(node.right)
    if isinstance(node, ast.JoinedStr):
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                name = ast.unparse(part.value).rsplit(".", 1)[-1]
                if not (isinstance(part.value, (ast.Name, ast.Attribute)) and name.isupper()):
                    return False
        return True
    return False


def test_every_query_is_parameterised():
    """No SQL built from values: every execute() in the engine takes constant SQL (see
    constant_sql) and passes values as parameters."""
    offenders = []
    sources = [ROOT / "cli.py", *sorted((ROOT / "outbox").rglob("*.py")), *sorted((ROOT / "workers").rglob("*.py")),
               *sorted((ROOT / "console").rglob("*.py"))]
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SQL_CALLS and node.args):
                continue
            query = node.args[0]
            if constant_sql(query):
                continue
            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(query)[:100]}")
    assert not offenders, "\n".join(offenders)


# ----------------------------------------------------------------------------- roles
def run_sql_file(url: str, name: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute((ROOT / "deploy" / "sql" / name).read_text())


def test_worker_runs_with_the_restricted_role(pg_server, home, tiny_png, tmp_path):
    """deploy/sql/: the schema migrated by adflow_migrator (not a superuser), a worker logged in
    as adflow_worker, which has only worker_grants.sql's grants, runs jobs to the end (success,
    retry, permanent failure, fan-in) and can neither change the schema nor delete anything."""
    from outbox import migrate

    base = pg_server.url.rsplit("/", 1)[0]  # postgresql://postgres@127.0.0.1:PORT
    name = f"roles_{uuid.uuid4().hex[:8]}"
    run_sql_file(pg_server.url, "roles.sql")
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} OWNER adflow_migrator")
    try:
        run_sql_file(f"{base}/{name}", "database.sql")
        migrator = f"{base.replace('postgres@', 'adflow_migrator@')}/{name}"
        worker_url = f"{base.replace('postgres@', 'adflow_worker@')}/{name}"
        migrate.upgrade(migrator)
        run_sql_file(migrator, "worker_grants.sql")
        with psycopg.connect(migrator, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
            store = open_store()
            jobs = [submit_job(conn, store, [tiny_png], copy, tenant="acme", variants=2).job_id
                    for copy in ("Fine", "Flaky FLAKY:planner:1", "Bad PERMANENT:overlay")]
        worker = fault_worker(worker_url, tmp_path)
        try:
            states = wait_for_jobs(migrator, jobs)
        finally:
            assert worker.stop() == 0
        assert [states[j] for j in jobs] == ["done", "done", "failed"]
        assert "permission denied" not in worker.output()
        with psycopg.connect(worker_url, autocommit=True) as as_worker:
            for statement in ("CREATE TABLE evil (i int)", "DROP TABLE stage_results", "DELETE FROM jobs",
                              "TRUNCATE stage_tasks", "ALTER TABLE jobs ADD COLUMN x int",
                              "UPDATE job_inputs SET ad_copy = 'x'", "INSERT INTO image_assets (tenant_id, uri) "
                              "VALUES ('x', 'file:/etc/passwd')", "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    as_worker.execute(statement)
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
