-- Back to 0001: the functions without their jit setting (the 0001 claim and next deadline
-- are restored from 0001_functions.sql by the migration).
ALTER FUNCTION outbox_complete_many RESET jit;
ALTER FUNCTION outbox_complete RESET jit;
ALTER FUNCTION outbox_fail RESET jit;
ALTER FUNCTION outbox_rescue_expired RESET jit;
ALTER FUNCTION outbox_heartbeat RESET jit;
ALTER FUNCTION outbox_hand_back RESET jit;
ALTER FUNCTION outbox_cancel_job RESET jit;
ALTER FUNCTION outbox_cancel_tasks RESET jit;
