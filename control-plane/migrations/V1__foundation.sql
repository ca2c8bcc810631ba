-- Accounts (tenants) own everything; users belong to exactly one account.
CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    account_id     uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    email          text NOT NULL,
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('viewer', 'operator', 'developer', 'admin', 'owner')),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_unique ON users (lower(email));
CREATE INDEX users_account ON users (account_id);

-- Cookie sessions. The cookie carries <id>.<secret>; only SHA-256(secret) is stored.
CREATE TABLE sessions (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    secret_hash   bytea NOT NULL,
    ip            text NOT NULL,
    user_agent    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX sessions_user ON sessions (user_id) WHERE revoked_at IS NULL;

CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    account_id    uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_by    uuid REFERENCES users(id) ON DELETE SET NULL,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    secret_hash   bytea NOT NULL,
    scopes        text[] NOT NULL,
    ip_allowlist  text[] NOT NULL DEFAULT '{}',
    expires_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Failed logins, for throttling per account and per client address. The email is kept only
-- as a keyed hash.
CREATE TABLE login_failures (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    ip          text NOT NULL,
    account_id  uuid,
    email_hash  text NOT NULL
);
CREATE INDEX login_failures_ip ON login_failures (ip, at);
CREATE INDEX login_failures_account ON login_failures (account_id, at);

-- Certificates and keys shared by every replica (the CA, the API's TLS certificate). Keys
-- are Fernet tokens under CODESENSEI_FIELD_KEY, never clear text.
CREATE TABLE pki_material (
    name            text PRIMARY KEY,
    cert_pem        text NOT NULL,
    key_ciphertext  text NOT NULL,
    not_after       timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The audit log: one hash chain per account (the nil UUID chains events outside any
-- account, such as a failed login for an unknown email).
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    chain_id     uuid NOT NULL,
    seq          bigint NOT NULL CHECK (seq >= 1),
    account_id   uuid,
    at           timestamptz NOT NULL,
    actor_type   text NOT NULL,
    actor_id     uuid,
    actor_email  text,
    client_ip    text,
    user_agent   text,
    action       text NOT NULL,
    target_type  text,
    target_id    uuid,
    result       text NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}',
    prev_hash    bytea NOT NULL,
    hash         bytea NOT NULL,
    UNIQUE (chain_id, seq)
);
CREATE INDEX audit_log_account_at ON audit_log (account_id, at DESC);

-- Append-only in the database itself: whatever role the application connects as (the
-- embedded cluster connects as its superuser), rows cannot be changed or removed. Only a
-- deliberate ALTER TABLE … DISABLE TRIGGER by a database administrator gets past this, and
-- the hash chain shows what such a person changed.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
