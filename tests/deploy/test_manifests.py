"""deploy/k8s, checked without a cluster: rendered with a Python kustomize, core resources validated
against the Kubernetes schemas kubernetes-validate ships (strict: unknown fields fail), KEDA and
Prometheus Operator objects against their documented fields; every command the manifests run
parsed by the real CLI; the pools' stages and KEDA's SQL checked against a migrated database;
probes asked of a real worker started with the manifest's own arguments."""
from __future__ import annotations

import http.client
import importlib.util
import json
import re
import time

import jsonschema
import kubernetes_validate
import pytest
import typer.main
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from outbox.db import free_port
from tests.conftest import ROOT, cli
from tests.deploy.crd_schemas import POSTGRESQL_AUTH_PARAMETERS, POSTGRESQL_METADATA, SCHEMAS
from tests.deploy.kustomize import containers, pod_spec, render
from tests.helpers import claim, insert_job
from tests.workerproc import WorkerProcess
from workers.metrics import Metrics

try:  # Typer 0.2x vendors its own click
    from typer._click.exceptions import BadParameter, UsageError
except ImportError:  # pragma: no cover - older Typer on the real click
    from click import BadParameter, UsageError

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# The oldest Kubernetes the manifests support (1.29: PDB unhealthyPodEvictionPolicy on by default),
# or the oldest schemas this kubernetes-validate ships if it dropped 1.29, and the newest.
K8S_VERSIONS = (max("1.29.0", kv_utils.all_versions()[0], key=lambda v: tuple(map(int, v.split(".")))),
                kubernetes_validate.latest_version())
HEALTH_PATHS = {"/healthz", "/readyz"}
WORKER_POOLS = {"workers-cpu", "workers-gpu"}
# Deployments that are not worker pools, each checked by its own tests (console: tests/test_console_web.py).
OTHER_DEPLOYMENTS = {"console"}
DEVICE_STAGES_SQL = "SELECT stage FROM stage_graph WHERE device = %s ORDER BY position"


def all_renders() -> dict[str, list[dict]]:
    renders = {name: render(K8S / "overlays" / name) for name in OVERLAYS}
    renders["jobs"] = render(K8S / "jobs")
    return renders


