-- Fleet-wide rollouts. The rows are the whole state: any replica's scheduler can carry a
-- rollout on after another replica stops.
CREATE TABLE rollouts (
    id              uuid PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    project_id      uuid NOT NULL REFERENCES projects(id),
    git_ref         text NOT NULL,
    strategy        jsonb NOT NULL,
    state           text NOT NULL CHECK (state IN ('running', 'paused', 'halted', 'succeeded', 'aborted', 'rolled_back')),
    paused_reason   text,
    halted_reason   text,
    current_batch   integer,
    batch_count     integer NOT NULL,
    batch_done_at   timestamptz,
    approved        boolean NOT NULL DEFAULT false,
    rolling_back    boolean NOT NULL DEFAULT false,
    created_by      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX rollouts_active ON rollouts (created_at) WHERE state IN ('running', 'halted');

CREATE TABLE rollout_targets (
    rollout_id              uuid NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
    server_id               uuid NOT NULL REFERENCES servers(id),
    batch                   integer NOT NULL,
    position                integer NOT NULL,
    status                  text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'unreachable', 'skipped')),
    deployment_id           uuid REFERENCES deployments(id),
    rollback_deployment_id  uuid REFERENCES deployments(id),
    error                   text,
    PRIMARY KEY (rollout_id, server_id)
);
