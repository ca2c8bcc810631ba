-- Single sign-on with OpenID Connect (docs/access.md, "Single sign-on").
--
-- One provider per account. The client secret is sealed under the field key (Fernet) and
-- rewritten by rotate-field-key. `slug` is how a person names their account on the sign-in
-- page (`/ui/sso?org=<slug>`): unique across the control plane.
CREATE TABLE account_sso (
    account_id            uuid PRIMARY KEY REFERENCES accounts(id) ON DELETE CASCADE,
    slug                  text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$'),
    display_name          text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 60),
    issuer                text NOT NULL CHECK (length(issuer) BETWEEN 9 AND 512),
    client_id             text NOT NULL CHECK (length(client_id) BETWEEN 1 AND 512),
    client_secret_sealed  text NOT NULL,
    scopes                text[] NOT NULL,
    -- Emails whose domain is listed may become members at their first sign-in; empty: nobody
    -- new joins through the provider.
    allowed_domains       text[] NOT NULL,
    default_role          text NOT NULL CHECK (default_role IN ('viewer', 'operator', 'developer', 'admin')),
    -- A claim of the ID token (e.g. `groups`) whose values map to roles for new members.
    role_claim            text CHECK (length(role_claim) BETWEEN 1 AND 100),
    role_map              jsonb NOT NULL DEFAULT '{}' CHECK (length(role_map::text) <= 16384),
    -- The only CA trusted for this provider's HTTPS, when it is not in the public web PKI.
    ca_pem                text CHECK (length(ca_pem) <= 65536),
    require_sso           boolean NOT NULL DEFAULT false,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- Who a provider's user is here: (issuer, subject), never the email.
CREATE TABLE sso_identities (
    issuer      text NOT NULL,
    subject     text NOT NULL CHECK (length(subject) BETWEEN 1 AND 255),
    user_id     uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, subject),
    UNIQUE (user_id, issuer)
);

-- A sign-in started and not yet finished: its id travels in the browser's sealed state
-- cookie, and is spent once (`used_at`), so a callback cannot be replayed.
CREATE TABLE sso_logins (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz
);
CREATE INDEX sso_logins_expiry ON sso_logins (expires_at);
