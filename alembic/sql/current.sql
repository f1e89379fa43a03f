-- The head schema, printed from a migrated database by outbox/schema_reference.py.
-- Generated: edit the migrations (alembic/sql/, alembic/versions/), then run
--     .venv/bin/python -m outbox.schema_reference --write
-- tests/test_schema_reference.py checks that the migrations build exactly this.
-- Printed by PostgreSQL 18 (another major version may print some definitions differently).

-- ================================================================ tables

-- artifacts
--   key text NOT NULL
--   data bytea NOT NULL
--   byte_size bigint NOT NULL
--   created_at timestamp with time zone NOT NULL DEFAULT now()

-- image_assets
--   image_asset_id uuid NOT NULL DEFAULT gen_random_uuid()
--   tenant_id character varying(255) NOT NULL
--   uri text NOT NULL
--   mime_type text
--   byte_size bigint
--   sha256 text
--   created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP

-- job_inputs
--   job_id uuid NOT NULL
--   ad_copy text NOT NULL
--   extra jsonb NOT NULL DEFAULT '{}'::jsonb
--   created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP

-- jobs
--   job_id uuid NOT NULL DEFAULT gen_random_uuid()
--   tenant_id character varying(255) NOT NULL
--   status text NOT NULL DEFAULT 'queued'::text
--   current_step text
--   created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
--   updated_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
--   expected_variants integer
--   variants_closed_at timestamp with time zone

-- jobs_variants
--   job_variants_id uuid NOT NULL DEFAULT gen_random_uuid()
--   job_id uuid NOT NULL
--   img_asset_id uuid
--   creation_order integer NOT NULL
--   selected boolean DEFAULT false
--   status text DEFAULT 'queued'::text
--   current_step text
--   created_at timestamp with time zone NOT NULL DEFAULT CURRENT_TIMESTAMP
--   updated_at timestamp with time zone DEFAULT CURRENT_TIMESTAMP

-- stage_graph
--   stage text NOT NULL
--   level text NOT NULL
--   after_step text NOT NULL
--   device text NOT NULL
--   max_attempts integer NOT NULL
--   timeout_s integer NOT NULL
--   position integer NOT NULL

-- stage_results
--   id bigint NOT NULL
--   task_id bigint NOT NULL
--   job_id uuid NOT NULL
--   job_variants_id uuid
--   stage text NOT NULL
--   attempt integer NOT NULL
--   result jsonb NOT NULL
--   created_at timestamp with time zone NOT NULL DEFAULT now()

-- stage_tasks
--   id bigint NOT NULL
--   job_id uuid NOT NULL
--   job_variants_id uuid
--   stage text NOT NULL
--   status text NOT NULL DEFAULT 'queued'::text
--   attempts integer NOT NULL DEFAULT 0
--   max_attempts integer NOT NULL
--   expired_leases integer NOT NULL DEFAULT 0
--   run_after timestamp with time zone NOT NULL DEFAULT now()
--   lease_owner text
--   lease_expires_at timestamp with time zone
--   last_error text
--   error_details jsonb
--   created_at timestamp with time zone NOT NULL DEFAULT now()
--   started_at timestamp with time zone
--   finished_at timestamp with time zone
--   attempt_log jsonb NOT NULL DEFAULT '[]'::jsonb

-- workers
--   id text NOT NULL
--   host text NOT NULL
--   pid integer NOT NULL
--   stages text[] NOT NULL
--   lease_s double precision NOT NULL
--   started_at timestamp with time zone NOT NULL DEFAULT now()
--   stopped_at timestamp with time zone

