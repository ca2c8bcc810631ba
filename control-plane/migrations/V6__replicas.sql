-- Live control-plane replicas. A job handed out by a replica that stopped heartbeating is
-- recovered from its agent's report, or failed after a grace period.
CREATE TABLE replicas (
    id            uuid PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
