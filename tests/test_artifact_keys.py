"""Artifact keys are built and parsed in one place (outbox.artifacts.parse_key), by segment: every
store refuses the same bad keys, the worker compares a key's tenant segment for equality (not a
prefix), and bad keys, bad tenants and bad asset uris fail a task at its first attempt, permanently,
with a message that names them (issue 12, item 4)."""
from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image

from outbox import artifacts
from outbox.artifacts import (FileStore, FsspecStore, InvalidKey, InvalidTenant, PostgresStore, TenantMismatch,
                              artifact_key, asset_key, check_key_tenant, check_tenant, parse_key)
from outbox.queue import ClaimedTask
from stages.contract import PermanentStageError, StageOutput, StageSpec, one_at_a_time
from outbox.completion import Completion
from workers.runner import TaskRunner

JOB, VARIANT, ASSET = str(uuid.UUID(int=1)), str(uuid.UUID(int=2)), str(uuid.UUID(int=3))
BAD_TENANTS = ["", "acme/evil", "../acme", ".acme", "-acme", "acme'; --", 'ac"me', "ac me", "acmé", "租户",
               "acme\x00", "acme\\evil", "a" * 256, None, 42]
# Every way a key can try to leave its place, each refused by every store.
BAD_KEYS = [
    "", "/", "/abs/key", f"/acme/{JOB}/job/planner/a1/x.bin", "a//b", f"acme//{JOB}/job/planner/a1/x.bin",
    f"acme/{JOB}/job/planner/a1/x.bin/", "../etc/passwd", f"acme/{JOB}/../../../etc/passwd",
    f"acme/assets/{ASSET}/..", "acme/assets/./x.png", f"acme/assets/{ASSET}/.hidden", "acme\\..\\evil",
    f"acme/assets/{ASSET}/a\\b.png", f"acme/assets/{ASSET}/x\x00.png", f"acme/assets/{ASSET}/a b.png",
    f"acmé/assets/{ASSET}/x.png", f"acme/assets/{ASSET}/{'x' * 256}", "acme/evil/x.png",
    f"acme/evil/{JOB}/job/planner/a1/x.bin", f"acme/{JOB}/job/planner/1/x.bin", f"acme/{JOB}/nope/planner/a1/x",
    "acme", f"acme/assets/{ASSET}", None, b"acme/assets/x/y",
]


# ----------------------------------------------------------------------------- one parser
def test_keys_are_built_and_parsed_by_segment():
    key = artifact_key("acme", JOB, VARIANT, "overlay", 2, "overlay.png")
    parts = parse_key(key)
    assert (parts.tenant, parts.kind, parts.key) == ("acme", "artifact", key)
    assert parts.segments == ("acme", JOB, VARIANT, "overlay", "a2", "overlay.png")
    assert parse_key(artifact_key("acme", JOB, None, "ad_copy_gen_kor", 1, "x.bin")).segments[2] == "job"
    asset = asset_key("acme", ASSET, "../../My Photo (1).PNG")
    assert asset == f"acme/assets/{ASSET}/My_Photo__1_.PNG"
    assert parse_key(asset).kind == "asset"
    assert asset_key("acme", ASSET, "...") == f"acme/assets/{ASSET}/image"
    long = asset_key("acme", ASSET, "x" * 400 + ".jpeg")
    assert long.endswith(".jpeg") and len(long.rsplit("/", 1)[1]) <= 200


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_keys_are_refused_by_the_parser(bad):
    with pytest.raises(InvalidKey, match="invalid artifact key"):
        parse_key(bad)


@pytest.mark.parametrize("bad", BAD_TENANTS, ids=repr)
def test_bad_tenants_are_refused_everywhere_a_key_is_built(bad):
    with pytest.raises(InvalidTenant, match="invalid tenant id"):
        check_tenant(bad)
    with pytest.raises(InvalidKey):
        artifact_key(bad, JOB, VARIANT, "overlay", 1, "overlay.png")
    with pytest.raises(InvalidKey):
        asset_key(bad, ASSET, "x.png")


def test_the_tenant_rule_is_the_one_jobs_use():
    from outbox import jobs

    assert jobs.TENANT_PATTERN is artifacts.TENANT_PATTERN
    with pytest.raises(jobs.InvalidInput, match="invalid tenant id 'acme/evil'"):
        jobs.validate_tenant("acme/evil")
    assert jobs.validate_tenant("acme.eu-1_x") == "acme.eu-1_x"


def test_tenant_is_compared_by_segment_not_prefix():
    """acme may not read keys that merely start with 'acme': not acme.x's, not acmecorp's, and not
    'acme/evil/...' (which a tenant 'acme/evil' would have written under a prefix scheme)."""
    own = artifact_key("acme", JOB, VARIANT, "overlay", 1, "overlay.png")
    assert check_key_tenant(own, "acme").tenant == "acme"
    for key in (artifact_key("acme.x", JOB, VARIANT, "overlay", 1, "o.png"), f"acmecorp/assets/{ASSET}/x.png"):
        with pytest.raises(TenantMismatch, match="belongs to another tenant"):
            check_key_tenant(key, "acme")
    with pytest.raises(InvalidKey):
        check_key_tenant(f"acme/evil/{JOB}/job/planner/a1/x.bin", "acme")
    with pytest.raises(InvalidTenant):
        check_key_tenant(own, "acme/evil")