-- ================================================================ the stage graph (data)
INSERT INTO stage_graph VALUES ('vlm_analyze', 'variant', 'img_gen', 'gpu', 3, 300, 1);
INSERT INTO stage_graph VALUES ('yolo_detect', 'variant', 'vlm_analyze', 'gpu', 3, 300, 2);
INSERT INTO stage_graph VALUES ('planner', 'variant', 'yolo_detect', 'cpu', 3, 300, 3);
INSERT INTO stage_graph VALUES ('overlay', 'variant', 'planner', 'cpu', 3, 300, 4);
INSERT INTO stage_graph VALUES ('vlm_judge', 'variant', 'overlay', 'gpu', 3, 300, 5);
INSERT INTO stage_graph VALUES ('ocr_eval', 'variant', 'vlm_judge', 'cpu', 3, 300, 6);
INSERT INTO stage_graph VALUES ('readability_eval', 'variant', 'ocr_eval', 'cpu', 3, 300, 7);
INSERT INTO stage_graph VALUES ('iou_eval', 'variant', 'readability_eval', 'cpu', 3, 300, 8);
INSERT INTO stage_graph VALUES ('ad_copy_gen_kor', 'job', 'iou_eval', 'cpu', 3, 300, 9);
INSERT INTO stage_graph VALUES ('instagram_feed_gen', 'job', 'ad_copy_gen_kor', 'cpu', 3, 300, 10);

-- ================================================================ constraints
ALTER TABLE artifacts ADD CONSTRAINT artifacts_pkey PRIMARY KEY (key);
ALTER TABLE image_assets ADD CONSTRAINT image_assets_pkey PRIMARY KEY (image_asset_id);
ALTER TABLE image_assets ADD CONSTRAINT image_assets_tenant_id_format CHECK (((tenant_id)::text ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$'::text)) NOT VALID NOT VALID;
ALTER TABLE job_inputs ADD CONSTRAINT job_inputs_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs(job_id) ON DELETE CASCADE;
ALTER TABLE job_inputs ADD CONSTRAINT job_inputs_pkey PRIMARY KEY (job_id);
ALTER TABLE jobs ADD CONSTRAINT jobs_expected_variants_check CHECK ((expected_variants >= 1));
ALTER TABLE jobs ADD CONSTRAINT jobs_pkey PRIMARY KEY (job_id);
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'done'::text, 'failed'::text, 'cancelled'::text])));
ALTER TABLE jobs ADD CONSTRAINT jobs_tenant_id_format CHECK (((tenant_id)::text ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$'::text)) NOT VALID NOT VALID;
ALTER TABLE jobs_variants ADD CONSTRAINT jobs_variants_img_asset_id_fkey FOREIGN KEY (img_asset_id) REFERENCES image_assets(image_asset_id);
ALTER TABLE jobs_variants ADD CONSTRAINT jobs_variants_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs(job_id) ON DELETE CASCADE;
ALTER TABLE jobs_variants ADD CONSTRAINT jobs_variants_pkey PRIMARY KEY (job_variants_id);
ALTER TABLE jobs_variants ADD CONSTRAINT jobs_variants_status_check CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'done'::text, 'failed'::text, 'cancelled'::text])));
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_device_check CHECK ((device = ANY (ARRAY['cpu'::text, 'gpu'::text])));
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_level_after_step_key UNIQUE (level, after_step);
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_level_check CHECK ((level = ANY (ARRAY['variant'::text, 'job'::text])));
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_max_attempts_check CHECK ((max_attempts >= 1));
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_pkey PRIMARY KEY (stage);
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_position_key UNIQUE ("position");
ALTER TABLE stage_graph ADD CONSTRAINT stage_graph_timeout_s_check CHECK ((timeout_s >= 1));
ALTER TABLE stage_results ADD CONSTRAINT stage_results_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs(job_id) ON DELETE CASCADE;
ALTER TABLE stage_results ADD CONSTRAINT stage_results_job_variants_id_fkey FOREIGN KEY (job_variants_id) REFERENCES jobs_variants(job_variants_id) ON DELETE CASCADE;
ALTER TABLE stage_results ADD CONSTRAINT stage_results_pkey PRIMARY KEY (id);
ALTER TABLE stage_results ADD CONSTRAINT stage_results_task_id_fkey FOREIGN KEY (task_id) REFERENCES stage_tasks(id) ON DELETE CASCADE;
ALTER TABLE stage_results ADD CONSTRAINT stage_results_task_id_key UNIQUE (task_id);
ALTER TABLE stage_tasks ADD CONSTRAINT stage_tasks_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs(job_id) ON DELETE CASCADE;
ALTER TABLE stage_tasks ADD CONSTRAINT stage_tasks_job_variants_id_fkey FOREIGN KEY (job_variants_id) REFERENCES jobs_variants(job_variants_id) ON DELETE CASCADE;
ALTER TABLE stage_tasks ADD CONSTRAINT stage_tasks_pkey PRIMARY KEY (id);
ALTER TABLE stage_tasks ADD CONSTRAINT stage_tasks_stage_fkey FOREIGN KEY (stage) REFERENCES stage_graph(stage);
ALTER TABLE stage_tasks ADD CONSTRAINT stage_tasks_status_check CHECK ((status = ANY (ARRAY['queued'::text, 'running'::text, 'done'::text, 'failed'::text, 'cancelled'::text])));
ALTER TABLE workers ADD CONSTRAINT workers_lease_s_check CHECK ((lease_s > (0)::double precision));
ALTER TABLE workers ADD CONSTRAINT workers_pkey PRIMARY KEY (id);

