-- Tables and indexes of the pipeline: the old system's data (jobs, jobs_variants, image_assets,
-- job_inputs, names kept) plus the outbox (stage_graph, stage_tasks, stage_results).

CREATE TABLE image_assets (
    image_asset_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id      varchar(255) NOT NULL,
    -- An artifact-store key ("assets/...") or, for rows written by outside tools, "file:<path>"
    -- relative to ASSET_ROOT.
    uri            text NOT NULL,
    mime_type      text,
    byte_size      bigint,
    sha256         text,
    created_at     timestamptz NOT NULL DEFAULT current_timestamp
);

CREATE TABLE jobs (
    job_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id    varchar(255) NOT NULL,
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    current_step text,
    created_at   timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at   timestamptz NOT NULL DEFAULT current_timestamp
);
CREATE INDEX jobs_status_idx ON jobs (status);
CREATE INDEX jobs_current_step_idx ON jobs (current_step);

CREATE TABLE job_inputs (
    job_id     uuid PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
    ad_copy    text NOT NULL,
    extra      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT current_timestamp
);

CREATE TABLE jobs_variants (
    job_variants_id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id          uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    img_asset_id    uuid REFERENCES image_assets (image_asset_id),
    creation_order  integer NOT NULL,
    selected        boolean DEFAULT false,
    status          text DEFAULT 'queued'
                    CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    current_step    text,
    created_at      timestamptz NOT NULL DEFAULT current_timestamp,
    updated_at      timestamptz DEFAULT current_timestamp
);
CREATE INDEX jobs_variants_status_idx ON jobs_variants (status);
CREATE INDEX jobs_variants_current_step_idx ON jobs_variants (current_step);
CREATE INDEX jobs_variants_job_id_status_idx ON jobs_variants (job_id, status);

-- The stage graph, the one source of truth for what follows what: a row of `level` reaching
-- (after_step, 'done') gets `stage` enqueued. The triggers read it; workers check it at start.
CREATE TABLE stage_graph (
    stage        text PRIMARY KEY,
    level        text NOT NULL CHECK (level IN ('variant', 'job')),
    after_step   text NOT NULL,
    device       text NOT NULL CHECK (device IN ('cpu', 'gpu')),
    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
    timeout_s    integer NOT NULL CHECK (timeout_s >= 1),
    position     integer NOT NULL UNIQUE
);

CREATE TABLE stage_tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id           uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    job_variants_id  uuid REFERENCES jobs_variants (job_variants_id) ON DELETE CASCADE,
    stage            text NOT NULL REFERENCES stage_graph (stage),
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    -- Attempts that ended with the lease running out (the worker died, froze or lost the
    -- database): such a task's last attempt runs alone (crash isolation, see outbox_claim).
    expired_leases   integer NOT NULL DEFAULT 0,
    run_after        timestamptz NOT NULL DEFAULT now(),
    lease_owner      text,
    lease_expires_at timestamptz,
    last_error       text,
    error_details    jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);
-- One task per (variant, stage) and per (job, stage): a duplicate enqueue is a no-op.
CREATE UNIQUE INDEX stage_tasks_variant_stage_key ON stage_tasks (job_variants_id, stage)
    WHERE job_variants_id IS NOT NULL;
CREATE UNIQUE INDEX stage_tasks_job_stage_key ON stage_tasks (job_id, stage)
    WHERE job_variants_id IS NULL;
-- Only claimable rows: stays small however many finished rows the table holds.
CREATE INDEX stage_tasks_claimable_idx ON stage_tasks (stage, run_after, id) WHERE status = 'queued';
-- Leases to watch for expiry (a dead worker's tasks).
CREATE INDEX stage_tasks_running_lease_idx ON stage_tasks (lease_expires_at) WHERE status = 'running';
-- Queued tasks whose worker died under them (usually none): the claim looks here first.
CREATE INDEX stage_tasks_expired_queued_idx ON stage_tasks (stage, run_after)
    WHERE status = 'queued' AND expired_leases > 0;
CREATE INDEX stage_tasks_job_idx ON stage_tasks (job_id);
CREATE INDEX stage_tasks_failed_idx ON stage_tasks (finished_at) WHERE status = 'failed';

-- One result per task, hence per (variant, stage) and per (job, stage), written in the
-- transaction that marks the task done.
CREATE TABLE stage_results (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         bigint NOT NULL UNIQUE REFERENCES stage_tasks (id) ON DELETE CASCADE,
    job_id          uuid NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    job_variants_id uuid REFERENCES jobs_variants (job_variants_id) ON DELETE CASCADE,
    stage           text NOT NULL,
    attempt         integer NOT NULL,
    result          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stage_results_variant_idx ON stage_results (job_variants_id);
CREATE INDEX stage_results_job_idx ON stage_results (job_id);

-- The `postgres` artifact store: bytes in the same database, written in the completion
-- transaction, readable by every replica. Keys start with the tenant id.
CREATE TABLE artifacts (
    key        text PRIMARY KEY,
    data       bytea NOT NULL,
    byte_size  bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX artifacts_created_at_idx ON artifacts (created_at);
-- Retention finds finished jobs by age.
CREATE INDEX jobs_updated_at_idx ON jobs (updated_at);
