-- What an operator looks at (issue 15): which workers exist, and one rule for a job's and a
-- variant's state that every view (cli.py, the report, the web console), the watcher and the
-- pruner read, instead of each spelling "finished" on its own.

-- One row per worker process, written twice: when it starts serving and when it stops. Never
-- while it runs: an idle worker sends no statement (docs/design.md, "Waiting without polling").
-- Whether it is alive is read from pg_stat_activity instead (its connections carry its id as
-- application_name), so a worker killed with SIGKILL shows as dead as soon as its backends go.
CREATE TABLE workers (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    stages text[] NOT NULL,
    -- The lease it takes, so that a held task's lease expiry tells when it last heartbeated.
    lease_s double precision NOT NULL CHECK (lease_s > 0),
    started_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);

-- `cli.py jobs` and the console list the newest jobs first: a walk of this index, not a sort of
-- the whole table. A plain CREATE INDEX blocks writes to jobs while it builds (about a second per
-- million jobs); on a much larger table build it CONCURRENTLY by hand before upgrading.
CREATE INDEX IF NOT EXISTS jobs_created_at_idx ON jobs (created_at);

-- PL/pgSQL like 0003's helpers (a SQL function that cannot be inlined is planned on every call).
-- SET jit = off as on the worker operations (the CLI's job queries call these from
-- outbox/jobs.py, and tests/test_claim_planning.py holds every function called there to it).

-- A job's state as an operator means it: open (still moving, or waiting), done (its last job
-- stage done), failed or cancelled. "done" at an earlier stage is open: the job goes on.
CREATE FUNCTION outbox_job_state(p_status text, p_step text) RETURNS text
LANGUAGE plpgsql STABLE SET jit = off AS $$
BEGIN
    IF p_status IN ('failed', 'cancelled') THEN
        RETURN p_status;
    END IF;
    IF p_status = 'done' AND p_step = outbox_last_job_stage() THEN
        RETURN 'done';
    END IF;
    RETURN 'open';
END $$;

-- A variant's state: done only at the last variant stage. A variant at (img_gen, done) has not
-- started, and one at (planner, done) waits for its next task: both are queued, never done.
CREATE FUNCTION outbox_variant_state(p_status text, p_step text) RETURNS text
LANGUAGE plpgsql STABLE SET jit = off AS $$
BEGIN
    IF p_status IN ('failed', 'cancelled', 'running') THEN
        RETURN p_status;
    END IF;
    IF p_status = 'done' AND p_step = outbox_last_variant_stage() THEN
        RETURN 'done';
    END IF;
    RETURN 'queued';
END $$;

-- Whether a registered worker runs: one of this database's backends carries its id as its
-- application_name (PostgreSQL keeps the first 63 bytes of one). Visible to any role, unlike the
-- other columns of pg_stat_activity, and read from a snapshot taken once per transaction.
CREATE FUNCTION outbox_worker_alive(p_id text) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.datname = current_database() AND a.application_name = left(p_id, 63));
END $$;

-- Cancel (0003) with the same rule for "already finished".
CREATE OR REPLACE FUNCTION outbox_cancel(p_job uuid, OUT already_cancelled boolean, OUT tasks integer)
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    v_job jobs%ROWTYPE;
BEGIN
    PERFORM 1 FROM jobs_variants WHERE job_id = p_job ORDER BY job_variants_id FOR NO KEY UPDATE;
    SELECT * INTO v_job FROM jobs WHERE job_id = p_job FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', p_job USING ERRCODE = 'no_data_found';
    END IF;
    already_cancelled := v_job.status = 'cancelled';
    IF already_cancelled THEN
        tasks := outbox_cancel_leftovers(p_job);
        RETURN;
    END IF;
    IF outbox_job_state(v_job.status, v_job.current_step) <> 'open' THEN
        RAISE EXCEPTION 'job % already finished (% %): nothing to cancel', p_job, v_job.current_step, v_job.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE jobs SET status = 'cancelled' WHERE job_id = p_job;  -- its trigger ends the leftovers
    SELECT count(*) INTO tasks FROM stage_tasks
    WHERE job_id = p_job AND status = 'cancelled' AND finished_at = now();
END $$;