-- ================================================================ indexes
CREATE INDEX artifacts_created_at_idx ON public.artifacts USING btree (created_at);
CREATE UNIQUE INDEX artifacts_pkey ON public.artifacts USING btree (key);
CREATE UNIQUE INDEX image_assets_pkey ON public.image_assets USING btree (image_asset_id);
CREATE UNIQUE INDEX job_inputs_pkey ON public.job_inputs USING btree (job_id);
CREATE INDEX jobs_created_at_idx ON public.jobs USING btree (created_at);
CREATE INDEX jobs_current_step_idx ON public.jobs USING btree (current_step);
CREATE UNIQUE INDEX jobs_pkey ON public.jobs USING btree (job_id);
CREATE INDEX jobs_status_idx ON public.jobs USING btree (status);
CREATE INDEX jobs_updated_at_idx ON public.jobs USING btree (updated_at);
CREATE INDEX jobs_variants_current_step_idx ON public.jobs_variants USING btree (current_step);
CREATE INDEX jobs_variants_job_id_status_idx ON public.jobs_variants USING btree (job_id, status);
CREATE UNIQUE INDEX jobs_variants_pkey ON public.jobs_variants USING btree (job_variants_id);
CREATE INDEX jobs_variants_status_idx ON public.jobs_variants USING btree (status);
CREATE UNIQUE INDEX stage_graph_level_after_step_key ON public.stage_graph USING btree (level, after_step);
CREATE UNIQUE INDEX stage_graph_pkey ON public.stage_graph USING btree (stage);
CREATE UNIQUE INDEX stage_graph_position_key ON public.stage_graph USING btree ("position");
CREATE INDEX stage_results_job_idx ON public.stage_results USING btree (job_id);
CREATE UNIQUE INDEX stage_results_pkey ON public.stage_results USING btree (id);
CREATE UNIQUE INDEX stage_results_task_id_key ON public.stage_results USING btree (task_id);
CREATE INDEX stage_results_variant_idx ON public.stage_results USING btree (job_variants_id);
CREATE INDEX stage_tasks_claimable_idx ON public.stage_tasks USING btree (stage, run_after, id) WHERE (status = 'queued'::text);
CREATE INDEX stage_tasks_expired_queued_idx ON public.stage_tasks USING btree (stage, run_after) WHERE ((status = 'queued'::text) AND (expired_leases > 0));
CREATE INDEX stage_tasks_failed_idx ON public.stage_tasks USING btree (finished_at) WHERE (status = 'failed'::text);
CREATE INDEX stage_tasks_job_idx ON public.stage_tasks USING btree (job_id);
CREATE UNIQUE INDEX stage_tasks_job_stage_key ON public.stage_tasks USING btree (job_id, stage) WHERE (job_variants_id IS NULL);
CREATE UNIQUE INDEX stage_tasks_pkey ON public.stage_tasks USING btree (id);
CREATE INDEX stage_tasks_running_lease_idx ON public.stage_tasks USING btree (lease_expires_at) WHERE (status = 'running'::text);
CREATE UNIQUE INDEX stage_tasks_variant_stage_key ON public.stage_tasks USING btree (job_variants_id, stage) WHERE (job_variants_id IS NOT NULL);
CREATE UNIQUE INDEX workers_pkey ON public.workers USING btree (id);

