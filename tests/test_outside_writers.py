"""What an outside tool can do with plain SQL, and that none of it leaves a job stuck (issue 12):
every (current_step, status) write on a variant and on a job, variants committed one at a time,
a cancel that died half-way, tenants the CLI would refuse, and a rescued task's place."""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest

from outbox.jobs import cancel_job
from tests.conftest import cli
from tests.helpers import claim, complete, fail, insert_job
from tests.workerproc import WorkerProcess

VARIANT_STAGES = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
                  "iou_eval"]
# Steps an outside writer may write: none, the generator's and another tool's own, and ours.
STEPS = [None, "img_gen", "user_img_input", "vlm_analyze", "planner", "iou_eval", "ad_copy_gen_kor",
         "instagram_feed_gen"]
STATUSES = ["queued", "running", "done", "failed", "cancelled"]


def job_state(conn, job_id) -> tuple[str, str]:
    row = conn.execute("SELECT current_step, status FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
    return row["current_step"], row["status"]


def finished(state: tuple[str, str]) -> bool:
    return state == ("instagram_feed_gen", "done") or state[1] in ("failed", "cancelled")


def outside_write(conn, table: str, key: str, row_id: str, step, status) -> str:
    """One plain UPDATE, as psql would send it: 'accepted' or 'refused' (the trigger's error
    must name the row)."""
    try:
        with conn.transaction():
            conn.execute(f"UPDATE {table} SET current_step = %s, status = %s WHERE {key} = %s", (step, status, row_id))
        return "accepted"
    except psycopg.errors.CheckViolation as exc:
        assert row_id in str(exc)
        return "refused"


def drive(conn, job_id, rounds: int = 60) -> tuple[str, str]:
    """What the rest of the system does next: the generator signals its unstarted variants, the
    workers finish what they hold and claim and complete whatever is claimable. Returns the
    job's final state."""
    held = conn.execute("SELECT id, attempts AS attempt FROM stage_tasks WHERE job_id = %s AND status = 'running' "
                        "AND lease_owner = 'driver'", (job_id,)).fetchall()
    for task in held:
        complete(conn, task, "driver")
    for _ in range(rounds):
        with conn.transaction():
            conn.execute("UPDATE jobs_variants SET status = 'done', current_step = 'img_gen' WHERE job_id = %s "
                         "AND coalesce(current_step, '') NOT IN (SELECT stage FROM stage_graph) "
                         "AND status NOT IN ('failed', 'cancelled') "
                         "AND (status, current_step) IS DISTINCT FROM ('done', 'img_gen')", (job_id,))
        tasks = claim(conn, "driver", limit=100)
        for task in tasks:
            complete(conn, task, "driver")
        if not tasks:
            break
    return job_state(conn, job_id)


def variant_at(conn, situation: str) -> tuple[str, str, str]:
    """A two-variant job whose first variant is in `situation` and whose second is mid-way."""
    job_id, (vid, sibling) = insert_job(conn, variants=2, step="img_gen", status="running")
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (sibling,))
    if situation != "unstarted":
        conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_variants_id = %s", (vid,))
    stop_at = {"unstarted": 0, "running": 3, "failed": 3, "finished": 8}[situation]
    for _ in range(stop_at):
        for task in claim(conn, "driver", limit=100):
            if task["job_variants_id"] is not None and str(task["job_variants_id"]) == vid:
                if situation == "failed" and task["stage"] == "planner":
                    assert fail(conn, task, "driver", permanent=True) == "failed"
                else:
                    complete(conn, task, "driver")
            else:
                fail(conn, task, "driver", retry_in=3600)  # the sibling stays unfinished
    if situation == "running":
        claim(conn, "driver", limit=100)  # its fourth stage is running now
    return job_id, vid, sibling


