-- Projects: what to deploy and how. The environment is a Fernet token (JSON object inside).
CREATE TABLE projects (
    id                 uuid PRIMARY KEY,
    account_id         uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    repo_url           text NOT NULL,
    deploy_path        text NOT NULL,
    keep_releases      integer NOT NULL DEFAULT 5 CHECK (keep_releases BETWEEN 1 AND 100),
    shared_paths       text[] NOT NULL DEFAULT '{}',
    hooks              jsonb NOT NULL DEFAULT '{}',
    health_check       text,
    hook_timeout_secs  integer NOT NULL DEFAULT 600 CHECK (hook_timeout_secs BETWEEN 1 AND 86400),
    env_ciphertext     text,
    env_names          text[] NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    deleted_at         timestamptz
);
CREATE INDEX projects_account ON projects (account_id) WHERE deleted_at IS NULL;

-- Per-server job sequence numbers: strictly increasing, never reused.
ALTER TABLE servers ADD COLUMN job_sequence bigint NOT NULL DEFAULT 0;

-- Deployments are the jobs. The row is the truth; agents are woken through NOTIFY.
CREATE TABLE deployments (
    id                  uuid PRIMARY KEY,
    account_id          uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    project_id          uuid NOT NULL REFERENCES projects(id),
    server_id           uuid NOT NULL REFERENCES servers(id),
    kind                text NOT NULL CHECK (kind IN ('deploy', 'rollback')),
    git_ref             text,
    rollback_of         uuid REFERENCES deployments(id),
    sequence            bigint NOT NULL,
    release_id          text,
    status              text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed')),
    commit              text,
    error_step          text,
    error_message       text,
    created_by          uuid,
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    started_at          timestamptz,
    finished_at         timestamptz,
    dispatched_replica  uuid,
    UNIQUE (server_id, sequence)
);
CREATE INDEX deployments_queue ON deployments (server_id, sequence) WHERE status = 'queued';
CREATE INDEX deployments_account ON deployments (account_id, created_at DESC);

CREATE TABLE deployment_logs (
    id             bigserial PRIMARY KEY,
    deployment_id  uuid NOT NULL REFERENCES deployments(id) ON DELETE CASCADE,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    stream         smallint NOT NULL,
    line           text NOT NULL
);
CREATE INDEX deployment_logs_by_deployment ON deployment_logs (deployment_id, id);
