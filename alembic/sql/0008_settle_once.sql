-- The settle of a job inserted together with its variants, once instead of twice. Closing the set
-- (the UPDATE below) fires jobs_settle_on_close later in the same commit, which tries the fan-in;
-- the insert's own settle tried it too, a second full fan-in on a job whose variants had just
-- been written. In the outside writer's new session, where every plpgsql statement is planned
-- afresh, that second try was a fifth of its COMMIT: 1.70 -> 1.41 ms on PostgreSQL 15
-- (docs/benchmarks.md, "Every hop, looked at from the worker's side"). Same triggers, same answer.
CREATE OR REPLACE FUNCTION outbox_job_settle() RETURNS trigger LANGUAGE plpgsql AS $$
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
END $$;
