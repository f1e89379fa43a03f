-- Back to 0004: the notification is sent as the task is written (the function itself is put back
-- from 0001_functions.sql by the migration).
DROP TRIGGER outbox_task_queued_trigger ON stage_tasks;
CREATE TRIGGER outbox_task_queued_trigger
    AFTER INSERT OR UPDATE OF status, run_after ON stage_tasks
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION outbox_notify_task_queued();
DROP FUNCTION IF EXISTS outbox_complete_claim;