# ----------------------------------------------------------------------------- every store
@pytest.fixture(params=["file", "postgres", "memory"])
def store(request, tmp_path):
    if request.param == "file":
        yield FileStore(tmp_path / "artifacts")
    elif request.param == "postgres":
        s = PostgresStore(request.getfixturevalue("db_url"))
        yield s
        s.close()
    else:
        yield FsspecStore(f"memory://adflow-{uuid.uuid4().hex}")


def test_every_store_refuses_every_bad_key(store, tmp_path):
    for bad in BAD_KEYS:
        with pytest.raises(InvalidKey):
            store.put(bad, b"x")
        with pytest.raises(InvalidKey):
            store.get(bad)
        if not isinstance(store, PostgresStore):  # its exact-match DELETE stays open to prune
            with pytest.raises(InvalidKey):
                store.delete(bad)
    assert list(store.keys()) == []
    assert not (tmp_path / "etc").exists()


# ----------------------------------------------------------------------------- the worker
def task(tenant="acme", uri=None, asset_tenant=None, stage="vlm_analyze", attempt=1) -> ClaimedTask:
    return ClaimedTask(id=1, job_id=JOB, variant_id=VARIANT, stage=stage, attempt=attempt, max_attempts=3,
                       tenant_id=tenant, inputs={"ad_copy": "Sale", "img_asset_id": ASSET,
                                                 "asset_uri": uri or f"{tenant}/assets/{ASSET}/x.png",
                                                 "asset_tenant": tenant if asset_tenant is None else asset_tenant,
                                                 "results": {}, "variants": {}})


@pytest.fixture
def runner(tmp_path):
    store = FileStore(tmp_path / "artifacts")
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, "PNG")
    store.put(f"acme/assets/{ASSET}/x.png", png.getvalue())
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "ok.png").write_bytes(png.getvalue())
    (tmp_path / "outside.png").write_bytes(png.getvalue())
    (tmp_path / "assets" / "link.png").symlink_to(tmp_path / "outside.png")
    return TaskRunner(store, tmp_path / "assets")


def never_runs(inp):
    raise AssertionError("the stage must not run")


@pytest.mark.parametrize("tenant", ["", "acme'evil", "acme/evil", "ünïcode", "a" * 256, "acme\\x"], ids=repr)
def test_a_bad_tenant_fails_before_any_stage_runs(runner, tenant):
    """A tenant written by plain SQL (rows from before the CHECK constraint) fails at input
    loading, permanently: vlm_analyze attempt 1, never overlay after 3 attempts."""
    [outcome] = runner.run(StageSpec("vlm_analyze", one_at_a_time(never_runs)), [task(tenant)])
    assert isinstance(outcome, PermanentStageError)
    assert f"job {JOB} has an invalid tenant id {tenant!r}" in str(outcome) and "refused" in str(outcome)


BAD_ASSET_URIS = [
    ("file:../x", "outside the asset root: refused"),
    ("file:../outside.png", "outside the asset root: refused"),
    ("file:link.png", "outside the asset root: refused"),  # a symlink out of the root
    ("file:/etc/passwd", "not a relative path under the asset root"),
    ("file:", "not a relative path under the asset root"),
    ("file:a\\..\\..\\x", "not a relative path"),
    ("file:.", "is a directory"),
    ("file:missing.png", "image file missing: 'missing.png'"),
    (f"acme/assets/{ASSET}/../../../etc/passwd", "invalid artifact key"),
    (f"acme/assets/{ASSET}/nothere.png", "artifact not found"),
    ("acme/evil/x.png", "invalid artifact key"),
    (f"beta/assets/{ASSET}/x.png", "belongs to another tenant"),
]


@pytest.mark.parametrize("uri,message", BAD_ASSET_URIS, ids=[repr(u) for u, _ in BAD_ASSET_URIS])
def test_bad_asset_uris_fail_at_the_first_attempt(runner, uri, message):
    [outcome] = runner.run(StageSpec("vlm_analyze", one_at_a_time(never_runs)), [task(uri=uri)])
    assert isinstance(outcome, PermanentStageError), outcome
    assert message in str(outcome)


def test_good_assets_are_read(runner):
    seen = []

    def stage(inp):
        seen.append(len(inp.image))
        return StageOutput({"ok": True})

    spec = StageSpec("vlm_analyze", one_at_a_time(stage))
    outcomes = runner.run(spec, [task(), task(uri="file:ok.png")])
    assert all(isinstance(o, Completion) for o in outcomes) and len(seen) == 2 and seen[0] == seen[1]


