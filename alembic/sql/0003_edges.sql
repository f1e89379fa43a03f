-- No dead ends whatever an outside writer does (docs/semantics.md, "Outside writers"):
--   1. a variant's (current_step, status) moves only as its tasks do once its pipeline started,
--      and a job's only as its fan-in and job tasks do; other writes are refused by the trigger
--      with an error naming the row;
--   2. a job's set of variants is closed before its fan-in (jobs.variants_closed_at), and a
--      variant cannot join a job whose fan-in already ran;
--   3. cancel is one transaction, and a cancelled job's leftover tasks never keep a worker awake;
--   4. tenant ids follow the CLI's rule wherever rows are written;
--   5. a rescued or handed-back task keeps its place in the queue.

-- 2. The variant set. Closed by the generator writing the job at (img_gen, done) (the old
-- system's own step), by the job's expected_variants being reached, or, for a job written in
-- one transaction together with its variants, at that transaction's commit (as written). Until
-- then the fan-in waits, however many of the variants have finished.
ALTER TABLE jobs ADD COLUMN expected_variants integer CHECK (expected_variants >= 1);
ALTER TABLE jobs ADD COLUMN variants_closed_at timestamptz;

-- 4. Tenant ids: the rule of the CLI (TENANT_PATTERN in Python), so that an artifact key's first
-- segment is always a valid tenant. NOT VALID: rows an older release let in are not re-checked
-- (the worker refuses their tasks at the first attempt); every new or changed row is.
ALTER TABLE jobs ADD CONSTRAINT jobs_tenant_id_format
    CHECK (tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$') NOT VALID;
ALTER TABLE image_assets ADD CONSTRAINT image_assets_tenant_id_format
    CHECK (tenant_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$') NOT VALID;

-- The helpers below are PL/pgSQL, not SQL: called from other functions, a SQL function that
-- cannot be inlined is planned again on every call (see 0002), and the triggers call them on
-- every state write. PL/pgSQL keeps its plans for the session. No jit setting of their own: they
-- run under their caller's (a SET clause costs a configuration save and restore per call).

-- Whether a step is one of the engine's own stages (the graph), at either level.
CREATE FUNCTION outbox_is_stage(p_step text, p_level text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM stage_graph g WHERE g.stage = p_step AND (p_level IS NULL OR g.level = p_level));
END $$;

-- The job stage after which a job is finished: the one no job stage follows.
CREATE FUNCTION outbox_last_job_stage() RETURNS text LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT g.stage FROM stage_graph g
            WHERE g.level = 'job'
              AND NOT EXISTS (SELECT 1 FROM stage_graph n WHERE n.level = 'job' AND n.after_step = g.stage));
END $$;

-- Whether a job has gone past its fan-in (or stopped): nothing may join it, nothing fires twice.
CREATE FUNCTION outbox_job_past_fan_in(p_status text, p_step text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN p_status IN ('failed', 'cancelled')
        OR (p_status = 'done' AND p_step = outbox_last_variant_stage())
        OR outbox_is_stage(p_step, 'job');
END $$;

-- 1. Whether a write of a variant's (current_step, status) is one the engine's own paths make.
-- Returns NULL when it is, or the reason it is refused. Once the pipeline started (the old or
-- the new step is a stage of the graph), the variant's state is its latest task's state: a claim
-- writes (stage, running) with the task running, a completion (stage, done) with it done, a
-- failure (stage, failed), a replay (stage, queued). Cancelled is accepted at any time (a
-- cancelled variant is finished; its running task's result is then dropped). Anything else, such
-- as a re-signal to (img_gen, done) after the pipeline ran, would leave a state no task moves
-- on from: refused. Before the pipeline starts, the generator's own steps are its business, and
-- (stage, done) starts the pipeline after that stage.
CREATE FUNCTION outbox_variant_write_refusal(p_variant uuid, p_old_step text, p_new_step text,
                                             p_new_status text) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_stage text;
    v_status text;
    v_level text;
BEGIN
    IF p_new_status = 'cancelled' THEN
        RETURN NULL;
    END IF;
    SELECT g.level INTO v_level FROM stage_graph g WHERE g.stage = p_new_step;
    IF v_level = 'job' THEN
        RETURN format('%s is a job stage, never a variant''s step', p_new_step);
    END IF;
    IF v_level IS NULL THEN
        IF outbox_is_stage(p_old_step, 'variant') THEN
            RETURN format('its pipeline already started (it is at %s); re-signalling it to (%s, %s) is refused: '
                          'replay its failed tasks (cli.py replay-failed) or create a new job',
                          p_old_step, coalesce(p_new_step, 'NULL'), coalesce(p_new_status, 'NULL'));
        END IF;
        RETURN NULL;
    END IF;
    SELECT t.stage, t.status INTO v_stage, v_status
    FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage
    WHERE t.job_variants_id = p_variant
    ORDER BY g.position DESC LIMIT 1;
    IF v_stage IS NOT DISTINCT FROM p_new_step AND v_status IS NOT DISTINCT FROM p_new_status THEN
        RETURN NULL;
    END IF;
    -- A variant with no task yet may be written at any (stage, done) or (stage, failed): its
    -- pipeline starts after that stage, or it is finished (variants processed elsewhere).
    IF v_stage IS NULL AND p_new_status IN ('done', 'failed') THEN
        RETURN NULL;
    END IF;
    RETURN format('(%s, %s) is not its task state (its latest task is %s): only the engine moves a variant '
                  'through its stages; use cli.py cancel, replay-failed or run-stage',
                  p_new_step, coalesce(p_new_status, 'NULL'),
                  coalesce(v_stage || ' ' || v_status, 'none: its pipeline has not started'));
END $$;

-- The same for a job row. Failed and cancelled are accepted at any time (an operator may stop a
-- job by SQL). A job stage's state is its task's state; (last variant stage, done) is the fan-in
-- and needs a closed set of finished variants with at least one done; a variant stage while
-- running or replayed needs the variant part under way and no job stage yet. A finished job
-- cannot be moved to a step outside the pipeline (it would no longer look finished).
CREATE FUNCTION outbox_job_write_refusal(p_job uuid, p_old_step text, p_old_status text, p_new_step text,
                                         p_new_status text, p_closed timestamptz) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_stage text;
    v_status text;
    v_open bigint;
    v_done bigint;
BEGIN
    IF p_new_status IN ('failed', 'cancelled') THEN
        RETURN NULL;
    END IF;
    IF outbox_is_stage(p_new_step, 'job') THEN
        SELECT t.stage, t.status INTO v_stage, v_status
        FROM stage_tasks t JOIN stage_graph g ON g.stage = t.stage
        WHERE t.job_id = p_job AND t.job_variants_id IS NULL
        ORDER BY g.position DESC LIMIT 1;
        IF v_stage IS NOT DISTINCT FROM p_new_step AND v_status IS NOT DISTINCT FROM p_new_status THEN
            RETURN NULL;
        END IF;
        RETURN format('(%s, %s) is not its task state (its latest job task is %s): only the engine moves a job '
                      'through its job stages', p_new_step, p_new_status,
                      coalesce(v_stage || ' ' || v_status, 'none yet'));
    END IF;
    IF p_new_step = outbox_last_variant_stage() AND p_new_status = 'done' THEN
        SELECT count(*) FILTER (WHERE NOT outbox_variant_is_terminal(status, current_step)),
               count(*) FILTER (WHERE status = 'done' AND current_step = p_new_step)
          INTO v_open, v_done FROM jobs_variants WHERE job_id = p_job;
        IF p_closed IS NOT NULL AND v_open = 0 AND v_done > 0 AND p_old_status NOT IN ('failed', 'cancelled')
           AND NOT EXISTS (SELECT 1 FROM stage_tasks t WHERE t.job_id = p_job AND t.job_variants_id IS NULL) THEN
            RETURN NULL;
        END IF;
        RETURN format('(%s, done) is the fan-in, which happens once, when the variant set is closed and every '
                      'variant finished (now: %s unfinished, %s done, set %s, job stages %s)', p_new_step, v_open, v_done,
                      CASE WHEN p_closed IS NULL THEN 'open' ELSE 'closed' END,
                      CASE WHEN EXISTS (SELECT 1 FROM stage_tasks t WHERE t.job_id = p_job AND t.job_variants_id IS NULL)
                           THEN 'already started' ELSE 'not started' END);
    END IF;
    IF outbox_is_stage(p_new_step, 'variant') THEN
        IF p_new_status IN ('running', 'queued')
           AND EXISTS (SELECT 1 FROM stage_tasks t WHERE t.job_id = p_job AND t.job_variants_id IS NOT NULL)
           AND NOT EXISTS (SELECT 1 FROM stage_tasks t WHERE t.job_id = p_job AND t.job_variants_id IS NULL) THEN
            RETURN NULL;
        END IF;
        RETURN format('(%s, %s) does not match its variants'' progress: the job row shows the variant part '
                      'only as running, between the first variant''s start and the fan-in', p_new_step, p_new_status);
    END IF;
    IF p_old_status IN ('failed', 'cancelled')
       OR (p_old_status = 'done' AND p_old_step = outbox_last_job_stage()) THEN
        RETURN format('it is finished (%s %s); moving it to (%s, %s) is refused: replay its failed tasks '
                      '(cli.py replay-failed) or create a new job',
                      p_old_step, p_old_status, coalesce(p_new_step, 'NULL'), coalesce(p_new_status, 'NULL'));
    END IF;
    -- Steps the engine does not own (the shared jobs table's other writers): ignored, never
    -- rewritten; the variants go on and the fan-in moves the row again.
    RETURN NULL;
END $$;

-- The engine's own writers mark their transaction (adflow.engine_write, transaction-local) so
-- that the triggers skip the write rule for them: a completion, failure or rescue writes its task
-- and the task's owner's state together, by construction, and checking every such write cost
-- 12-15% of the engine's throughput (docs/benchmarks.md). set_config, not a SET clause on the
-- functions: PostgreSQL refuses a non-superuser (the migrating role, deploy/sql/roles.sql) a SET
-- clause of a parameter no module defines. The worker calls these in transactions of their own;
-- a tool that sets the parameter itself bypasses the rule, on purpose. The claim is not marked:
-- its (stage, running) writes are checked, one lookup per claimed variant.
CREATE FUNCTION outbox_mark_engine_write() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('adflow.engine_write', 'on', true);
END $$;

-- Group commit as in 0001, marked as the engine's own writes.
CREATE OR REPLACE FUNCTION outbox_complete_many(p_owner text, p_items jsonb) RETURNS bigint[]
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    item jsonb;
    accepted bigint[] := '{}';
BEGIN
    PERFORM outbox_mark_engine_write();
    -- One global lock order (job, then variant, then task): see 0001.
    FOR item IN SELECT e.value FROM jsonb_array_elements(p_items) e
                LEFT JOIN stage_tasks t ON t.id = (e.value->>'id')::bigint
                ORDER BY t.job_id, t.job_variants_id NULLS LAST, t.id LOOP
        IF outbox_complete((item->>'id')::bigint, p_owner, (item->>'attempt')::integer,
                           item->'result') THEN
            accepted := accepted || (item->>'id')::bigint;
        END IF;
    END LOOP;
    RETURN accepted;
END $$;

-- Before any write of a job row: the generator's (img_gen, done) closes the variant set. On a
-- job already in the pipeline (its first variant started before the generator said it was done)
-- the row keeps its pipeline step: the mark is taken, the step is not moved back.
CREATE FUNCTION outbox_job_before_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.current_step = 'img_gen' AND NEW.status = 'done' THEN
        NEW.variants_closed_at := coalesce(NEW.variants_closed_at, now());
        IF TG_OP = 'UPDATE' AND outbox_is_stage(OLD.current_step) THEN
            NEW.current_step := OLD.current_step;
            NEW.status := OLD.status;
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_before_write BEFORE INSERT OR UPDATE OF status, current_step ON jobs
    FOR EACH ROW EXECUTE FUNCTION outbox_job_before_write();

-- At the commit of a transaction that wrote an open job: a job inserted together with its
-- variants is closed as written (unless it expects more), then the fan-in is tried, since the
-- closing write may come after every variant finished. Deferred to the commit so that a job
-- written at (img_gen, done) before its variants in the same transaction is not judged empty.
CREATE FUNCTION outbox_job_settle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE jobs j SET variants_closed_at = now()
        WHERE j.job_id = NEW.job_id AND j.variants_closed_at IS NULL AND j.expected_variants IS NULL
          AND EXISTS (SELECT 1 FROM jobs_variants v WHERE v.job_id = j.job_id);
    END IF;
    IF EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = NEW.job_id AND j.variants_closed_at IS NOT NULL) THEN
        PERFORM outbox_fan_in(NEW.job_id);
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER jobs_settle_on_insert AFTER INSERT ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION outbox_job_settle();
-- No column list: a column-specific trigger fires on the UPDATE's SET list only, and the
-- generator's (img_gen, done) sets variants_closed_at through the BEFORE trigger.
CREATE CONSTRAINT TRIGGER jobs_settle_on_close AFTER UPDATE ON jobs
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.variants_closed_at IS NULL AND NEW.variants_closed_at IS NOT NULL)
    EXECUTE FUNCTION outbox_job_settle();

-- Fan-in, as in 0001, with the set of variants closed first: a job whose generator has not said
-- it is done waits, however many variants finished. A closed job with no variants at all fails.
CREATE OR REPLACE FUNCTION outbox_fan_in(p_job uuid) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_job jobs%ROWTYPE;
    v_last text := outbox_last_variant_stage();
    v_open bigint;
    v_done bigint;
BEGIN
    SELECT * INTO v_job FROM jobs WHERE job_id = p_job FOR NO KEY UPDATE;
    IF NOT FOUND OR v_job.variants_closed_at IS NULL
       OR outbox_job_past_fan_in(v_job.status, v_job.current_step) THEN
        RETURN;  -- not closed yet, or already past the fan-in (or stopped): fire nothing twice
    END IF;
    SELECT count(*) FILTER (WHERE NOT outbox_variant_is_terminal(status, current_step)),
           count(*) FILTER (WHERE status = 'done' AND current_step = v_last)
      INTO v_open, v_done
      FROM jobs_variants WHERE job_id = p_job;
    IF v_open > 0 THEN
        RETURN;
    END IF;
    IF v_done > 0 THEN
        UPDATE jobs SET current_step = v_last, status = 'done' WHERE job_id = p_job;
    ELSE
        UPDATE jobs SET status = 'failed' WHERE job_id = p_job;
    END IF;
END $$;

-- The variant trigger of 0001 with the write rule (1) and the set rule (2) in front.
CREATE OR REPLACE FUNCTION notify_job_variant_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_tenant varchar(255);
    v_job_status text;
    v_job_step text;
    v_closed timestamptz;
    v_expected integer;
    v_refusal text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
        RETURN NULL;
    END IF;
    SELECT tenant_id, status, current_step, variants_closed_at, expected_variants
      INTO v_tenant, v_job_status, v_job_step, v_closed, v_expected
      FROM jobs WHERE job_id = NEW.job_id;
    IF TG_OP = 'INSERT' THEN
        IF outbox_job_past_fan_in(v_job_status, v_job_step) THEN
            RAISE EXCEPTION 'variant % cannot join job %: the job is past its fan-in (% %); create a new job',
                NEW.job_variants_id, NEW.job_id, v_job_step, v_job_status USING ERRCODE = 'check_violation';
        END IF;
        IF v_expected IS NOT NULL
           AND (SELECT count(*) FROM jobs_variants WHERE job_id = NEW.job_id) > v_expected THEN
            RAISE EXCEPTION 'variant % cannot join job %: the job expects % variant(s) and has them all',
                NEW.job_variants_id, NEW.job_id, v_expected USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    -- Not for the engine's own completions, failures and rescues (outbox_mark_engine_write).
    IF current_setting('adflow.engine_write', true) IS DISTINCT FROM 'on' THEN
        v_refusal := outbox_variant_write_refusal(NEW.job_variants_id,
                                                  CASE WHEN TG_OP = 'UPDATE' THEN OLD.current_step END,
                                                  NEW.current_step, NEW.status);
        IF v_refusal IS NOT NULL THEN
            RAISE EXCEPTION 'variant % of job %: %', NEW.job_variants_id, NEW.job_id, v_refusal
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    PERFORM pg_notify('job_variant_state_changed', json_build_object(
        'job_variants_id', NEW.job_variants_id,
        'job_id', NEW.job_id,
        'current_step', NEW.current_step,
        'status', NEW.status,
        'img_asset_id', NEW.img_asset_id,
        'tenant_id', v_tenant,
        'updated_at', NEW.updated_at)::text);
    IF TG_OP = 'INSERT' AND v_closed IS NULL AND v_expected IS NOT NULL THEN
        -- The expected count reached closes the set (its deferred settle tries the fan-in).
        UPDATE jobs j SET variants_closed_at = now()
        WHERE j.job_id = NEW.job_id AND j.variants_closed_at IS NULL
          AND (SELECT count(*) FROM jobs_variants v WHERE v.job_id = j.job_id) >= j.expected_variants;
    END IF;
    IF NEW.status = 'done' AND v_job_status IS DISTINCT FROM 'cancelled' THEN
        PERFORM outbox_enqueue_after('variant', NEW.job_id, NEW.job_variants_id, NEW.current_step);
    END IF;
    -- Nested so that the common (stage, running) change skips the terminal check's query.
    IF NEW.status IN ('done', 'failed', 'cancelled') THEN
        IF outbox_variant_is_terminal(NEW.status, NEW.current_step) THEN
            PERFORM outbox_fan_in(NEW.job_id);
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- The job trigger of 0001 with the write rule (1) in front, and a job that becomes cancelled
-- (by cli.py cancel or by an operator's plain UPDATE) stopping its tasks and variants (3).
CREATE OR REPLACE FUNCTION notify_job_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_refusal text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
        RETURN NULL;
    END IF;
    IF current_setting('adflow.engine_write', true) IS DISTINCT FROM 'on' THEN  -- see the variant trigger
        v_refusal := outbox_job_write_refusal(NEW.job_id,
                                              CASE WHEN TG_OP = 'UPDATE' THEN OLD.current_step END,
                                              CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                                              NEW.current_step, NEW.status, NEW.variants_closed_at);
        IF v_refusal IS NOT NULL THEN
            RAISE EXCEPTION 'job %: %', NEW.job_id, v_refusal USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    PERFORM pg_notify('job_state_changed', json_build_object(
        'job_id', NEW.job_id,
        'current_step', NEW.current_step,
        'status', NEW.status,
        'tenant_id', NEW.tenant_id,
        'updated_at', NEW.updated_at)::text);
    IF NEW.status = 'done' THEN
        PERFORM outbox_enqueue_after('job', NEW.job_id, NULL, NEW.current_step);
    ELSIF NEW.status = 'cancelled' AND TG_OP = 'UPDATE' THEN
        PERFORM outbox_cancel_leftovers(NEW.job_id);
    END IF;
    RETURN NULL;
END $$;

-- 3. What a cancelled job still has running or queued ends cancelled, in the cancelling
-- transaction. SKIP LOCKED: the caller holds the job row, and a row locked now belongs to a
-- claim, completion, failure or rescue in flight that would wait for the job or a variant in
-- the other order; each of those paths ends a cancelled job's task cancelled itself (the claimed
-- one at its completion, a retry or rescue instead of requeueing it). Returns how many tasks.
CREATE FUNCTION outbox_cancel_leftovers(p_job uuid) RETURNS integer LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    n integer;
BEGIN
    UPDATE stage_tasks
    SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'job cancelled'
    WHERE id IN (SELECT s.id FROM stage_tasks s WHERE s.job_id = p_job AND s.status IN ('queued', 'running')
                 FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE jobs_variants SET status = 'cancelled'
    WHERE job_variants_id IN (SELECT v.job_variants_id FROM jobs_variants v
                              WHERE v.job_id = p_job AND NOT outbox_variant_is_terminal(v.status, v.current_step)
                              FOR NO KEY UPDATE SKIP LOCKED);
    RETURN n;
END $$;

-- Cancel in one transaction, and idempotent: cancelling a job that is already cancelled ends
-- whatever it still has queued or running (a cancel of an older release that died between its
-- two transactions) and says it was already cancelled. Returns (already_cancelled, tasks).
-- Variants are locked before the job, the order every other path uses (variant, then job).
CREATE FUNCTION outbox_cancel(p_job uuid, OUT already_cancelled boolean, OUT tasks integer)
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
    IF v_job.status = 'failed' OR (v_job.status = 'done' AND v_job.current_step = outbox_last_job_stage()) THEN
        RAISE EXCEPTION 'job % already finished (% %): nothing to cancel', p_job, v_job.current_step, v_job.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE jobs SET status = 'cancelled' WHERE job_id = p_job;  -- its trigger ends the leftovers
    SELECT count(*) INTO tasks FROM stage_tasks
    WHERE job_id = p_job AND status = 'cancelled' AND finished_at = now();
END $$;

-- A retry of a cancelled job's task ends cancelled instead of queued (see outbox_cancel_leftovers).
CREATE OR REPLACE FUNCTION outbox_fail(p_task_id bigint, p_owner text, p_attempt integer, p_error text,
                            p_details jsonb, p_permanent boolean, p_retry_in_s double precision)
RETURNS text LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
    PERFORM outbox_mark_engine_write();
    SELECT * INTO t FROM stage_tasks
    WHERE stage_tasks.id = p_task_id AND status = 'running'
      AND lease_owner = p_owner AND attempts = p_attempt
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'lost';
    END IF;
    IF EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = t.job_id AND status = 'cancelled') THEN
        UPDATE stage_tasks
        SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
            last_error = p_error, error_details = p_details
        WHERE stage_tasks.id = t.id;
        RETURN 'lost';
    END IF;
    IF p_permanent OR t.attempts >= t.max_attempts THEN
        UPDATE stage_tasks
        SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
            last_error = p_error, error_details = p_details
        WHERE stage_tasks.id = t.id;
        PERFORM outbox_set_owner_state(t, 'failed');
        RETURN 'failed';
    END IF;
    UPDATE stage_tasks
    SET status = 'queued', run_after = now() + make_interval(secs => p_retry_in_s),
        lease_owner = NULL, lease_expires_at = NULL, last_error = p_error, error_details = p_details
    WHERE stage_tasks.id = t.id;
    RETURN 'retry';
END $$;

-- 5. A rescued task keeps its run_after, the moment it became runnable, so the claim's order
-- (run_after, id) puts it back where it was instead of behind the whole backlog (a killed task
-- waited up to 52 s behind 200 jobs). A cancelled job's task ends cancelled instead of requeued.
CREATE OR REPLACE FUNCTION outbox_rescue_expired(p_limit integer DEFAULT 1000)
RETURNS TABLE (id bigint, outcome text) LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
    PERFORM outbox_mark_engine_write();
    -- Oldest expiries first, then handled in the completions' lock order (job, variant): a
    -- task failed here locks its job row at the fan-in.
    FOR t IN
        SELECT * FROM (
            SELECT * FROM stage_tasks s
            WHERE s.status = 'running' AND s.lease_expires_at < now()
            ORDER BY s.lease_expires_at LIMIT p_limit
            FOR UPDATE SKIP LOCKED) expired
        ORDER BY expired.job_id, expired.job_variants_id NULLS LAST, expired.id
    LOOP
        id := t.id;
        IF EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = t.job_id AND j.status = 'cancelled') THEN
            UPDATE stage_tasks s
            SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1, last_error = 'job cancelled (lease expired)'
            WHERE s.id = t.id;
            outcome := 'cancelled';
        ELSIF t.attempts >= t.max_attempts THEN
            UPDATE stage_tasks s
            SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1,
                last_error = format('lease expired at attempt %s of %s (worker %s stopped: crash, kill or lost connection)',
                                    t.attempts, t.max_attempts, t.lease_owner)
            WHERE s.id = t.id;
            PERFORM outbox_set_owner_state(t, 'failed');
            outcome := 'failed';
        ELSE
            UPDATE stage_tasks s
            SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1,
                last_error = format('lease expired at attempt %s (worker %s stopped); requeued',
                                    t.attempts, t.lease_owner),
                -- run_after no longer tells when it was requeued: say it here (operators, the fault suite).
                error_details = jsonb_build_object('reason', 'lease expired', 'worker', t.lease_owner,
                                                   'attempt', t.attempts, 'requeued_at', extract(epoch FROM now()))
            WHERE s.id = t.id;
            outcome := 'requeued';
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Handed back by a stopping worker: its place kept too (run_after unchanged).
CREATE OR REPLACE FUNCTION outbox_hand_back(p_owner text, p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql SET jit = off AS $$
    UPDATE stage_tasks
    SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'handed back by a stopping worker'
    WHERE id IN (SELECT s.id FROM stage_tasks s
                 WHERE s.id = ANY (p_ids) AND s.lease_owner = p_owner AND s.status = 'running'
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
$$;

-- 3. The next deadline skips a cancelled job's queued tasks: the claim never takes them, so a
-- deadline on them woke idle workers every 50 ms for nothing (36 transactions a second). The
-- plain minimum first, as in 0002 (the common case, on every claim that found fewer tasks than
-- it asked for); only when it is already due, which the claim that just ran leaves only for a
-- task locked by another claimer or one it must not take, the exact answer: per stage, the first
-- queued task in (run_after, id) order whose job is not cancelled, the claim's own index walk.
CREATE OR REPLACE FUNCTION outbox_next_deadline(p_stages text[], p_owner text) RETURNS double precision
LANGUAGE plpgsql STABLE SET jit = off AS $$
DECLARE
    v_queued timestamptz;
BEGIN
    SELECT min(run_after) INTO v_queued FROM stage_tasks WHERE status = 'queued' AND stage = ANY (p_stages);
    IF v_queued <= clock_timestamp() THEN
        SELECT min(first.run_after) INTO v_queued FROM unnest(p_stages) AS s(stage)
        CROSS JOIN LATERAL (
            SELECT q.run_after FROM stage_tasks q
            WHERE q.status = 'queued' AND q.stage = s.stage
              AND (SELECT cj.status FROM jobs cj WHERE cj.job_id = q.job_id) <> 'cancelled'
            ORDER BY q.run_after, q.id LIMIT 1) first;
    END IF;
    RETURN extract(epoch FROM least(
        v_queued,
        (SELECT min(lease_expires_at) FROM stage_tasks
          WHERE status = 'running' AND lease_owner IS DISTINCT FROM p_owner)
    ) - clock_timestamp())::double precision;
END $$;

-- The jobs whose variant set is still open, for cli.py status (one query, in one place): only
-- jobs at the generator's step or in the pipeline, since the shared table's other steps are not
-- the engine's business.
CREATE FUNCTION outbox_open_variant_sets(p_limit integer)
RETURNS TABLE (job_id text, tenant_id varchar, current_step text, status text, expected_variants integer,
               age_s double precision, variants bigint, finished bigint)
LANGUAGE sql STABLE SET jit = off AS $$
    SELECT j.job_id::text, j.tenant_id, j.current_step, j.status, j.expected_variants,
           extract(epoch FROM now() - j.created_at)::double precision,
           count(v.job_variants_id),
           count(v.job_variants_id) FILTER (WHERE outbox_variant_is_terminal(v.status, v.current_step))
    FROM jobs j LEFT JOIN jobs_variants v ON v.job_id = j.job_id
    WHERE j.variants_closed_at IS NULL AND j.status NOT IN ('failed', 'cancelled')
      AND (j.current_step = 'img_gen'
           OR j.current_step IN (SELECT g.stage FROM stage_graph g WHERE g.level = 'variant'))
    GROUP BY j.job_id ORDER BY j.created_at LIMIT p_limit
$$;
