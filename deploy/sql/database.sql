-- Per database, as a superuser, before the first migration (the database is owned by
-- adflow_migrator: CREATE DATABASE adflow OWNER adflow_migrator).
ALTER SCHEMA public OWNER TO adflow_migrator;       -- PostgreSQL 15+: already the database owner's
REVOKE ALL ON SCHEMA public FROM PUBLIC;            -- nobody else creates objects here
GRANT USAGE ON SCHEMA public TO adflow_worker;      -- the worker may see the objects, not create any
-- Functions are executable by PUBLIC by default: not ours. EXECUTE is granted to the worker
-- explicitly (worker_grants.sql), now and for the functions future migrations create.
ALTER DEFAULT PRIVILEGES FOR ROLE adflow_migrator IN SCHEMA public REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE adflow_migrator IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO adflow_worker;