-- ================================================================ functions

CREATE OR REPLACE FUNCTION public.notify_job_state_change()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.notify_job_variant_state_change()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_attempt_ended(p_task stage_tasks, p_outcome text, p_error text)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $function$
    SELECT p_task.attempt_log || jsonb_build_object(
        'attempt', p_task.attempts, 'worker', p_task.lease_owner, 'started_at', p_task.started_at,
        'ended_at', now(), 'outcome', p_outcome, 'error', p_error)
$function$;

CREATE OR REPLACE FUNCTION public.outbox_attempts(p_task stage_tasks)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
 SET jit TO 'off'
AS $function$
    SELECT CASE WHEN p_task.status = 'done' AND p_task.lease_owner IS NOT NULL
                THEN p_task.attempt_log || jsonb_build_object(
                    'attempt', p_task.attempts, 'worker', p_task.lease_owner, 'started_at', p_task.started_at,
                    'ended_at', p_task.finished_at, 'outcome', 'done', 'error', NULL)
                ELSE p_task.attempt_log END
$function$;

CREATE OR REPLACE FUNCTION public.outbox_cancel(p_job uuid, OUT already_cancelled boolean, OUT tasks integer)
 RETURNS record
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_cancel_job(p_job uuid)
 RETURNS void
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
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
    IF outbox_job_state(v_job.status, v_job.current_step) <> 'open' THEN
        RAISE EXCEPTION 'job % already finished (% %): nothing to cancel', p_job, v_job.current_step, v_job.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE jobs SET status = 'cancelled' WHERE job_id = p_job;
    UPDATE jobs_variants SET status = 'cancelled'
    WHERE job_id = p_job AND NOT outbox_variant_is_terminal(status, current_step);
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_cancel_leftovers(p_job uuid)
 RETURNS integer
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    n integer;
BEGIN
    UPDATE stage_tasks
    SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'job cancelled',
        attempt_log = CASE WHEN status = 'running' THEN outbox_attempt_ended(stage_tasks, 'cancelled', 'job cancelled')
                           ELSE attempt_log END
    WHERE id IN (SELECT s.id FROM stage_tasks s WHERE s.job_id = p_job AND s.status IN ('queued', 'running')
                 FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE jobs_variants SET status = 'cancelled'
    WHERE job_variants_id IN (SELECT v.job_variants_id FROM jobs_variants v
                              WHERE v.job_id = p_job AND NOT outbox_variant_is_terminal(v.status, v.current_step)
                              FOR NO KEY UPDATE SKIP LOCKED);
    RETURN n;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_cancel_tasks(p_job uuid)
 RETURNS integer
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    n integer;
BEGIN
    UPDATE stage_tasks
    SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'job cancelled',
        attempt_log = CASE WHEN status = 'running' THEN outbox_attempt_ended(stage_tasks, 'cancelled', 'job cancelled')
                           ELSE attempt_log END
    WHERE job_id = p_job AND status IN ('queued', 'running');
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_claim(p_owner text, p_stages text[], p_limit integer, p_lease_s double precision, p_task_id bigint DEFAULT NULL::bigint, p_alone boolean DEFAULT false)
 RETURNS TABLE(id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer, max_attempts integer, tenant_id character varying, ad_copy text, img_asset_id uuid, asset_uri text, asset_tenant character varying, results jsonb, variants jsonb, next_deadline_s double precision, alone boolean, suspect_waiting boolean)
 LANGUAGE sql
 SET jit TO 'off'
AS $function$
    SELECT c.id, c.job_id, c.job_variants_id, c.stage, c.attempt, c.max_attempts, c.tenant_id,
           c.ad_copy, c.img_asset_id, c.asset_uri, c.asset_tenant, c.results, c.variants,
           c.next_deadline_s, c.alone, c.suspect_waiting
    FROM outbox_claim_v2(p_owner, p_stages, p_limit, p_lease_s, p_task_id, p_alone) c
$function$;

CREATE OR REPLACE FUNCTION public.outbox_claim_v2(p_owner text, p_stages text[], p_limit integer, p_lease_s double precision, p_task_id bigint DEFAULT NULL::bigint, p_alone boolean DEFAULT false)
 RETURNS TABLE(id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer, max_attempts integer, tenant_id character varying, ad_copy text, img_asset_id uuid, asset_uri text, asset_tenant character varying, results jsonb, variants jsonb, next_deadline_s double precision, alone boolean, suspect_waiting boolean, waited_s double precision, job_created_at timestamp with time zone)
 LANGUAGE plpgsql
 SET enable_bitmapscan TO 'off'
 SET enable_seqscan TO 'off'
 SET jit TO 'off'
 SET plan_cache_mode TO 'force_generic_plan'
AS $function$
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
        RETURNING t.id, t.job_id, t.job_variants_id, t.stage, t.attempts, t.max_attempts, t.run_after
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
           NULL::double precision, coalesce(c.id = v_suspect, false), NULL::boolean,
           greatest(extract(epoch FROM now() - c.run_after)::double precision, 0), j.created_at
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
                            outbox_next_deadline(p_stages, p_owner), NULL::boolean, v_waiting,
                            NULL::double precision, NULL::timestamptz;
    END IF;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_complete(p_task_id bigint, p_owner text, p_attempt integer, p_result jsonb)
 RETURNS boolean
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    t stage_tasks%ROWTYPE;
BEGIN
    UPDATE stage_tasks
    SET status = 'done', finished_at = now(), lease_expires_at = NULL
    WHERE stage_tasks.id = p_task_id AND status = 'running'
      AND lease_owner = p_owner AND attempts = p_attempt
    RETURNING * INTO t;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM jobs WHERE jobs.job_id = t.job_id AND status = 'cancelled') THEN
        UPDATE stage_tasks SET status = 'cancelled', lease_owner = NULL, last_error = 'job cancelled; result dropped',
            attempt_log = outbox_attempt_ended(t, 'cancelled', 'job cancelled; result dropped')
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_complete_claim(p_owner text, p_items jsonb, p_stages text[], p_limit integer, p_lease_s double precision, p_alone boolean)
 RETURNS TABLE(id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer, max_attempts integer, tenant_id character varying, ad_copy text, img_asset_id uuid, asset_uri text, asset_tenant character varying, results jsonb, variants jsonb, next_deadline_s double precision, alone boolean, suspect_waiting boolean, accepted bigint[])
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    v_accepted bigint[] := outbox_complete_many(p_owner, p_items);
BEGIN
    RETURN QUERY SELECT c.*, v_accepted FROM outbox_claim(p_owner, p_stages, p_limit, p_lease_s, NULL, p_alone) c;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_complete_claim_v2(p_owner text, p_items jsonb, p_stages text[], p_limit integer, p_lease_s double precision, p_alone boolean)
 RETURNS TABLE(id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer, max_attempts integer, tenant_id character varying, ad_copy text, img_asset_id uuid, asset_uri text, asset_tenant character varying, results jsonb, variants jsonb, next_deadline_s double precision, alone boolean, suspect_waiting boolean, waited_s double precision, job_created_at timestamp with time zone, accepted bigint[])
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    v_accepted bigint[] := outbox_complete_many(p_owner, p_items);
BEGIN
    RETURN QUERY SELECT c.*, v_accepted FROM outbox_claim_v2(p_owner, p_stages, p_limit, p_lease_s, NULL, p_alone) c;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_complete_many(p_owner text, p_items jsonb)
 RETURNS bigint[]
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_enqueue_after(p_level text, p_job uuid, p_variant uuid, p_step text)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_fail(p_task_id bigint, p_owner text, p_attempt integer, p_error text, p_details jsonb, p_permanent boolean, p_retry_in_s double precision)
 RETURNS text
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
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
            last_error = p_error, error_details = p_details,
            attempt_log = outbox_attempt_ended(t, 'cancelled', p_error)
        WHERE stage_tasks.id = t.id;
        RETURN 'lost';
    END IF;
    IF p_permanent OR t.attempts >= t.max_attempts THEN
        UPDATE stage_tasks
        SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
            last_error = p_error, error_details = p_details,
            attempt_log = outbox_attempt_ended(t, 'failed', p_error)
        WHERE stage_tasks.id = t.id;
        PERFORM outbox_set_owner_state(t, 'failed');
        RETURN 'failed';
    END IF;
    UPDATE stage_tasks
    SET status = 'queued', run_after = now() + make_interval(secs => p_retry_in_s),
        lease_owner = NULL, lease_expires_at = NULL, last_error = p_error, error_details = p_details,
        attempt_log = outbox_attempt_ended(t, 'retry', p_error)
    WHERE stage_tasks.id = t.id;
    RETURN 'retry';
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_fail_job(p_job uuid, p_error text)
 RETURNS integer
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    v_job jobs%ROWTYPE;
    n integer;
