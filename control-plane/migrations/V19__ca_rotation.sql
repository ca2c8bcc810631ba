-- CA rotation (docs/agent.md "Rotating the CA"): which CA issued each agent certificate, so
-- that the agents still on the CA being retired can be listed, and their certificates
-- retired with it. NULL: issued before the first rotation, by the CA that rotation replaces
-- (`ca rotate` fills these in as it starts). The CA itself stays in pki_material: `ca`
-- issues, `ca.previous` is the one being rotated out.
ALTER TABLE agent_certificates
    ADD COLUMN ca_fingerprint bytea CHECK (length(ca_fingerprint) = 32);
CREATE INDEX agent_certificates_ca ON agent_certificates (ca_fingerprint);
