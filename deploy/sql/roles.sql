-- Database roles for adflow: one that owns and migrates the schema, one that workers log in as.
-- Run as a superuser (or a role with CREATEROLE), once per cluster. Idempotent. Then, as the
-- superuser: CREATE DATABASE adflow OWNER adflow_migrator; and run database.sql in it; run the
-- migrations as adflow_migrator (cli.py db upgrade); run worker_grants.sql as adflow_migrator
-- after every migration. Set passwords with ALTER ROLE ... PASSWORD '...' (or use your
-- platform's authentication); never put them in these files.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'adflow_migrator') THEN
        -- Owns the schema: tables, functions, triggers. Runs `cli.py db upgrade` and the
        -- operator commands (submit, status, replay-failed, cancel, prune). Not a superuser.
        CREATE ROLE adflow_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'adflow_worker') THEN
        -- What `workers start` logs in as: claims, heartbeats, completions, failures, no DDL.
        CREATE ROLE adflow_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END $$;