@pytest.mark.parametrize("situation", ["unstarted", "running", "failed", "finished"])
def test_no_outside_variant_write_leaves_its_job_stuck(conn, situation):
    outcomes = {}
    for step in STEPS:
        for status in STATUSES:
            job_id, vid, _ = variant_at(conn, situation)
            outcomes[(step, status)] = outside_write(conn, "jobs_variants", "job_variants_id", vid, step, status)
            conn.execute("UPDATE stage_tasks SET run_after = now() WHERE job_id = %s AND status = 'queued'", (job_id,))
            final = drive(conn, job_id)
            assert finished(final), f"{situation} variant written ({step}, {status}): job stuck at {final}"
    if situation != "unstarted":
        # The re-signal of issue 12 (item 1) is refused; only cancel and the task's own state pass.
        assert outcomes[("img_gen", "done")] == "refused"
        assert outcomes[(None, "done")] == "refused"
        assert {k for k, v in outcomes.items() if v == "accepted" and k[1] != "cancelled"} <= {
            (s, st) for s in VARIANT_STAGES for st in STATUSES}
    else:
        assert outcomes[("img_gen", "done")] == "accepted"


def test_resignalled_finished_variant_is_refused_and_the_job_finishes(conn):
    """Item 1 as the tester ran it: a sibling still running, the finished variant re-signalled."""
    job_id, vid, sibling = variant_at(conn, "finished")
    for step, status in (("img_gen", "running"), ("img_gen", "done")):
        assert outside_write(conn, "jobs_variants", "job_variants_id", vid, step, status) == "refused"
    assert conn.execute("SELECT current_step, status FROM jobs_variants WHERE job_variants_id = %s",
                        (vid,)).fetchone() == {"current_step": "iou_eval", "status": "done"}
    conn.execute("UPDATE stage_tasks SET run_after = now() WHERE job_id = %s", (job_id,))
    assert drive(conn, job_id) == ("instagram_feed_gen", "done")
    # ... and after the job finished, the same writes are refused too.
    assert outside_write(conn, "jobs_variants", "job_variants_id", vid, "img_gen", "done") == "refused"
    assert job_state(conn, job_id) == ("instagram_feed_gen", "done")


def job_at(conn, situation: str) -> str:
    job_id, vids = insert_job(conn, variants=2, step="img_gen", status="running")
    if situation == "unstarted":
        return job_id
    conn.execute("UPDATE jobs_variants SET status = 'done' WHERE job_id = %s", (job_id,))
    stages = {"variants": 2, "job_stage": 8, "finished": 10}[situation]
    for _ in range(stages):
        for task in claim(conn, "driver", limit=100):
            complete(conn, task, "driver")
    if situation == "job_stage":
        claim(conn, "driver", limit=100)  # ad_copy_gen_kor running
    return job_id


@pytest.mark.parametrize("situation", ["unstarted", "variants", "job_stage", "finished"])
def test_no_outside_job_write_leaves_it_stuck(conn, situation):
    for step in STEPS + ["ab_vote"]:
        for status in STATUSES:
            job_id = job_at(conn, situation)
            before = job_state(conn, job_id)
            outcome = outside_write(conn, "jobs", "job_id", job_id, step, status)
            final = drive(conn, job_id)
            assert finished(final), f"{situation} job {before} written ({step}, {status}) {outcome}: stuck at {final}"
            if situation == "finished" and outcome == "refused":
                assert final == before


def test_variants_committed_one_at_a_time_wait_for_the_generator(conn):
    """Item 3: the fan-in waits for the set to be closed, sees every variant, and refuses late ones."""
    job_id = str(uuid.uuid4())
    conn.execute("INSERT INTO jobs (job_id, tenant_id, status, current_step) VALUES (%s, 'acme', 'running', 'img_gen')",
                 (job_id,))
    conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'copy')", (job_id,))
    for order in (1, 2, 3):
        conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                     "VALUES (%s, %s, 'done', 'img_gen')", (job_id, order))
        for _ in range(10):
            for task in claim(conn, "driver", limit=100):
                complete(conn, task, "driver")
        # every variant so far is finished, and still no job stage: the generator has not said it is done
        assert job_state(conn, job_id)[0] == "vlm_analyze"
        assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND job_variants_id IS NULL",
                            (job_id,)).fetchone()["n"] == 0
    # The generator marks the job (img_gen, done): the fan-in fires at that commit.
    conn.execute("UPDATE jobs SET current_step = 'img_gen', status = 'done' WHERE job_id = %s", (job_id,))
    assert job_state(conn, job_id) == ("iou_eval", "done")
    [ad_copy] = claim(conn, "driver", stages=["ad_copy_gen_kor"])
    assert len(ad_copy["variants"]) == 3
    complete(conn, ad_copy, "driver")
    [feed] = claim(conn, "driver", stages=["instagram_feed_gen"])
    assert len(feed["variants"]) == 3
    complete(conn, feed, "driver")
    with pytest.raises(psycopg.errors.CheckViolation, match=f"cannot join job {job_id}: the job is past its fan-in"):
        conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                     "VALUES (%s, 4, 'done', 'img_gen')", (job_id,))