BEGIN
    PERFORM outbox_mark_engine_write();
    PERFORM 1 FROM jobs_variants WHERE job_id = p_job ORDER BY job_variants_id FOR NO KEY UPDATE;
    SELECT * INTO v_job FROM jobs WHERE job_id = p_job FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no job %', p_job USING ERRCODE = 'no_data_found';
    END IF;
    IF outbox_job_state(v_job.status, v_job.current_step) <> 'open' THEN
        RETURN 0;
    END IF;
    UPDATE jobs SET status = 'failed' WHERE job_id = p_job;
    UPDATE stage_tasks
    SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        last_error = p_error, error_details = jsonb_build_object('reason', 'job failed by its owner'),
        attempt_log = CASE WHEN status = 'running' THEN outbox_attempt_ended(stage_tasks, 'abandoned', p_error)
                           ELSE attempt_log END
    WHERE job_id = p_job AND status IN ('queued', 'running');
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE jobs_variants SET status = 'failed'
    WHERE job_id = p_job AND NOT outbox_variant_is_terminal(status, current_step);
    RETURN n;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_fan_in(p_job uuid)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_hand_back(p_owner text, p_ids bigint[])
 RETURNS SETOF bigint
 LANGUAGE sql
 SET jit TO 'off'
AS $function$
    UPDATE stage_tasks
    SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
        last_error = 'handed back by a stopping worker'
    WHERE id IN (SELECT s.id FROM stage_tasks s
                 WHERE s.id = ANY (p_ids) AND s.lease_owner = p_owner AND s.status = 'running'
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
$function$;

CREATE OR REPLACE FUNCTION public.outbox_heartbeat(p_owner text, p_ids bigint[], p_lease_s double precision)
 RETURNS SETOF bigint
 LANGUAGE sql
 SET jit TO 'off'
AS $function$
    UPDATE stage_tasks SET lease_expires_at = now() + make_interval(secs => p_lease_s)
    WHERE id IN (SELECT s.id FROM stage_tasks s
                 WHERE s.id = ANY (p_ids) AND s.lease_owner = p_owner AND s.status = 'running'
                 FOR UPDATE SKIP LOCKED)
    RETURNING id
$function$;

CREATE OR REPLACE FUNCTION public.outbox_is_stage(p_step text, p_level text DEFAULT NULL::text)
 RETURNS boolean
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN EXISTS (SELECT 1 FROM stage_graph g WHERE g.stage = p_step AND (p_level IS NULL OR g.level = p_level));
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_job_before_write()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF NEW.current_step = 'img_gen' AND NEW.status = 'done' THEN
        NEW.variants_closed_at := coalesce(NEW.variants_closed_at, now());
        IF TG_OP = 'UPDATE' AND outbox_is_stage(OLD.current_step) THEN
            NEW.current_step := OLD.current_step;
            NEW.status := OLD.status;
        END IF;
    END IF;
    RETURN NEW;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_job_past_fan_in(p_status text, p_step text)
 RETURNS boolean
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN p_status IN ('failed', 'cancelled')
        OR (p_status = 'done' AND p_step = outbox_last_variant_stage())
        OR outbox_is_stage(p_step, 'job');
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_job_settle()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE jobs j SET variants_closed_at = now()
        WHERE j.job_id = NEW.job_id AND j.variants_closed_at IS NULL AND j.expected_variants IS NULL
          AND EXISTS (SELECT 1 FROM jobs_variants v WHERE v.job_id = j.job_id);
        IF FOUND THEN
            RETURN NULL;  -- jobs_settle_on_close runs the fan-in for this closing write
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = NEW.job_id AND j.variants_closed_at IS NOT NULL) THEN
        PERFORM outbox_fan_in(NEW.job_id);
    END IF;
    RETURN NULL;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_job_state(p_status text, p_step text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET jit TO 'off'
AS $function$
BEGIN
    IF p_status IN ('failed', 'cancelled') THEN
        RETURN p_status;
    END IF;
    IF p_status = 'done' AND p_step = outbox_last_job_stage() THEN
        RETURN 'done';
    END IF;
    RETURN 'open';
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_job_write_refusal(p_job uuid, p_old_step text, p_old_status text, p_new_step text, p_new_status text, p_closed timestamp with time zone)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_last_job_stage()
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN (SELECT g.stage FROM stage_graph g
            WHERE g.level = 'job'
              AND NOT EXISTS (SELECT 1 FROM stage_graph n WHERE n.level = 'job' AND n.after_step = g.stage));
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_last_variant_stage()
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN (SELECT g.stage FROM stage_graph g
            WHERE g.level = 'variant'
              AND NOT EXISTS (SELECT 1 FROM stage_graph n WHERE n.level = 'variant' AND n.after_step = g.stage));
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_mark_engine_write()
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    PERFORM set_config('adflow.engine_write', 'on', true);
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_next_deadline(p_stages text[], p_owner text)
 RETURNS double precision
 LANGUAGE plpgsql
 STABLE
 SET jit TO 'off'
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_notify_task_queued()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF EXISTS (SELECT 1 FROM stage_tasks WHERE id = NEW.id AND status = 'queued') THEN
        PERFORM pg_notify('outbox_stage_tasks', NEW.stage);
    END IF;
    RETURN NULL;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_open_variant_sets(p_limit integer)
 RETURNS TABLE(job_id text, tenant_id character varying, current_step text, status text, expected_variants integer, age_s double precision, variants bigint, finished bigint)
 LANGUAGE sql
 STABLE
 SET jit TO 'off'
AS $function$
    SELECT j.job_id::text, j.tenant_id, j.current_step, j.status, j.expected_variants,
           extract(epoch FROM now() - j.created_at)::double precision,
           count(v.job_variants_id),
           count(v.job_variants_id) FILTER (WHERE outbox_variant_is_terminal(v.status, v.current_step))
    FROM jobs j LEFT JOIN jobs_variants v ON v.job_id = j.job_id
    WHERE j.variants_closed_at IS NULL AND j.status NOT IN ('failed', 'cancelled')
      AND (j.current_step = 'img_gen'
           OR j.current_step IN (SELECT g.stage FROM stage_graph g WHERE g.level = 'variant'))
    GROUP BY j.job_id ORDER BY j.created_at LIMIT p_limit
$function$;

CREATE OR REPLACE FUNCTION public.outbox_rescue_expired(p_limit integer DEFAULT 1000)
 RETURNS TABLE(id bigint, outcome text)
 LANGUAGE plpgsql
 SET jit TO 'off'
AS $function$
DECLARE
    t stage_tasks%ROWTYPE;
    v_log jsonb;
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
        v_log := outbox_attempt_ended(t, 'lease expired',
                                      format('lease expired (worker %s stopped: crash, kill or lost connection)',
                                             t.lease_owner));
        IF EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = t.job_id AND j.status = 'cancelled') THEN
            UPDATE stage_tasks s
            SET status = 'cancelled', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1, last_error = 'job cancelled (lease expired)',
                attempt_log = v_log
            WHERE s.id = t.id;
            outcome := 'cancelled';
        ELSIF t.attempts >= t.max_attempts THEN
            UPDATE stage_tasks s
            SET status = 'failed', finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1, attempt_log = v_log,
                last_error = format('lease expired at attempt %s of %s (worker %s stopped: crash, kill or lost connection)',
                                    t.attempts, t.max_attempts, t.lease_owner)
            WHERE s.id = t.id;
            PERFORM outbox_set_owner_state(t, 'failed');
            outcome := 'failed';
        ELSE
            UPDATE stage_tasks s
            SET status = 'queued', lease_owner = NULL, lease_expires_at = NULL,
                expired_leases = t.expired_leases + 1, attempt_log = v_log,
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_set_owner_state(p_task stage_tasks, p_status text)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    -- A cancelled variant or job stays cancelled whatever a late worker reports.
    IF p_task.job_variants_id IS NOT NULL THEN
        UPDATE jobs_variants SET current_step = p_task.stage, status = p_status
        WHERE job_variants_id = p_task.job_variants_id AND status IS DISTINCT FROM 'cancelled';
    ELSE
        UPDATE jobs SET current_step = p_task.stage, status = p_status
        WHERE job_id = p_task.job_id AND status <> 'cancelled';
    END IF;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_touch_updated_at()
 RETURNS trigger
 LANGUAGE plpgsql
