-- Servers: deploy targets. An agent server enrolls with a token; an SSH server (later) holds
-- a platform-generated key. Deleting a server is soft: the row stays for the audit trail.
CREATE TABLE servers (
    id                 uuid PRIMARY KEY,
    account_id         uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    host               text NOT NULL CHECK (length(host) BETWEEN 1 AND 255),
    port               integer NOT NULL DEFAULT 22 CHECK (port BETWEEN 1 AND 65535),
    username           text,
    transport          text NOT NULL CHECK (transport IN ('agent', 'ssh')),
    labels             jsonb NOT NULL DEFAULT '{}',
    created_at         timestamptz NOT NULL DEFAULT now(),
    deleted_at         timestamptz,
    agent_version      text,
    last_seen_at       timestamptz,
    -- The replica holding the agent's connection, if any.
    connected_replica  uuid
);
CREATE INDEX servers_account ON servers (account_id) WHERE deleted_at IS NULL;
CREATE INDEX servers_labels ON servers USING gin (labels);

-- Single-use enrollment tokens: only SHA-256 of the secret is stored.
CREATE TABLE enrollment_tokens (
    id           uuid PRIMARY KEY,
    server_id    uuid NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL,
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX enrollment_tokens_server ON enrollment_tokens (server_id);

-- Agent certificates issued by the CA. Valid = not revoked and not expired.
CREATE TABLE agent_certificates (
    fingerprint  bytea PRIMARY KEY CHECK (length(fingerprint) = 32),
    server_id    uuid NOT NULL REFERENCES servers(id) ON DELETE CASCADE,
    serial       text NOT NULL,
    not_after    timestamptz NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX agent_certificates_server ON agent_certificates (server_id);

-- Signing keys (the Ed25519 job-signing key). Private halves are Fernet tokens.
CREATE TABLE signing_keys (
    name                    text PRIMARY KEY,
    public_key              bytea NOT NULL,
    private_key_ciphertext  text NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now()
);