RENDERS = all_renders()


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def command_of(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def worker_container(deployment: dict) -> dict:
    [c] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"]
    return c


def k8s_subschema_validator(name: str, version: str) -> jsonschema.protocols.Validator:
    """A validator for one Kubernetes type (e.g. horizontalpodautoscalerbehavior-autoscaling-v2) from
    the schemas kubernetes-validate ships, strict, for fields embedded in custom resources."""
    version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= kv_utils.major_minor(version)][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{name}.json", version)
    defs = kv_utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ----------------------------------------------------------------- rendering and schemas
def test_overlays_exist_and_render():
    assert {"production", "production-hpa", "baked-models"} <= set(OVERLAYS)
    for name, resources in RENDERS.items():
        assert resources, name
        for res in resources:
            if res["kind"] != "Namespace":
                assert res["metadata"].get("namespace") == "adflow", (name, res["kind"], res["metadata"]["name"])
    for name in OVERLAYS:
        kinds = {r["kind"] for r in RENDERS[name]}
        assert {"Namespace", "ConfigMap", "Job", "Deployment", "PodDisruptionBudget"} <= kinds, name
        assert set(by_kind(RENDERS[name], "Deployment")) == WORKER_POOLS | OTHER_DEPLOYMENTS


@pytest.mark.parametrize("overlay", sorted(RENDERS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_resources_valid_against_kubernetes_schemas(overlay, version):
    checked = 0
    for res in RENDERS[overlay]:
        if (res["apiVersion"], res["kind"]) in SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(res, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {res['kind']}/{res['metadata']['name']} invalid for Kubernetes {version}: "
                        f"{exc.caught.message} at {list(exc.caught.absolute_path)}")
        checked += 1
    assert checked >= (1 if overlay == "jobs" else 8)


def test_strict_validation_would_catch_a_typo():
    deployment = json.loads(json.dumps(by_kind(RENDERS["production"], "Deployment")["workers-gpu"]))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 360
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_valid_against_their_documented_fields(overlay):
    behavior = k8s_subschema_validator("horizontalpodautoscalerbehavior-autoscaling-v2", K8S_VERSIONS[0])
    selector = k8s_subschema_validator("labelselector-meta-v1", K8S_VERSIONS[0])
    custom = [r for r in RENDERS[overlay] if (r["apiVersion"], r["kind"]) in SCHEMAS]
    assert {r["kind"] for r in custom} >= {"PodMonitor", "PrometheusRule"}
    for res in custom:
        jsonschema.validate(res, SCHEMAS[(res["apiVersion"], res["kind"])])
        if res["kind"] == "ScaledObject":
            hpa = res["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {})
            if "behavior" in hpa:
                behavior.validate(hpa["behavior"])
            for trigger in res["spec"]["triggers"]:
                assert trigger["type"] == "postgresql"
                assert set(trigger["metadata"]) <= POSTGRESQL_METADATA
                assert {"query", "targetQueryValue"} <= set(trigger["metadata"])
                assert float(trigger["metadata"]["targetQueryValue"]) > 0
        if res["kind"] == "TriggerAuthentication":
            assert {ref["parameter"] for ref in res["spec"]["secretTargetRef"]} <= POSTGRESQL_AUTH_PARAMETERS
        if res["kind"] == "PodMonitor":
            selector.validate(res["spec"]["selector"])


# ----------------------------------------------------------------- what the resources say
@pytest.mark.parametrize("overlay", sorted(RENDERS))
def test_pods_are_locked_down(overlay):
    for res in RENDERS[overlay]:
        spec = pod_spec(res)
        if spec is None:
            continue
        name = f"{overlay}: {res['kind']}/{res['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(res):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert {"requests", "limits"} <= set(c["resources"]), (name, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (name, c["name"], "writable /tmp")
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, mount)
            assert re.fullmatch(r"[\w.-]+(/[\w.-]+)+:[\w.-]+", c["image"]), (name, c["image"], "image not set by the overlay")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(overlay):
    resources = RENDERS[overlay]
    config_maps, pvcs = by_kind(resources, "ConfigMap"), by_kind(resources, "PersistentVolumeClaim")
    accounts, deployments = by_kind(resources, "ServiceAccount"), by_kind(resources, "Deployment")
    for res in resources:
        spec = pod_spec(res)
        if spec is None:
            continue
        if "serviceAccountName" in spec:
            assert spec["serviceAccountName"] in accounts
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in pvcs, volume
        for c in containers(res):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            env = {e["name"]: e for e in c.get("env", [])}
            # The one Secret the user creates: DATABASE_URL (and optionally LISTEN_DATABASE_URL).
            ref = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("adflow-db", "DATABASE_URL") or res["metadata"]["name"] == "adflow-fetch-models"
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdbs = by_kind(resources, "PodDisruptionBudget")
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["maxUnavailable"] == 1
    for kind in ("ScaledObject", "HorizontalPodAutoscaler"):
        for res in by_kind(resources, kind).values():
            assert res["spec"]["scaleTargetRef"]["name"] in deployments
            assert res["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    for auth in by_kind(resources, "TriggerAuthentication").values():
        assert {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {("adflow-db", "DATABASE_URL")}
    for scaled in by_kind(resources, "ScaledObject").values():
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["authenticationRef"]["name"] in by_kind(resources, "TriggerAuthentication")
    for monitor in by_kind(resources, "PodMonitor").values():
        for deployment in (d for name, d in deployments.items() if name in WORKER_POOLS):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
            ports = {p["name"] for p in worker_container(deployment)["ports"]}
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def test_scaling_choices():
    prod = RENDERS["production"]
    scaled = by_kind(prod, "ScaledObject")
    assert set(scaled) == {"workers-cpu", "workers-gpu"}
    assert scaled["workers-gpu"]["spec"]["minReplicaCount"] == 0  # the GPU pool scales to zero
    assert scaled["workers-cpu"]["spec"]["minReplicaCount"] >= 1  # someone always listens
    assert not by_kind(prod, "HorizontalPodAutoscaler")  # KEDA owns the HPAs it creates
    hpa = RENDERS["production-hpa"]
    assert set(by_kind(hpa, "HorizontalPodAutoscaler")) == {"workers-cpu", "workers-gpu"} and not by_kind(hpa, "ScaledObject")
    baked = RENDERS["baked-models"]
    assert "adflow-models" not in by_kind(baked, "PersistentVolumeClaim")
    for deployment in by_kind(baked, "Deployment").values():
        assert "models" not in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert all(c["image"].endswith("-baked") for c in containers(deployment))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_and_cpu_pools(overlay):
    deployments = by_kind(RENDERS[overlay], "Deployment")
    gpu, cpu = deployments["workers-gpu"], deployments["workers-cpu"]
    gpu_argv, cpu_argv = command_of(worker_container(gpu)), command_of(worker_container(cpu))
    assert gpu_argv[:2] == ["workers", "start"] and "--gpu" in gpu_argv
    assert cpu_argv[:2] == ["workers", "start"] and "--gpu" not in cpu_argv
    resources = worker_container(gpu)["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1" and str(resources["requests"]["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in worker_container(cpu)["resources"]["limits"]
    spec = gpu["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    for deployment in (gpu, cpu):
        spec = deployment["spec"]["template"]["spec"]
        worker = worker_container(deployment)
        argv = command_of(worker)
        # The probes and the port the worker serves them on agree.
        host, port = option(argv, "--health-addr").rsplit(":", 1)
        assert host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = worker[probe]["httpGet"]
            assert ports[get["port"]] == int(port)
            assert get["path"] in HEALTH_PATHS
        assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
        # No rollout starts a pod before the migration Job has landed.
        [init] = spec["initContainers"]
        assert command_of(init)[:4] == ["python", "cli.py", "db", "check"]
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ----------------------------------------------------------------- commands
def parse_click(app, prog: str, args: list[str]):
    """Parses `args` with the real Typer app, down to the leaf command, without running it:
    unknown commands or options, and values out of range, raise."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context(prog, list(args))
    while hasattr(cmd, "resolve_command"):  # a group: down to the subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def check_command(argv: list[str]) -> str:
    """Checks that a container's command exists here and accepts its arguments; returns its name."""
    if argv[0] == "workers":
        from workers.cli import app

        ctx = parse_click(app, "workers", argv[1:])
        return f"workers {ctx.info_name}"
    if argv[:2] == ["python", "cli.py"]:
        import cli

        ctx = parse_click(cli.app, "cli.py", argv[2:])
        return f"cli.py {ctx.parent.info_name + ' ' if ctx.parent and ctx.parent.parent else ''}{ctx.info_name}"
    if argv[0] == "python" and argv[1].endswith(".py"):
        path = ROOT / argv[1]
        assert path.is_file(), argv
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.build_parser().parse_args(argv[2:])
        return argv[1]
    raise AssertionError(f"a command this test does not know how to check: {argv}")


def test_every_command_the_manifests_run_exists():
    seen = set()
    for resources in RENDERS.values():
        for res in resources:
            for c in containers(res):
                argv = command_of(c)
                assert argv, f"{res['metadata']['name']}/{c['name']}: no command (the image's CMD is not checked here)"
                seen.add(check_command(argv))
    assert seen == {"workers start", "cli.py db upgrade", "cli.py db check", "cli.py prune", "cli.py console",
                    "deploy/docker/fetch_models.py"}


def test_a_wrong_command_is_caught():
    with pytest.raises(UsageError):
        check_command(["workers", "start", "--gpus"])
    with pytest.raises(UsageError):
        check_command(["python", "cli.py", "db", "migrate"])
    with pytest.raises(BadParameter):
        check_command(["workers", "start", "--concurrency", "0"])


def test_db_check_waits_for_the_migration(pg_server, db_url, tmp_path):
    ok = cli("db", "check", env={"DATABASE_URL": db_url})
    assert ok.returncode == 0 and "(head)" in ok.stdout
    import psycopg

    empty = db_url.rsplit("/", 1)[0] + "/t_empty_" + str(free_port())
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {empty.rsplit('/', 1)[1]}")
    try:
        started = time.monotonic()
        missing = cli("db", "check", "--wait", "1", env={"DATABASE_URL": empty})
        assert missing.returncode == 4 and "schema missing" in missing.stderr and "db upgrade" in missing.stderr
        assert 1 <= time.monotonic() - started < 30
    finally:
        with psycopg.connect(pg_server.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {empty.rsplit('/', 1)[1]} WITH (FORCE)")


# ----------------------------------------------------------------- against the database
def keda_queries() -> dict[str, str]:
    return {name: so["spec"]["triggers"][0]["metadata"]["query"]
            for name, so in by_kind(RENDERS["production"], "ScaledObject").items()}


def stage_list(query: str) -> list[str]:
    lists = set(re.findall(r"ANY \('\{([a-z_,]+)\}'::text\[\]\)", query))
    assert len(lists) == 1, query
    return lists.pop().split(",")


def test_pools_cover_the_stage_graph_by_device(conn):
    graph = {device: [r["stage"] for r in conn.execute(DEVICE_STAGES_SQL, (device,))] for device in ("cpu", "gpu")}
    assert graph["gpu"] == ["vlm_analyze", "yolo_detect", "vlm_judge"]
    for overlay in OVERLAYS:
        deployments = by_kind(RENDERS[overlay], "Deployment")
        for pool, device in (("workers-cpu", "cpu"), ("workers-gpu", "gpu")):
            argv = command_of(worker_container(deployments[pool]))
            assert option(argv, "--stages").split(",") == graph[device], (overlay, pool)
    for pool, query in keda_queries().items():
        assert stage_list(query) == graph["gpu" if pool == "workers-gpu" else "cpu"]
    [gpu_hpa] = [h for n, h in by_kind(RENDERS["production-hpa"], "HorizontalPodAutoscaler").items() if n == "workers-gpu"]
    [expr] = gpu_hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchExpressions"]
    assert expr["values"] == graph["gpu"]


def test_termination_grace_covers_the_longest_stage(conn):
    longest = conn.execute("SELECT max(timeout_s) AS s FROM stage_graph").fetchone()["s"]
    for overlay in OVERLAYS:
        for name, deployment in by_kind(RENDERS[overlay], "Deployment").items():
            if name not in WORKER_POOLS:
                continue
            grace = float(option(command_of(worker_container(deployment)), "--grace"))
            termination = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert longest <= grace < termination, (overlay, deployment["metadata"]["name"], longest, grace, termination)
            assert termination - grace >= 15  # time to hand back and exit before SIGKILL


def test_keda_queries_count_each_pools_work(conn):
    queries = keda_queries()

    def count(pool):
        return list(conn.execute(queries[pool]).fetchone().values())[0]

    assert count("workers-gpu") == 0 and count("workers-cpu") == 0
    insert_job(conn, variants=3)  # three vlm_analyze tasks queued
    assert count("workers-gpu") == 3 and count("workers-cpu") == 0
    [task] = claim(conn, "w1", stages=["vlm_analyze"], limit=1)
    assert count("workers-gpu") == 3  # two claimable + one running: the pool does not shrink under it
    conn.execute("UPDATE stage_tasks SET run_after = now() + interval '1 hour' WHERE status = 'queued' "
                 "AND id = (SELECT min(id) FROM stage_tasks WHERE status = 'queued')")
    assert count("workers-gpu") == 2  # a retry waiting for its backoff is not claimable yet
    conn.execute("UPDATE stage_tasks SET status = 'done', finished_at = now(), lease_owner = NULL WHERE id = %s",
                 (task["id"],))
    assert count("workers-gpu") == 1


def test_keda_queries_read_the_claimable_index_not_the_table(conn):
    """With many finished tasks (what a long-running table looks like), the planner answers the
    scaler's query from the partial indexes, never by scanning stage_tasks."""
    job_id, _ = insert_job(conn, variants=1, step=None, status="queued")
    conn.execute("UPDATE jobs SET expected_variants = 3001 WHERE job_id = %s", (job_id,))  # the set grows
    conn.execute("""
        INSERT INTO jobs_variants (job_variants_id, job_id, creation_order, status)
        SELECT gen_random_uuid(), %s, g, 'queued' FROM generate_series(2, 3001) g""", (job_id,))
    conn.execute("""
        INSERT INTO stage_tasks (job_id, job_variants_id, stage, status, attempts, max_attempts, finished_at)
        SELECT v.job_id, v.job_variants_id, g.stage, 'done', 1, 3, now()
        FROM jobs_variants v CROSS JOIN stage_graph g WHERE v.job_id = %s AND g.level = 'variant'""", (job_id,))
    conn.execute("ANALYZE stage_tasks")
    for pool, query in keda_queries().items():
        plan = json.dumps(conn.execute("EXPLAIN (FORMAT JSON) " + query).fetchone())
        assert "stage_tasks_claimable_idx" in plan, (pool, plan)
        assert "stage_tasks_running_lease_idx" in plan, (pool, plan)
        assert '"Seq Scan"' not in plan, (pool, plan)


# ----------------------------------------------------------------- a real worker, the manifests' arguments
def test_probe_paths_answer_on_a_worker_started_with_the_manifest_arguments(db_url, home, tmp_path):
    deployments = by_kind(RENDERS["production"], "Deployment")
    for name in ("workers-cpu", "workers-gpu"):
        container = worker_container(deployments[name])
        argv = command_of(container)
        port = free_port()
        argv[argv.index("--health-addr") + 1] = f"127.0.0.1:{port}"
        worker = WorkerProcess(db_url, tmp_path / f"{name}.log", *argv[2:])
        try:
            worker.wait_ready()
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = container[probe]["httpGet"]["path"]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", path)
                assert conn.getresponse().status == 200, (name, probe, path, worker.output())
                conn.close()
        finally:
            assert worker.stop() == 0, worker.output()


# ----------------------------------------------------------------- monitoring
def exposed_metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(adflow_[a-z_]+)\b", expr))


def check_promql(expr: str) -> None:
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}") and expr.count("[") == expr.count("]"), expr
    names = promql_metric_names(expr)
    assert names, expr
    unknown = names - exposed_metric_names()
    assert not unknown, f"{expr}: no such metric {unknown}"


def test_alert_rules_cover_stuck_queue_failures_and_no_listener():
    [rule] = by_kind(RENDERS["production"], "PrometheusRule").values()
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"AdflowQueueStuck", "AdflowHighFailureRate", "AdflowNoListener"} <= set(alerts)
    for alert in alerts.values():
        check_promql(alert["expr"])
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert "adflow_queue_oldest_age_seconds" in alerts["AdflowQueueStuck"]["expr"]
    assert "adflow_listener_connected" in alerts["AdflowNoListener"]["expr"]
    assert "adflow_tasks_failed_total" in alerts["AdflowHighFailureRate"]["expr"]


def test_grafana_dashboard_shows_the_worker_metrics():
    path = K8S / "components" / "monitoring" / "adflow-dashboard.json"
    dashboard = json.loads(path.read_text())
    [cm] = list(by_kind(RENDERS["production"], "ConfigMap")["adflow-grafana-dashboard"]["data"].values())
    assert json.loads(cm) == dashboard
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set()
    for expr in exprs:
        check_promql(expr.replace('pool=~"$pool"', 'pool=~".*"'))
        used |= promql_metric_names(expr)
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in used}
    wanted = {"adflow_tasks_claimed", "adflow_tasks_completed", "adflow_tasks_failed", "adflow_task_retries",
              "adflow_stage_duration_seconds", "adflow_lease_losses", "adflow_listener_reconnects",
              "adflow_notifications_received", "adflow_queue_depth", "adflow_queue_oldest_age_seconds",
              "adflow_gpu_memory_allocated_bytes", "adflow_listener_connected"}
    assert wanted <= families, wanted - families
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_doc_covers_the_runbook():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for heading in ("Deploying", "Scaling", "Upgrading", "Draining a node", "Replaying failures",
                    "Reading the dashboard", "Alerts"):
        assert re.search(rf"^#+ .*{heading}", doc, re.M | re.I), heading
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in doc
    for query in keda_queries().values():
        assert stage_list(query)[0] in doc
