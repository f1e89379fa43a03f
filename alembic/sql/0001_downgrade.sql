DROP TABLE IF EXISTS artifacts, stage_results, stage_tasks, stage_graph, jobs_variants, job_inputs, jobs, image_assets CASCADE;
DROP FUNCTION IF EXISTS outbox_touch_updated_at, outbox_last_variant_stage, outbox_variant_is_terminal,
    outbox_enqueue_after, outbox_fan_in, notify_job_variant_state_change, notify_job_state_change,
    outbox_notify_task_queued, outbox_set_owner_state, outbox_claim, outbox_complete,
    outbox_complete_many, outbox_fail, outbox_rescue_expired, outbox_next_deadline,
    outbox_heartbeat, outbox_hand_back, outbox_cancel_job, outbox_cancel_tasks CASCADE;
