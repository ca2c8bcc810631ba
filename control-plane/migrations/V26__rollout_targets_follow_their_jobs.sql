-- The rollout scheduler used to read every target of a rollout in progress on each 250 ms
-- tick, and join every running one to its job to find those that had ended: at 10,000
-- targets that was a fifth of the database's work during a rollout, and it grows with the
-- fleet (docs/benchmarks.md, "Rollouts at 100,000"). Now a deploy target takes its job's
-- outcome in the statement that ends the job, and the scheduler counts what it needs through
-- the two indexes below.

-- A target whose deploy job ended: succeeded; unreachable when the job never reached its
-- server (it failed at the dispatch step); failed otherwise. Done by the trigger that already
-- runs on every UPDATE of `deployments` (the live-follow notifications): FOUND says the
-- UPDATE changed a row, so one that changed none (the job sweep's, every second) still costs
-- one statement, as since V25. Agent upgrades are not folded here: an upgrade target ends when
-- its agent comes back on the new version (the scheduler's `fold_upgrades`).
CREATE FUNCTION deployments_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', s.subject)
    FROM (SELECT 'd' || id::text AS subject FROM changed
          UNION
          SELECT 'r' || rollout_id::text FROM changed WHERE rollout_id IS NOT NULL) s;
    IF FOUND THEN
        -- EXECUTE plans the statement on each run. A static statement's plan is kept for
        -- the connection's life, and one made while the table was nearly empty scans every
        -- target for each job that ended.
        EXECUTE $sql$
            UPDATE rollout_targets t
               SET status = CASE WHEN c.status = 'succeeded' THEN 'succeeded'
                                 WHEN c.error_step = 'dispatch' THEN 'unreachable'
                                 ELSE 'failed' END,
                   error = c.error_message
              FROM changed c
             WHERE c.rollout_id IS NOT NULL
               AND c.kind = 'deploy'
               AND c.status IN ('succeeded', 'failed')
               AND t.rollout_id = c.rollout_id
               AND t.server_id = c.server_id
               AND t.deployment_id = c.id
               AND t.status = 'running'
        $sql$;
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER deployments_live ON deployments;
CREATE TRIGGER deployments_changed AFTER UPDATE ON deployments
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION deployments_changed();
DROP FUNCTION live_deployments_changed();

-- Jobs that ended before this migration and were not folded yet by the scheduler: an UPDATE
-- that changes nothing in them hands them to the trigger above, which folds them by its rule.
UPDATE deployments d SET status = d.status
  FROM rollout_targets t
 WHERE t.deployment_id = d.id
   AND t.status = 'running'
   AND d.kind = 'deploy'
   AND d.status IN ('succeeded', 'failed');

-- What the scheduler looks at on each tick: whether the current batch still has a target
-- pending or running (two short ranges of the first index), and how many targets failed
-- (the second, which holds only those). The first also serves a batch's start (its pending
-- members). It is deliberately not a partial index of the open targets: the planner, without
-- statistics on a table that just took a rollout's targets, preferred such an index to the
-- primary key for the trigger's update above, and scanned every open target of the rollout
-- for each job that ended.
CREATE INDEX rollout_targets_by_batch ON rollout_targets (rollout_id, batch, status);
CREATE INDEX rollout_targets_failed ON rollout_targets (rollout_id)
    WHERE status IN ('failed', 'unreachable');
