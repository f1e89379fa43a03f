-- After every migration, as adflow_migrator (the owner): exactly what a worker needs.
-- The outbox functions and triggers run with the caller's rights (SECURITY INVOKER), so the
-- grants cover every table they touch on the worker's behalf. Idempotent.
--
--   claim        UPDATE stage_tasks, jobs_variants, jobs; reads job_inputs, image_assets,
--                stage_results, stage_graph
--   complete     UPDATE stage_tasks, INSERT stage_results (identity: sequence USAGE); the
--                triggers then INSERT the next stage_tasks row, lock and UPDATE jobs (fan-in)
--   fail/rescue  UPDATE stage_tasks, jobs_variants, jobs
--   artifacts    the `postgres` store: INSERT in the completion, SELECT to read, DELETE what a
--                refused completion wrote
--   health       SELECT alembic_version (schema state), stage_tasks (queue depth)
--   registration INSERT its row in workers at start, UPDATE it (stopped_at) at stop
-- No DELETE on pipeline tables, no TRUNCATE, no DDL, no access to other schemas.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM adflow_worker;
GRANT SELECT ON stage_graph, job_inputs, image_assets, alembic_version TO adflow_worker;
GRANT SELECT, UPDATE ON jobs, jobs_variants TO adflow_worker;
GRANT SELECT, INSERT, UPDATE ON stage_tasks TO adflow_worker;
GRANT SELECT, INSERT ON stage_results TO adflow_worker;
GRANT SELECT, INSERT, DELETE ON artifacts TO adflow_worker;
GRANT SELECT, INSERT, UPDATE ON workers TO adflow_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO adflow_worker;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO adflow_worker;