def test_expected_count_closes_the_set_and_refuses_more(conn):
    job_id, vids = insert_job(conn, variants=2)  # expected_variants = 2
    assert conn.execute("SELECT variants_closed_at IS NOT NULL AS c FROM jobs WHERE job_id = %s",
                        (job_id,)).fetchone()["c"]
    with pytest.raises(psycopg.errors.CheckViolation, match="expects 2 variant"):
        conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                     "VALUES (%s, 3, 'done', 'img_gen')", (job_id,))
    assert drive(conn, job_id) == ("instagram_feed_gen", "done")


def test_a_job_written_with_its_variants_is_closed_as_written(conn, db_url):
    with psycopg.connect(db_url) as c:  # one transaction, as the peer harness and older tools write
        job_id = c.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('acme', 'running', 'img_gen') "
                           "RETURNING job_id").fetchone()[0]
        c.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                  "SELECT %s, n, 'done', 'img_gen' FROM generate_series(1, 2) n", (job_id,))
    assert drive(conn, job_id) == ("instagram_feed_gen", "done")


def test_a_job_written_with_its_variants_finished_fans_in_at_its_commit(conn, db_url):
    """Variants processed elsewhere, written finished with their job: the commit closes the set and
    the fan-in (run by jobs_settle_on_close since 0008, no longer by the insert's settle too)
    starts the job stages once."""
    with psycopg.connect(db_url) as c:
        job_id = c.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('acme', 'running', 'img_gen') "
                           "RETURNING job_id").fetchone()[0]
        c.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'copy')", (job_id,))
        c.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                  "SELECT %s, n, 'done', 'iou_eval' FROM generate_series(1, 2) n", (job_id,))
    tasks = conn.execute("SELECT stage, status FROM stage_tasks WHERE job_id = %s", (job_id,)).fetchall()
    assert tasks == [{"stage": "ad_copy_gen_kor", "status": "queued"}]
    assert drive(conn, job_id) == ("instagram_feed_gen", "done")


def test_generator_done_before_its_variants_in_one_transaction(conn, db_url):
    with psycopg.connect(db_url) as c:
        job_id = c.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('acme', 'done', 'img_gen') "
                           "RETURNING job_id").fetchone()[0]
        c.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) "
                  "VALUES (%s, 1, 'done', 'img_gen')", (job_id,))
    assert drive(conn, job_id) == ("instagram_feed_gen", "done")


def test_a_closed_job_without_variants_fails_at_once(conn):
    job_id = conn.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('acme', 'running', 'img_gen') "
                          "RETURNING job_id::text").fetchone()["job_id"]
    assert job_state(conn, job_id) == ("img_gen", "running")  # the generator may still be working
    conn.execute("UPDATE jobs SET status = 'done' WHERE job_id = %s", (job_id,))
    assert job_state(conn, job_id) == ("img_gen", "failed")


