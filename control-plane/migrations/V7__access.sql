-- Access control: account settings, TOTP, invitations, password resets, audit retention.

ALTER TABLE accounts
    ADD COLUMN require_mfa boolean NOT NULL DEFAULT false,
    -- Audit rows older than this are expired by the maintenance job (1 month to 7 years).
    ADD COLUMN audit_retention_days integer NOT NULL DEFAULT 365
        CHECK (audit_retention_days BETWEEN 30 AND 2557);

-- TOTP (RFC 6238). Secrets are Fernet tokens under CODESENSEI_FIELD_KEY. A secret is pending
-- until the user proves their authenticator has it; totp_last_step refuses replays.
ALTER TABLE users
    ADD COLUMN totp_secret_ciphertext text,
    ADD COLUMN totp_pending_ciphertext text,
    ADD COLUMN totp_enabled_at timestamptz,
    ADD COLUMN totp_last_step bigint NOT NULL DEFAULT 0;

-- One-time recovery codes; only SHA-256 of each is stored (they carry 60 random bits).
CREATE TABLE mfa_recovery_codes (
    user_id    uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    code_hash  bytea NOT NULL,
    used_at    timestamptz,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE invitations (
    id           uuid PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    email        text NOT NULL,
    role         text NOT NULL CHECK (role IN ('viewer', 'operator', 'developer', 'admin', 'owner')),
    secret_hash  bytea NOT NULL,
    invited_by   uuid REFERENCES users(id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    accepted_at  timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX invitations_account ON invitations (account_id);

CREATE TABLE password_resets (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    used_at      timestamptz
);
CREATE INDEX password_resets_user ON password_resets (user_id);

-- Audit retention. Expiry writes a checkpoint (the hash the remaining chain continues from)
-- and then deletes the rows it covers. The database itself holds the rule: a checkpoint can
-- only name an existing row older than its account's retention, and a row can only be deleted
-- once a checkpoint covers it and it is past retention. Updates and truncation stay refused.
CREATE TABLE audit_checkpoints (
    id            bigserial PRIMARY KEY,
    chain_id      uuid NOT NULL,
    through_seq   bigint NOT NULL,
    through_hash  bytea NOT NULL,
    through_at    timestamptz NOT NULL,
    rows_expired  bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, through_seq)
);

-- Retention of a chain: its account's setting; a year for the global chain and for the
-- chains of deleted accounts.
CREATE FUNCTION audit_retention(chain uuid) RETURNS interval LANGUAGE sql STABLE AS $$
    SELECT make_interval(days => COALESCE(
        (SELECT audit_retention_days FROM accounts WHERE id = chain), 365))
$$;

CREATE FUNCTION audit_checkpoint_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM audit_log
                   WHERE chain_id = NEW.chain_id AND seq = NEW.through_seq
                     AND hash = NEW.through_hash AND at = NEW.through_at
                     AND at < now() - audit_retention(NEW.chain_id)) THEN
        RAISE EXCEPTION 'audit checkpoint must name an existing row past its retention'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF EXISTS (SELECT 1 FROM audit_checkpoints
               WHERE chain_id = NEW.chain_id AND through_seq >= NEW.through_seq) THEN
        RAISE EXCEPTION 'audit checkpoints only move forward'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_checkpoints_check BEFORE INSERT ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoint_check();
CREATE TRIGGER audit_checkpoints_no_update_delete BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

CREATE FUNCTION audit_log_expire_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.at < now() - audit_retention(OLD.chain_id)
       AND EXISTS (SELECT 1 FROM audit_checkpoints
                   WHERE chain_id = OLD.chain_id AND through_seq >= OLD.seq) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: only rows past retention and covered by a checkpoint may be expired'
        USING ERRCODE = 'insufficient_privilege';
END
$$;
DROP TRIGGER audit_log_no_update_delete ON audit_log;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_expire_only BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_expire_only();
