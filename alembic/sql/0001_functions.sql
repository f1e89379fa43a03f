-- Trigger functions and the outbox's operations, kept in SQL so each hot-path operation is one
-- round trip (claim, complete, fail) and every state change goes through the same few places.

-- The stage graph: one row per stage. A linear chain per level, hence UNIQUE (level, after_step).
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_level_after_step_key UNIQUE (level, after_step);
INSERT INTO stage_graph (stage, level, after_step, device, max_attempts, timeout_s, position) VALUES
    ('vlm_analyze',        'variant', 'img_gen',          'gpu', 3, 300, 1),
    ('yolo_detect',        'variant', 'vlm_analyze',      'gpu', 3, 300, 2),
    ('planner',            'variant', 'yolo_detect',      'cpu', 3, 300, 3),
    ('overlay',            'variant', 'planner',          'cpu', 3, 300, 4),
    ('vlm_judge',          'variant', 'overlay',          'gpu', 3, 300, 5),
    ('ocr_eval',           'variant', 'vlm_judge',        'cpu', 3, 300, 6),
    ('readability_eval',   'variant', 'ocr_eval',         'cpu', 3, 300, 7),
    ('iou_eval',           'variant', 'readability_eval', 'cpu', 3, 300, 8),
    ('ad_copy_gen_kor',    'job',     'iou_eval',         'cpu', 3, 300, 9),
    ('instagram_feed_gen', 'job',     'ad_copy_gen_kor',  'cpu', 3, 300, 10);

-- updated_at is kept by the database, so writers need not touch it by hand.
CREATE FUNCTION outbox_touch_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER jobs_touch_updated_at BEFORE UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION outbox_touch_updated_at();
CREATE TRIGGER jobs_variants_touch_updated_at BEFORE UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION outbox_touch_updated_at();

-- The variant stage after which a variant is finished (the fan-in point): the one no variant
-- stage follows.
CREATE FUNCTION outbox_last_variant_stage() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT g.stage FROM stage_graph g
    WHERE g.level = 'variant'
      AND NOT EXISTS (SELECT 1 FROM stage_graph n WHERE n.level = 'variant' AND n.after_step = g.stage)
$$;

