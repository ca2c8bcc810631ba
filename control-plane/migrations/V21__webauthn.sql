-- WebAuthn security keys and platform authenticators as a second factor (docs/access.md).

-- A user's registered authenticators. `credential` is webauthn-rs's record of the key: its
-- public key, signature counter and flags (nothing secret). `sign_count` mirrors the counter
-- for people reading the table; the check uses the record.
CREATE TABLE webauthn_credentials (
    id             uuid PRIMARY KEY,
    user_id        uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    credential_id  bytea NOT NULL UNIQUE CHECK (length(credential_id) <= 1023),
    credential     jsonb NOT NULL CHECK (length(credential::text) <= 16384),
    sign_count     bigint NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz,
    UNIQUE (user_id, name)
);

-- A registration or sign-in in progress: the challenge and what webauthn-rs needs to check
-- the answer, kept here (never in the browser), single-use and short-lived. A registration
-- belongs to the session that started it; a sign-in to the user whose password was checked.
CREATE TABLE webauthn_ceremonies (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    purpose     text NOT NULL CHECK (purpose IN ('register', 'sign_in')),
    session_id  uuid REFERENCES sessions(id) ON DELETE CASCADE,
    state       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    CHECK ((purpose = 'register') = (session_id IS NOT NULL))
);
CREATE INDEX webauthn_ceremonies_user ON webauthn_ceremonies (user_id, created_at);

-- An account may require every member's second factor to be a security key: TOTP is then
-- refused at sign-in to anyone who has a key, and a member without one must register one.
ALTER TABLE accounts ADD COLUMN require_webauthn boolean NOT NULL DEFAULT false;

-- Whether a user has a second factor: TOTP, or at least one security key. One definition for
-- sign-in, "MFA required" and the members list.
CREATE FUNCTION user_has_second_factor(uid uuid) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM users WHERE id = uid AND totp_enabled_at IS NOT NULL)
        OR EXISTS (SELECT 1 FROM webauthn_credentials WHERE user_id = uid)
$$;

-- Whether a member must set up a second factor before anything else: the account requires
-- one they lack (any factor, or a security key in particular).
CREATE FUNCTION user_needs_second_factor_setup(uid uuid) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT (a.require_mfa AND NOT user_has_second_factor(u.id))
        OR (a.require_webauthn
            AND NOT EXISTS (SELECT 1 FROM webauthn_credentials w WHERE w.user_id = u.id))
    FROM users u JOIN accounts a ON a.id = u.account_id WHERE u.id = uid
$$;
