-- Live-follow streams sleep until told: every change of what they show (a deployment's log
-- or status, a rollout or its targets) notifies `sensei_live` with `d<deployment id>` or
-- `r<rollout id>`, whichever replica wrote it. One notification per subject per statement
-- (transition tables), and PostgreSQL folds identical ones within a transaction.

CREATE FUNCTION live_deployment_logs_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', 'd' || d.deployment_id::text)
    FROM (SELECT DISTINCT deployment_id FROM changed) d;
    RETURN NULL;
END $$;

CREATE FUNCTION live_deployments_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', 'd' || d.id::text) FROM changed d;
    PERFORM pg_notify('sensei_live', 'r' || r.rollout_id::text)
    FROM (SELECT DISTINCT rollout_id FROM changed WHERE rollout_id IS NOT NULL) r;
    RETURN NULL;
END $$;

CREATE FUNCTION live_rollouts_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', 'r' || r.id::text) FROM changed r;
    RETURN NULL;
END $$;

CREATE FUNCTION live_rollout_targets_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sensei_live', 'r' || r.rollout_id::text)
    FROM (SELECT DISTINCT rollout_id FROM changed) r;
    RETURN NULL;
END $$;

CREATE TRIGGER deployment_logs_live AFTER INSERT ON deployment_logs
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION live_deployment_logs_changed();
CREATE TRIGGER deployments_live AFTER UPDATE ON deployments
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION live_deployments_changed();
CREATE TRIGGER rollouts_live AFTER UPDATE ON rollouts
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION live_rollouts_changed();
-- A trigger with a transition table takes one event: inserts and updates each get theirs.
CREATE TRIGGER rollout_targets_live_insert AFTER INSERT ON rollout_targets
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION live_rollout_targets_changed();
CREATE TRIGGER rollout_targets_live_update AFTER UPDATE ON rollout_targets
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION live_rollout_targets_changed();