AS $function$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_variant_is_terminal(p_status text, p_step text)
 RETURNS boolean
 LANGUAGE sql
 STABLE
AS $function$
    SELECT p_status IN ('failed', 'cancelled')
        OR (p_status = 'done' AND p_step = outbox_last_variant_stage())
$function$;

CREATE OR REPLACE FUNCTION public.outbox_variant_state(p_status text, p_step text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
 SET jit TO 'off'
AS $function$
BEGIN
    IF p_status IN ('failed', 'cancelled', 'running') THEN
        RETURN p_status;
    END IF;
    IF p_status = 'done' AND p_step = outbox_last_variant_stage() THEN
        RETURN 'done';
    END IF;
    RETURN 'queued';
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_variant_write_refusal(p_variant uuid, p_old_step text, p_new_step text, p_new_status text)
 RETURNS text
 LANGUAGE plpgsql
 STABLE
AS $function$
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
END $function$;

CREATE OR REPLACE FUNCTION public.outbox_worker_alive(p_id text)
 RETURNS boolean
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN EXISTS (SELECT 1 FROM pg_stat_activity a
                   WHERE a.datname = current_database() AND a.application_name = left(p_id, 63));
END $function$;

-- ================================================================ triggers
CREATE TRIGGER job_state_change_trigger AFTER INSERT OR UPDATE OF status, current_step ON public.jobs FOR EACH ROW EXECUTE FUNCTION notify_job_state_change();
CREATE TRIGGER jobs_before_write BEFORE INSERT OR UPDATE OF status, current_step ON public.jobs FOR EACH ROW EXECUTE FUNCTION outbox_job_before_write();
CREATE CONSTRAINT TRIGGER jobs_settle_on_close AFTER UPDATE ON public.jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (((old.variants_closed_at IS NULL) AND (new.variants_closed_at IS NOT NULL))) EXECUTE FUNCTION outbox_job_settle();
CREATE CONSTRAINT TRIGGER jobs_settle_on_insert AFTER INSERT ON public.jobs DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION outbox_job_settle();
CREATE TRIGGER jobs_touch_updated_at BEFORE UPDATE ON public.jobs FOR EACH ROW EXECUTE FUNCTION outbox_touch_updated_at();
CREATE TRIGGER job_variant_state_change_trigger AFTER INSERT OR UPDATE OF status, current_step ON public.jobs_variants FOR EACH ROW EXECUTE FUNCTION notify_job_variant_state_change();
CREATE TRIGGER jobs_variants_touch_updated_at BEFORE UPDATE ON public.jobs_variants FOR EACH ROW EXECUTE FUNCTION outbox_touch_updated_at();
CREATE CONSTRAINT TRIGGER outbox_task_queued_trigger AFTER INSERT OR UPDATE OF status, run_after ON public.stage_tasks DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ((new.status = 'queued'::text)) EXECUTE FUNCTION outbox_notify_task_queued();
