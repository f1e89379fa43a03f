-- 0005: a worker's completion claims the next stages it enqueued, in the same statement
-- (outbox_complete_claim: one round trip, one transaction, as outbox_complete_many alone was), and
-- a queued task's wake-up notification goes out at commit, only if the task is still queued then:
-- tasks its own transaction already claimed are running under the worker's lease by the commit,
-- and waking every other worker for them only made each one run an empty claim (four per hop with
-- four workers, competing with the one that does the work).
-- Every other path is as before: an outside writer's enqueue, a retry, a rescue, a hand-back or
-- a replay leaves the task queued, and its notification is sent, in the same transaction as the
-- change (at its commit, which is when PostgreSQL delivers notifications anyway).

CREATE OR REPLACE FUNCTION outbox_notify_task_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM stage_tasks WHERE id = NEW.id AND status = 'queued') THEN
        PERFORM pg_notify('outbox_stage_tasks', NEW.stage);
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER outbox_task_queued_trigger ON stage_tasks;
CREATE CONSTRAINT TRIGGER outbox_task_queued_trigger
    AFTER INSERT OR UPDATE OF status, run_after ON stage_tasks
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION outbox_notify_task_queued();

-- outbox_complete_many, then outbox_claim, in one statement. Not two statements in one explicit
-- transaction: a connection that freezes half-open between them leaves the transaction open on
-- the server, its rows locked, and every SKIP LOCKED claim and rescue passing them over (the fault
-- suite's half-open proxy does exactly that). The claim's rows carry the accepted ids; there is
-- always at least one row (the claim's deadline row when it takes fewer than p_limit).
CREATE FUNCTION outbox_complete_claim(p_owner text, p_items jsonb, p_stages text[], p_limit integer,
                                      p_lease_s double precision, p_alone boolean)
RETURNS TABLE (id bigint, job_id uuid, job_variants_id uuid, stage text, attempt integer,
               max_attempts integer, tenant_id varchar, ad_copy text, img_asset_id uuid,
               asset_uri text, asset_tenant varchar, results jsonb, variants jsonb,
               next_deadline_s double precision, alone boolean, suspect_waiting boolean,
               accepted bigint[])
LANGUAGE plpgsql SET jit = off AS $$
DECLARE
    v_accepted bigint[] := outbox_complete_many(p_owner, p_items);
BEGIN
    RETURN QUERY SELECT c.*, v_accepted FROM outbox_claim(p_owner, p_stages, p_limit, p_lease_s, NULL, p_alone) c;
END $$;
