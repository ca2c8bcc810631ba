-- Who gets in: invitations an operator hands out to create an account when signup is
-- invite-only, and the attempts counted per client address or server (signups, enrollments)
-- so that a flood is refused before it costs a password hash or a certificate.

CREATE TABLE signup_invitations (
    id            uuid PRIMARY KEY,
    secret_hash   bytea NOT NULL,
    note          text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz,
    account_id    uuid REFERENCES accounts(id) ON DELETE SET NULL
);

-- One row per counted attempt: `kind` names the limit (`signup-ip`, `enroll-ip`, …), `key`
-- the address (an IPv6 client's /64) or the server.
CREATE TABLE admission_attempts (
    id    bigserial PRIMARY KEY,
    kind  text NOT NULL,
    key   text NOT NULL,
    at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admission_attempts_window ON admission_attempts (kind, key, at);
CREATE INDEX admission_attempts_age ON admission_attempts (at);
