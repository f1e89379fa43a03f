-- The last variant stage, asked by every variant completion (outbox_variant_is_terminal), the
-- fan-in and the write checks, in plpgsql instead of SQL. A LANGUAGE sql function whose body
-- reads a table is not inlined, and PostgreSQL before 18 plans its body again in every
-- statement (or, from a plpgsql trigger, every transaction) that calls it: 0.14 ms a call on
-- PostgreSQL 15 against 0.04 ms for this version, whose plan the session keeps
-- (docs/benchmarks.md, "Migration 0007: a helper planned once per session"). Same signature and answer.
CREATE OR REPLACE FUNCTION outbox_last_variant_stage() RETURNS text LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT g.stage FROM stage_graph g
            WHERE g.level = 'variant'
              AND NOT EXISTS (SELECT 1 FROM stage_graph n WHERE n.level = 'variant' AND n.after_step = g.stage));
END $$;
