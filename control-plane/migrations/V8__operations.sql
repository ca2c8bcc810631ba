-- What an operator needs: the rollout a deployment belongs to, retried requests answered
-- once, and deployment logs that do not grow forever.

ALTER TABLE deployments ADD COLUMN rollout_id uuid REFERENCES rollouts(id) ON DELETE SET NULL;
UPDATE deployments d SET rollout_id = t.rollout_id
  FROM rollout_targets t
  WHERE t.deployment_id = d.id OR t.rollback_deployment_id = d.id;
CREATE INDEX deployments_rollout ON deployments (rollout_id) WHERE rollout_id IS NOT NULL;
-- The history list filters by project or server, newest first.
CREATE INDEX deployments_project ON deployments (project_id, created_at DESC, id DESC);
CREATE INDEX deployments_server ON deployments (server_id, created_at DESC, id DESC);

-- Deployment logs older than this are deleted by the maintenance job (1 day to 7 years). The
-- deployment rows themselves, and the audit log (its own retention), stay.
ALTER TABLE accounts
    ADD COLUMN deploy_log_retention_days integer NOT NULL DEFAULT 90
        CHECK (deploy_log_retention_days BETWEEN 1 AND 2557);
CREATE INDEX deployment_logs_at ON deployment_logs (at);

-- `Idempotency-Key` on requests that queue work: a retry with the same key and the same request
-- within 24 hours is answered with what the first one created, and queues nothing. The row is
-- written in the same transaction as the work, so a key is only kept for work that was done.
CREATE TABLE idempotency_keys (
    account_id    uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    route         text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status        smallint,
    resource_id   uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, route, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
