-- Per-deploy DNS records: a project's zone settings (the TSIG secret sealed with the field
-- key), the last error writing to it, the address each agent connects from, and every record
-- Sensei wrote with the settings it used (so it can be removed from where it is).
ALTER TABLE projects
    ADD COLUMN dns jsonb,
    ADD COLUMN dns_secret_ciphertext text,
    ADD COLUMN dns_error text CHECK (length(dns_error) <= 1000),
    ADD COLUMN dns_error_at timestamptz,
    -- A zone that keeps failing is retried with a growing delay, so it cannot take the
    -- reconciler's time from everyone else's.
    ADD COLUMN dns_failures integer NOT NULL DEFAULT 0,
    ADD COLUMN dns_retry_at timestamptz;
ALTER TABLE servers ADD COLUMN agent_address text;

CREATE TABLE dns_records (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- No foreign keys on purpose: a deleted account takes its projects and servers with it,
    -- and these rows (with their own settings and key) are what lets the records it had be
    -- removed from the zones afterwards.
    project_id         uuid NOT NULL,
    server_id          uuid NOT NULL,
    name               text NOT NULL,
    target             text NOT NULL,
    settings           jsonb NOT NULL,
    secret_ciphertext  text NOT NULL,
    written_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, server_id)
);
