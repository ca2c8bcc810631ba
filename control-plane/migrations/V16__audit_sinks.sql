-- SIEM sinks: each account may stream its audit chain to receivers of its own (syslog over TLS,
-- HTTPS JSON lines). Delivery is at least once from a durable cursor: `cursor_seq` is the last
-- `seq` of the account's chain the receiver accepted, advanced only after it did. Replicas
-- share the work through a lease (`lease_owner`, `lease_until`, taken with FOR UPDATE SKIP
-- LOCKED), so one replica delivers a sink at a time and a dead replica's lease runs out.
--
-- The application role gets SELECT/INSERT/UPDATE/DELETE here from db::grant_application like
-- every product table; its rights on audit_log stay SELECT and INSERT: delivering only reads.
CREATE TABLE audit_sinks (
    id                uuid PRIMARY KEY,
    account_id        uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    kind              text NOT NULL CHECK (kind IN ('syslog_tls', 'https')),
    -- Where and how to connect, without secrets: host/port or URL, server name, the pinned
    -- CA certificate (PEM), the authentication scheme.
    config            jsonb NOT NULL CHECK (length(config::text) <= 65536),
    -- The bearer token or HMAC key, sealed under the field key (Fernet); NULL for syslog.
    secret_ciphertext     text,
    created_by        uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    cursor_seq        bigint NOT NULL DEFAULT 0 CHECK (cursor_seq >= 0),
    failures          integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    last_error        text CHECK (length(last_error) <= 512),
    last_error_at     timestamptz,
    last_delivered_at timestamptz,
    lease_owner       uuid,
    lease_until       timestamptz
);
CREATE INDEX audit_sinks_account ON audit_sinks (account_id, created_at);
CREATE INDEX audit_sinks_due ON audit_sinks (next_attempt_at);
