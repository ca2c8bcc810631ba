-- The deployments' live-follow trigger ran two statements per UPDATE of `deployments`, even one
-- that changed no row (the job sweep runs two such UPDATEs a second on every replica): with an
-- idle fleet that was a third of all the statements the database ran (docs/benchmarks.md,
-- "The database's share"). The same notifications, from one statement, and none when nothing
-- changed.
CREATE OR REPLACE FUNCTION live_deployments_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', s.subject)
    FROM (SELECT 'd' || id::text AS subject FROM changed
          UNION
          SELECT 'r' || rollout_id::text FROM changed WHERE rollout_id IS NOT NULL) s;
    RETURN NULL;
END $$;
