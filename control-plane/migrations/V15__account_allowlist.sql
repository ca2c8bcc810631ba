-- An account's own network allowlist: when not empty, its members sign in, use their sessions
-- and its API keys only from these networks (CIDR text, checked by the application), on top
-- of each key's own allowlist.
ALTER TABLE accounts ADD COLUMN ip_allowlist text[] NOT NULL DEFAULT '{}'
    CHECK (cardinality(ip_allowlist) <= 64);
