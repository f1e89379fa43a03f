-- Claims that stay fast whatever the table holds (bench/claim_history.py, docs/benchmarks.md).
--
-- JIT off for every operation a worker calls (the triggers they fire run under the same
-- setting). With a million finished rows, the claim statement's estimated cost passed
-- jit_above_cost and jit_optimize_above_cost: every claim compiled and optimised its
-- expressions with LLVM, 0.4-1.4 s, for a statement that runs in under a millisecond. A queue's
-- statements are short; compiling them never pays.
ALTER FUNCTION outbox_complete_many SET jit = off;
ALTER FUNCTION outbox_complete SET jit = off;
ALTER FUNCTION outbox_fail SET jit = off;
ALTER FUNCTION outbox_rescue_expired SET jit = off;
ALTER FUNCTION outbox_heartbeat SET jit = off;
ALTER FUNCTION outbox_hand_back SET jit = off;
ALTER FUNCTION outbox_cancel_job SET jit = off;
ALTER FUNCTION outbox_cancel_tasks SET jit = off;

-- The claim's walk, changed in one line: a task of a cancelled job is skipped through a
-- per-row lookup of its job instead of an anti-join. The planner estimated the anti-join from
-- the jobs table's statistics, and with few jobs (one large job, or a fresh install) it
-- expected it to remove nearly every queued row: it then chose to read and sort the whole
-- queue instead of walking the index, 9 ms per claim with 20,000 queued tasks of one job.
-- The lookup is evaluated only for the rows the walk reaches, at most a few per claimed task.
CREATE OR REPLACE FUNCTION outbox_claim(p_owner text, p_stages text[], p_limit integer,
                             p_lease_s double precision, p_task_id bigint DEFAULT NULL,
                             p_alone boolean DEFAULT false)
RETURNS TABLE (id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer,
               max_attempts integer, tenant_id varchar, ad_copy text, img_asset_id uuid,
               asset_uri text, asset_tenant varchar, results jsonb, variants jsonb,
               next_deadline_s double precision, alone boolean, suspect_waiting boolean)
-- The planner, guessing few queued rows, would rather bitmap-scan every queued row of a stage
-- and sort them; the ordered index walk is what keeps a claim O(p_limit) under a backlog.
-- jit = off: see the top of this file.
-- One generic plan, made once per session and kept (force_generic_plan), in which every lookup
-- goes through its index (enable_seqscan = off; each one has an index). Left to choose, PL/pgSQL
-- re-planned the claim on every call whenever the statistics made a custom plan look cheaper
-- (0.4-0.5 ms of planning per claim, more than the claim itself), and a plan made while
-- stage_results was still empty scanned the whole table once per claimed task as it grew. A
-- queue's tables are often empty, skewed or just emptied when statistics are taken: the claim's
-- plan must not depend on them.
LANGUAGE plpgsql SET enable_bitmapscan = off SET enable_seqscan = off SET jit = off
SET plan_cache_mode = force_generic_plan AS $$
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
              AND (SELECT cj.status FROM jobs cj WHERE cj.job_id = q.job_id) <> 'cancelled'
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

-- The next deadline, in PL/pgSQL rather than SQL: a SQL function called from another function
-- is planned again on every call (0.23 ms here, for a statement that runs in 0.02 ms), and every
-- claim that finds fewer tasks than it asked for calls it. PL/pgSQL keeps the plan for the session.
CREATE OR REPLACE FUNCTION outbox_next_deadline(p_stages text[], p_owner text) RETURNS double precision
LANGUAGE plpgsql STABLE SET jit = off AS $$
BEGIN
    RETURN extract(epoch FROM least(
        (SELECT min(run_after) FROM stage_tasks
          WHERE status = 'queued' AND stage = ANY (p_stages)),
        (SELECT min(lease_expires_at) FROM stage_tasks
          WHERE status = 'running' AND lease_owner IS DISTINCT FROM p_owner)
    ) - clock_timestamp())::double precision;
END $$;