-- A failed or cancelled variant is finished too: it must not block its job forever.
CREATE FUNCTION outbox_variant_is_terminal(p_status text, p_step text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_status IN ('failed', 'cancelled')
        OR (p_status = 'done' AND p_step = outbox_last_variant_stage())
$$;

-- Enqueue the stage that follows (p_step, done) at this level; a duplicate is a no-op.
CREATE FUNCTION outbox_enqueue_after(p_level text, p_job uuid, p_variant uuid, p_step text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_stage text;
BEGIN
    INSERT INTO stage_tasks (job_id, job_variants_id, stage, max_attempts)
    SELECT p_job, p_variant, g.stage, g.max_attempts
    FROM stage_graph g
    WHERE g.level = p_level AND g.after_step = p_step
    ON CONFLICT DO NOTHING
    RETURNING stage INTO v_stage;
    -- The variant part starts: the job shows the first variant stage until the fan-in.
    IF v_stage IS NOT NULL AND p_level = 'variant'
       AND NOT EXISTS (SELECT 1 FROM stage_graph WHERE stage = p_step) THEN
        UPDATE jobs SET current_step = v_stage, status = 'running'
        WHERE job_id = p_job
          AND (current_step IS NULL OR current_step NOT IN (SELECT stage FROM stage_graph))
          AND status <> 'cancelled';
    END IF;
END $$;

-- Fan-in: called when a variant reaches a terminal state. The job row is locked FIRST: a second
-- finisher waits here until the first commits, and its count (a new statement, hence a new
-- snapshot under READ COMMITTED) then sees the first one's variant finished. So two variants
-- finishing at once can neither both miss nor both fire the job-level stage.
-- FOR NO KEY UPDATE, not FOR UPDATE: each finisher already holds a FOR KEY SHARE lock on the job
-- row (the foreign-key checks of its stage_results and stage_tasks inserts), and FOR UPDATE
-- conflicts with KEY SHARE, so two finishers would each wait for the other: a deadlock (found
-- by the fault suite). NO KEY UPDATE still excludes a second fan-in, and not the KEY SHARE.
CREATE FUNCTION outbox_fan_in(p_job uuid) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_job jobs%ROWTYPE;
    v_last text := outbox_last_variant_stage();
    v_open bigint;
    v_done bigint;
BEGIN
    SELECT * INTO v_job FROM jobs WHERE job_id = p_job FOR NO KEY UPDATE;
    IF NOT FOUND OR v_job.status IN ('cancelled', 'failed')
       OR (v_job.current_step = v_last AND v_job.status = 'done')
       OR v_job.current_step IN (SELECT stage FROM stage_graph WHERE level = 'job') THEN
        RETURN;  -- already past the fan-in (or stopped): fire nothing twice
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

-- Old channel and trigger names kept: outside tools listen to job_variant_state_changed.
CREATE FUNCTION notify_job_variant_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_tenant varchar(255);
    v_job_status text;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
        RETURN NULL;
    END IF;
    SELECT tenant_id, status INTO v_tenant, v_job_status FROM jobs WHERE job_id = NEW.job_id;
    PERFORM pg_notify('job_variant_state_changed', json_build_object(
        'job_variants_id', NEW.job_variants_id,
        'job_id', NEW.job_id,
        'current_step', NEW.current_step,
        'status', NEW.status,
        'img_asset_id', NEW.img_asset_id,
        'tenant_id', v_tenant,
        'updated_at', NEW.updated_at)::text);
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
CREATE TRIGGER job_variant_state_change_trigger
    AFTER INSERT OR UPDATE OF status, current_step ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION notify_job_variant_state_change();

CREATE FUNCTION notify_job_state_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.status IS NOT DISTINCT FROM OLD.status
       AND NEW.current_step IS NOT DISTINCT FROM OLD.current_step THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('job_state_changed', json_build_object(
        'job_id', NEW.job_id,
        'current_step', NEW.current_step,
        'status', NEW.status,
        'tenant_id', NEW.tenant_id,
        'updated_at', NEW.updated_at)::text);
    IF NEW.status = 'done' THEN
        PERFORM outbox_enqueue_after('job', NEW.job_id, NULL, NEW.current_step);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER job_state_change_trigger
    AFTER INSERT OR UPDATE OF status, current_step ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_job_state_change();

-- The worker channel: payload is the stage name alone, so repeats inside one transaction fold
-- into one notification. Every path that makes a task claimable (enqueue, retry, rescue,
-- hand-back, replay) passes here.
CREATE FUNCTION outbox_notify_task_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_stage_tasks', NEW.stage);
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_task_queued_trigger
    AFTER INSERT OR UPDATE OF status, run_after ON stage_tasks
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION outbox_notify_task_queued();

-- Moves the task's variant (or, for job stages, its job) to (stage, status).
CREATE FUNCTION outbox_set_owner_state(p_task stage_tasks, p_status text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- A cancelled variant or job stays cancelled whatever a late worker reports.
    IF p_task.job_variants_id IS NOT NULL THEN
        UPDATE jobs_variants SET current_step = p_task.stage, status = p_status
        WHERE job_variants_id = p_task.job_variants_id AND status IS DISTINCT FROM 'cancelled';
    ELSE
        UPDATE jobs SET current_step = p_task.stage, status = p_status
        WHERE job_id = p_task.job_id AND status <> 'cancelled';
    END IF;
END $$;

-- Claim up to p_limit claimable tasks of the given stages in one statement. attempts counts at
-- claim, so a stage that kills its worker still uses up its attempts. The variant (or job) shows
-- (stage, running) in this same transaction. Each row carries the task's inputs (ad copy, image
-- asset, earlier results), and when fewer than p_limit were claimable, a last row with a NULL id
-- carries next_deadline_s (see outbox_next_deadline): one round trip whatever happens.
-- Crash isolation: a task whose worker died under it (expired_leases > 0) and whose next attempt
-- is its last runs ALONE, so that it cannot take innocent neighbours down with it again, and is
-- failed for crashing only when it crashed alone (found by the fault suite: a poisoned task,
-- requeued together with the tasks that died with it, was claimed together with them again and
-- again until all of them had used up their attempts). While such a task waits, a caller with
-- tasks in flight claims nothing and is told so (suspect_waiting); a caller with none in flight
-- (p_alone) takes it, alone (the row's alone = true: claim nothing more until it ends).
CREATE FUNCTION outbox_claim(p_owner text, p_stages text[], p_limit integer,
                             p_lease_s double precision, p_task_id bigint DEFAULT NULL,
                             p_alone boolean DEFAULT false)
RETURNS TABLE (id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer,
               max_attempts integer, tenant_id varchar, ad_copy text, img_asset_id uuid,
               asset_uri text, asset_tenant varchar, results jsonb, variants jsonb,
               next_deadline_s double precision, alone boolean, suspect_waiting boolean)
-- The planner, guessing few queued rows, would rather bitmap-scan every queued row of a stage
-- and sort them; the ordered index walk is what keeps a claim O(p_limit) under a backlog.
LANGUAGE plpgsql SET enable_bitmapscan = off AS $$
DECLARE
    claimed_count integer;
    v_suspect bigint;
    v_waiting boolean := false;
BEGIN
    IF p_task_id IS NULL AND p_alone THEN
        SELECT q.id INTO v_suspect FROM stage_tasks q
        WHERE q.status = 'queued' AND q.expired_leases > 0 AND q.attempts + 1 >= q.max_attempts
          AND q.stage = ANY (p_stages) AND q.run_after <= now()
          AND NOT EXISTS (SELECT 1 FROM jobs cj WHERE cj.job_id = q.job_id AND cj.status = 'cancelled')
        ORDER BY q.run_after, q.id LIMIT 1
        FOR UPDATE SKIP LOCKED;
    ELSIF p_task_id IS NULL THEN
        v_waiting := EXISTS (
            SELECT 1 FROM stage_tasks q
            WHERE q.status = 'queued' AND q.expired_leases > 0 AND q.attempts + 1 >= q.max_attempts
              AND q.stage = ANY (p_stages) AND q.run_after <= now()
              AND NOT EXISTS (SELECT 1 FROM jobs cj WHERE cj.job_id = q.job_id AND cj.status = 'cancelled'));
    END IF;
    RETURN QUERY
    -- Stage by stage in the order given (workers list later pipeline stages first, so jobs in
    -- flight finish before new ones start), oldest first within a stage. Each stage's scan walks
    -- the partial index (stage, run_after, id) in order and the LIMIT above it stops the walk:
    -- a claim costs O(p_limit), however long the queue, and locks only the rows it takes.
    WITH picked AS (
        SELECT v_suspect AS id WHERE v_suspect IS NOT NULL
        UNION ALL
        (SELECT t.id
        FROM unnest(p_stages) AS s(stage)
        CROSS JOIN LATERAL (
            SELECT q.id FROM stage_tasks q
            WHERE q.status = 'queued' AND q.stage = s.stage AND q.run_after <= now()
              AND (p_task_id IS NULL OR q.id = p_task_id)
              AND NOT EXISTS (SELECT 1 FROM jobs cj WHERE cj.job_id = q.job_id AND cj.status = 'cancelled')
              AND v_suspect IS NULL AND NOT v_waiting
              AND (p_task_id IS NOT NULL OR q.expired_leases = 0 OR q.attempts + 1 < q.max_attempts)
            ORDER BY q.run_after, q.id
            LIMIT p_limit
            FOR UPDATE SKIP LOCKED
        ) t
        LIMIT p_limit)
    ), claimed AS (
        UPDATE stage_tasks t
        SET status = 'running', attempts = t.attempts + 1, lease_owner = p_owner,
            lease_expires_at = now() + make_interval(secs => p_lease_s),
            started_at = now(), finished_at = NULL
        FROM picked WHERE t.id = picked.id
        RETURNING t.id, t.job_id, t.job_variants_id, t.stage, t.attempts, t.max_attempts
    ), variant_rows AS (
        UPDATE jobs_variants v SET status = 'running', current_step = c.stage
        FROM claimed c WHERE v.job_variants_id = c.job_variants_id AND v.status IS DISTINCT FROM 'cancelled'
    ), job_rows AS (
        UPDATE jobs j SET status = 'running', current_step = c.stage
        FROM claimed c WHERE c.job_variants_id IS NULL AND j.job_id = c.job_id AND j.status <> 'cancelled'
    )
    SELECT c.id, c.job_id, c.job_variants_id, c.stage, c.attempts, c.max_attempts, j.tenant_id,
           ji.ad_copy, v.img_asset_id, ia.uri, ia.tenant_id,
           CASE WHEN c.job_variants_id IS NOT NULL THEN
                (SELECT coalesce(jsonb_object_agg(r.stage, r.result), '{}'::jsonb)
                   FROM stage_results r WHERE r.job_variants_id = c.job_variants_id)
           ELSE (SELECT coalesce(jsonb_object_agg(r.stage, r.result), '{}'::jsonb)
                   FROM stage_results r WHERE r.job_id = c.job_id AND r.job_variants_id IS NULL)
           END,
           CASE WHEN c.job_variants_id IS NULL THEN
                (SELECT coalesce(jsonb_object_agg(vv.job_variants_id::text, jsonb_build_object(
                            'status', vv.status, 'current_step', vv.current_step,
                            'creation_order', vv.creation_order,
                            'results', (SELECT coalesce(jsonb_object_agg(r.stage, r.result), '{}'::jsonb)
                                          FROM stage_results r WHERE r.job_variants_id = vv.job_variants_id))),
                        '{}'::jsonb)
                   FROM jobs_variants vv WHERE vv.job_id = c.job_id)
           END,
           NULL::double precision, coalesce(c.id = v_suspect, false), NULL::boolean
    FROM claimed c
    JOIN jobs j ON j.job_id = c.job_id
    LEFT JOIN job_inputs ji ON ji.job_id = c.job_id
    LEFT JOIN jobs_variants v ON v.job_variants_id = c.job_variants_id
    LEFT JOIN image_assets ia ON ia.image_asset_id = v.img_asset_id
    ORDER BY c.id;
    GET DIAGNOSTICS claimed_count = ROW_COUNT;
    IF claimed_count < p_limit THEN
        RETURN QUERY SELECT NULL::bigint, NULL::uuid, NULL::uuid, NULL::text, NULL::integer,
                            NULL::integer, NULL::varchar, NULL::text, NULL::uuid, NULL::text,
                            NULL::varchar, NULL::jsonb, NULL::jsonb,
                            outbox_next_deadline(p_stages, p_owner), NULL::boolean, v_waiting;
    END IF;
END $$;

-- Lease-fenced completion: only the holder of the current attempt commits; its result row and
-- the variant's (stage, done) commit together, and the trigger enqueues the next stage.
CREATE FUNCTION outbox_complete(p_task_id bigint, p_owner text, p_attempt integer, p_result jsonb)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
    UPDATE stage_tasks
    SET status = 'done', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL
    WHERE stage_tasks.id = p_task_id AND status = 'running'
      AND lease_owner = p_owner AND attempts = p_attempt
    RETURNING * INTO t;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = t.job_id AND status = 'cancelled') THEN
        UPDATE stage_tasks SET status = 'cancelled', last_error = 'job cancelled; result dropped'
        WHERE stage_tasks.id = t.id;
        RETURN false;
    END IF;
    INSERT INTO stage_results (task_id, job_id, job_variants_id, stage, attempt, result)
    VALUES (t.id, t.job_id, t.job_variants_id, t.stage, t.attempts, p_result);
    -- A job-level stage that picks the winning variant says so with chosen_variant_id; the old
    -- system's jobs_variants.selected shows it.
    IF t.job_variants_id IS NULL AND p_result ? 'chosen_variant_id' THEN
        UPDATE jobs_variants SET selected = (job_variants_id::text = p_result->>'chosen_variant_id')
        WHERE job_id = t.job_id;
    END IF;
    PERFORM outbox_set_owner_state(t, 'done');
    RETURN true;
END $$;

-- Many completions in one transaction (group commit): [{"id", "attempt", "result"}, ...].
-- Returns the ids whose completion was accepted.
-- The items are taken in one global order (job, then variant, then task): each completion
-- locks its variant and, at the fan-in, its job row, so two workers' batches taken in the order
-- they arrived could lock two jobs in opposite orders and deadlock (found by the fault suite:
-- "deadlock detected", a whole batch lost and re-run after its leases expired).
CREATE FUNCTION outbox_complete_many(p_owner text, p_items jsonb) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    item jsonb;
    accepted bigint[] := '{}';
BEGIN
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

-- Failure of the current attempt: back to the queue after p_retry_in_s, or failed for good
-- (permanent error or attempts used up) with the variant (or job) failed. Returns
-- 'retry', 'failed' or 'lost' (this worker no longer held the task).
CREATE FUNCTION outbox_fail(p_task_id bigint, p_owner text, p_attempt integer, p_error text,
                            p_details jsonb, p_permanent boolean, p_retry_in_s double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
    SELECT * INTO t FROM stage_tasks
    WHERE stage_tasks.id = p_task_id AND status = 'running'
      AND lease_owner = p_owner AND attempts = p_attempt
    FOR UPDATE;
    IF NOT FOUND THEN
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

-- Tasks whose lease expired (their worker died or lost its connection): requeued, or failed
-- once their attempts are used up, so a stage that crashes its worker cannot loop forever.
CREATE FUNCTION outbox_rescue_expired(p_limit integer DEFAULT 1000)
RETURNS TABLE (id bigint, outcome text) LANGUAGE plpgsql AS $$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
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
        IF t.attempts >= t.max_attempts THEN
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
            SET status = 'queued', run_after = now(), lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1,
                last_error = format('lease expired at attempt %s (worker %s stopped); requeued',
                                    t.attempts, t.lease_owner)
            WHERE s.id = t.id;
            outcome := 'requeued';
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Seconds until the next moment a waiting worker must act without a notification: a retry's
-- run_after in its stages, or another worker's lease expiry. NULL: nothing to wait for.
CREATE FUNCTION outbox_next_deadline(p_stages text[], p_owner text) RETURNS double precision
LANGUAGE sql STABLE AS $$
    SELECT extract(epoch FROM least(
        (SELECT min(run_after) FROM stage_tasks
          WHERE status = 'queued' AND stage = ANY (p_stages)),
        (SELECT min(lease_expires_at) FROM stage_tasks
          WHERE status = 'running' AND lease_owner IS DISTINCT FROM p_owner)
    ) - clock_timestamp())::double precision
$$;

-- SKIP LOCKED: a row locked right now is being completed, failed or rescued. Waiting for it
-- could deadlock with the worker's own completion batch, which locks the same rows in another
-- order (found by the fault suite); such a row is simply not renewed this time.
CREATE FUNCTION outbox_heartbeat(p_owner text, p_ids bigint[], p_lease_s double precision)
RETURNS SETOF bigint LANGUAGE sql AS $$
    UPDATE stage_tasks SET lease_expires_at = now() + make_interval(secs => p_lease_s)
    WHERE id IN (SELECT s.id FROM stage_tasks s
                 WHERE s.id = ANY (p_ids) AND s.lease_owner = p_owner AND s.status = 'running'
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
$$;

-- A stopping worker gives back what it could not finish; attempts stay counted. SKIP LOCKED as
-- in the heartbeat: a row locked now is being completed (its lease expires if that fails).
CREATE FUNCTION outbox_hand_back(p_owner text, p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE stage_tasks
    SET status = 'queued', run_after = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'handed back by a stopping worker'
    WHERE id IN (SELECT s.id FROM stage_tasks s
                 WHERE s.id = ANY (p_ids) AND s.lease_owner = p_owner AND s.status = 'running'
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
$$;

-- Cancel, first transaction: lock the job's variants (waiting for changes in flight, whose
-- triggers may still enqueue), then the job; mark the job and its unfinished variants cancelled.
-- Taking variants before the job follows the order every other path uses (variant, then job),
-- so cancel cannot deadlock with a completion or a fan-in.
CREATE FUNCTION outbox_cancel_job(p_job uuid) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_job jobs%ROWTYPE;
BEGIN
    -- NO KEY UPDATE, as in the fan-in: concurrent inserts' foreign-key checks hold KEY SHARE.
    PERFORM 1 FROM jobs_variants WHERE job_id = p_job ORDER BY job_variants_id FOR NO KEY UPDATE;
    SELECT * INTO v_job FROM jobs WHERE job_id = p_job FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', p_job USING ERRCODE = 'no_data_found';
    END IF;
    IF v_job.status = 'cancelled' THEN
        RAISE EXCEPTION 'job % is already cancelled', p_job USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF v_job.status = 'failed' OR (v_job.status = 'done' AND v_job.current_step IN (
           SELECT g.stage FROM stage_graph g WHERE g.level = 'job' AND NOT EXISTS (
               SELECT 1 FROM stage_graph n WHERE n.level = 'job' AND n.after_step = g.stage))) THEN
        RAISE EXCEPTION 'job % already finished (% %): nothing to cancel', p_job, v_job.current_step, v_job.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE jobs SET status = 'cancelled' WHERE job_id = p_job;
    UPDATE jobs_variants SET status = 'cancelled'
    WHERE job_id = p_job AND NOT outbox_variant_is_terminal(status, current_step);
END $$;

-- Cancel, second transaction: the job's queued and running tasks end cancelled (a running
-- stage's completion is then refused, like a lost lease). Separate from the first so that
-- waiting here on a task a worker is claiming never holds the job row.
CREATE FUNCTION outbox_cancel_tasks(p_job uuid) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE stage_tasks
    SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'job cancelled'
    WHERE job_id = p_job AND status IN ('queued', 'running');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
