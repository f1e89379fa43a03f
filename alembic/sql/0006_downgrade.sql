-- Back to 0005 (the functions 0006 replaced are put back from their files by the migration,
-- outbox_claim first: it answers from outbox_claim_v2 until then).
DROP FUNCTION outbox_complete_claim_v2;
DROP FUNCTION outbox_claim_v2;
DROP FUNCTION outbox_fail_job;
DROP FUNCTION outbox_attempts;
DROP FUNCTION outbox_attempt_ended;
ALTER TABLE stage_tasks DROP COLUMN attempt_log;
