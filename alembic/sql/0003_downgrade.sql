-- Back to 0002: the new triggers, functions, columns and constraints go; the functions 0003
-- replaced are restored from 0001_functions.sql and 0002_claim_planning.sql by the migration.
DROP TRIGGER IF EXISTS jobs_settle_on_close ON jobs;
DROP TRIGGER IF EXISTS jobs_settle_on_insert ON jobs;
DROP TRIGGER IF EXISTS jobs_before_write ON jobs;
DROP FUNCTION IF EXISTS outbox_job_settle, outbox_job_before_write, outbox_cancel, outbox_cancel_leftovers,
    outbox_mark_engine_write;
DROP FUNCTION IF EXISTS outbox_open_variant_sets;
ALTER TABLE image_assets DROP CONSTRAINT IF EXISTS image_assets_tenant_id_format;
ALTER TABLE jobs DROP CONSTRAINT IF EXISTS jobs_tenant_id_format;