@pytest.mark.parametrize("key,message", [
    (f"acme/evil/{JOB}/job/planner/a1/x.bin", "invalid artifact key"),
    (f"acme.x/{JOB}/job/planner/a1/x.bin", "belongs to another tenant: refused"),
    (f"acme/{JOB}/../../etc/passwd", "invalid artifact key"),
    (f"/acme/assets/{ASSET}/x.png", "invalid artifact key"),
])
def test_a_stage_reading_a_bad_key_fails_permanently(runner, key, message):
    def stage(inp):
        inp.read_artifact(key)
        return StageOutput({})

    [outcome] = runner.run(StageSpec("vlm_judge", one_at_a_time(stage)), [task(stage="vlm_judge")])
    assert isinstance(outcome, PermanentStageError) and message in str(outcome)
    assert repr(key)[1:-1] in str(outcome)  # the message names the key


@pytest.mark.parametrize("name", ["../escape.png", "sub/dir.png", "", ".hidden", "a\x00b"], ids=repr)
def test_a_stage_returning_a_bad_artifact_name_fails_permanently(runner, name):
    spec = StageSpec("overlay", one_at_a_time(lambda inp: StageOutput({}, {name: b"x"})))
    [outcome] = runner.run(spec, [task(stage="overlay")])
    assert isinstance(outcome, PermanentStageError), outcome
    assert "returned an artifact that cannot be stored" in str(outcome) and "invalid artifact key" in str(outcome)


# ----------------------------------------------------------------------------- the report
def test_the_report_reader_uses_the_same_checks(runner, tmp_path):
    from outbox.report import asset_reader

    read = asset_reader(runner.store, tmp_path / "assets", "acme")
    assert read(f"acme/assets/{ASSET}/x.png") and read("file:ok.png")
    for uri, error in [("file:../outside.png", InvalidKey), ("file:link.png", InvalidKey),
                       (f"beta/assets/{ASSET}/x.png", TenantMismatch), ("acme/evil/x.png", InvalidKey),
                       (f"acme/assets/{ASSET}/../../x", InvalidKey)]:
        with pytest.raises(error):
            read(uri)


# ----------------------------------------------------------------------------- through a worker
def test_a_job_with_a_bad_tenant_fails_at_vlm_analyze_attempt_1(conn, db_url, home, tiny_png, tmp_path):
    """Rows written by plain SQL before the CHECK constraint on jobs.tenant_id existed: the
    constraints on tenant_id are dropped here to plant them. A job of tenant "acme'x" fails at vlm_analyze at
    its first attempt, and so does a variant whose asset key climbs out with '..'."""
    from outbox.artifacts import open_store
    from outbox.jobs import submit_job
    from tests.test_security import fault_worker
    from tests.workerproc import wait_for_jobs

    conn.execute("""DO $$ DECLARE c record; BEGIN
        FOR c IN SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
                 WHERE contype = 'c' AND pg_get_constraintdef(oid) LIKE '%tenant_id%' LOOP
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname); END LOOP; END $$""")
    good = submit_job(conn, open_store(), [tiny_png], "Acme", tenant="acme", variants=1)
    bad_tenant = "acme'x"
    asset = conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES (%s, %s) RETURNING image_asset_id",
                         (bad_tenant, f"{bad_tenant}/assets/{ASSET}/x.png")).fetchone()["image_asset_id"]
    climb = conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES ('acme', %s) RETURNING image_asset_id",
                         (f"acme/assets/{ASSET}/../../../etc/passwd",)).fetchone()["image_asset_id"]
    bad_job, climb_job = str(uuid.uuid4()), str(uuid.uuid4())
    planted = {}
    with conn.transaction():  # as submit_job writes a job: with its variants, in one transaction
        for job, tenant, asset_id, order in ((bad_job, bad_tenant, asset, 1), (climb_job, "acme", climb, 1)):
            conn.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step) "
                         "VALUES (%s, %s, 'running', 'img_gen')", (job, tenant))
            conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'x')", (job,))
            vid = str(uuid.uuid4())
            conn.execute("INSERT INTO jobs_variants (job_variants_id, job_id, img_asset_id, creation_order, status, "
                         "current_step) VALUES (%s, %s, %s, %s, 'done', 'img_gen')", (vid, job, asset_id, order))
            planted[vid] = job
    worker = fault_worker(db_url, tmp_path)
    try:
        states = wait_for_jobs(db_url, [good.job_id, bad_job, climb_job])
    finally:
        assert worker.stop() == 0
    assert states == {good.job_id: "done", bad_job: "failed", climb_job: "failed"}
    rows = {r["vid"]: r for r in conn.execute(
        "SELECT job_variants_id::text AS vid, stage, status, attempts, last_error FROM stage_tasks "
        "WHERE job_variants_id = ANY (%s::uuid[])", (list(planted),))}
    bad_variant, climb_variant = list(planted)
    for vid in planted:
        assert (rows[vid]["stage"], rows[vid]["status"], rows[vid]["attempts"]) == ("vlm_analyze", "failed", 1)
    assert f"has an invalid tenant id {bad_tenant!r}" in rows[bad_variant]["last_error"]
    assert "invalid artifact key" in rows[climb_variant]["last_error"]
    assert "../../../etc/passwd" in rows[climb_variant]["last_error"]