def test_a_cancel_that_died_half_way_is_finished_by_cancel_and_keeps_no_worker_awake(conn, db_url, tmp_path):
    """Item 2: an older release's cancel committed the job row and died before its second
    transaction. Idle workers must not spin on the task they cannot claim, and `cancel` again
    ends it."""
    job_id, _ = insert_job(conn, variants=2)
    conn.execute("SET session_replication_role = replica")  # the old first transaction, triggers aside
    conn.execute("UPDATE jobs SET status = 'cancelled' WHERE job_id = %s", (job_id,))
    conn.execute("RESET session_replication_role")
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    try:
        worker.wait_ready()
        time.sleep(2)
        dbname = db_url.rsplit("/", 1)[1]
        commits = lambda: conn.execute("SELECT xact_commit + xact_rollback AS n FROM pg_stat_database "
                                       "WHERE datname = %s", (dbname,)).fetchone()["n"]
        before = commits()
        time.sleep(5)
        during = commits() - before - 1  # less this query's own transaction
    finally:
        worker.stop()
    # A worker that spins on the task's deadline ran 36 transactions a second (180 here); the
    # counter also takes in this test's own probes and the statistics' own background, a few.
    assert during <= 20, f"an idle worker ran {during} transactions in 5 s beside a cancelled job's task"
    again = cli("cancel", job_id, env={"DATABASE_URL": db_url})
    assert again.returncode == 0, again.stderr
    assert "already cancelled" in again.stdout and "2 leftover task(s) cancelled" in again.stdout
    assert conn.execute("SELECT count(*) AS n FROM stage_tasks WHERE job_id = %s AND status <> 'cancelled'",
                        (job_id,)).fetchone()["n"] == 0


def test_cancel_by_plain_sql_stops_the_tasks_in_the_same_transaction(conn):
    job_id, _ = insert_job(conn, variants=2)
    claim(conn, "driver", limit=1)
    conn.execute("UPDATE jobs SET status = 'cancelled' WHERE job_id = %s", (job_id,))
    rows = conn.execute("SELECT status FROM stage_tasks WHERE job_id = %s", (job_id,)).fetchall()
    assert {r["status"] for r in rows} == {"cancelled"}
    assert {r["status"] for r in conn.execute("SELECT status FROM jobs_variants WHERE job_id = %s",
                                              (job_id,))} == {"cancelled"}
    assert cancel_job(conn, job_id).already


@pytest.mark.parametrize("tenant", ["acme/evil", "", "it's", "ünï", "../x", " acme"])
def test_tenants_the_cli_refuses_cannot_be_written_by_sql(conn, tenant):
    with pytest.raises(psycopg.errors.CheckViolation, match="tenant_id_format"):
        conn.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES (%s, 'running', 'img_gen')", (tenant,))
    with pytest.raises(psycopg.errors.CheckViolation, match="tenant_id_format"):
        conn.execute("INSERT INTO image_assets (tenant_id, uri) VALUES (%s, 'file:x.png')", (tenant,))


def test_a_rescued_task_keeps_its_place_in_the_queue(conn):
    """Item 6: the killed task runs next, not behind the backlog that arrived after it."""
    insert_job(conn, variants=1)
    [first] = claim(conn, "dead-worker", limit=1)
    insert_job(conn, variants=50)  # the backlog, queued after it
    conn.execute("UPDATE stage_tasks SET lease_expires_at = now() - interval '1 s' WHERE id = %s", (first["id"],))
    assert conn.execute("SELECT * FROM outbox_rescue_expired(10)").fetchall() == [
        {"id": first["id"], "outcome": "requeued"}]
    [again] = claim(conn, "w2", limit=1)
    assert again["id"] == first["id"] and again["attempt"] == 2
    # the same for a task a stopping worker hands back
    conn.execute("SELECT outbox_hand_back('w2', %s)", ([again["id"]],))
    [third] = claim(conn, "w3", limit=1)
    assert third["id"] == first["id"]


def test_status_lists_a_job_whose_variant_set_is_open(conn, db_url):
    job_id = conn.execute("INSERT INTO jobs (tenant_id, status, current_step) VALUES ('acme', 'running', 'img_gen') "
                          "RETURNING job_id::text").fetchone()["job_id"]
    conn.execute("INSERT INTO job_inputs (job_id, ad_copy) VALUES (%s, 'copy')", (job_id,))
    conn.execute("INSERT INTO jobs_variants (job_id, creation_order, status, current_step) VALUES (%s, 1, 'done', 'img_gen')",
                 (job_id,))
    out = cli("status", env={"DATABASE_URL": db_url}, check=True).stdout
    assert "waiting for their variant set to close" in out and f"job {job_id} tenant acme: 1 variant(s)" in out
    detail = cli("status", job_id, env={"DATABASE_URL": db_url}, check=True).stdout
    assert "variant set open" in detail
