-- Back to 0003: the state functions, the workers table and the listing index go.
DROP FUNCTION IF EXISTS outbox_job_state, outbox_variant_state, outbox_worker_alive;
DROP INDEX IF EXISTS jobs_created_at_idx;
DROP TABLE IF EXISTS workers;
