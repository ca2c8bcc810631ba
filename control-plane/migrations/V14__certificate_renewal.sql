-- Agents renew their own certificates over their live connection (docs/agent.md).
--
-- A renewed certificate names the one it renews (`renewed_from`) and is *pending* until its
-- agent first connects with it (`first_connected_at`). Then the certificates it replaces are
-- *retired*: no longer valid, but not revoked. Retired and revoked are different facts (a
-- routine rotation, an operator's decision) and a row is never both.
ALTER TABLE agent_certificates
    ADD COLUMN renewed_from        bytea CHECK (length(renewed_from) = 32),
    ADD COLUMN first_connected_at  timestamptz,
    ADD COLUMN retired_at          timestamptz,
    ADD CONSTRAINT agent_certificates_retired_or_revoked
        CHECK (retired_at IS NULL OR revoked_at IS NULL);

-- At most one pending renewal per server, enforced by the database as well as checked.
CREATE UNIQUE INDEX agent_certificates_one_pending ON agent_certificates (server_id)
    WHERE renewed_from IS NOT NULL AND first_connected_at IS NULL
      AND retired_at IS NULL AND revoked_at IS NULL;
