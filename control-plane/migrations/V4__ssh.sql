-- SSH servers: a platform-generated Ed25519 key (or a legacy password), both sealed under the
-- field key. The host key is pinned at creation or at the first successful connection.
ALTER TABLE servers
    ADD COLUMN ssh_auth                    text CHECK (ssh_auth IN ('key', 'password')),
    ADD COLUMN ssh_private_key_ciphertext  text,
    ADD COLUMN ssh_password_ciphertext     text,
    ADD COLUMN ssh_key_fingerprint         text,
    ADD COLUMN host_key                    text,
    -- The SSH runner's replay floor: the highest job sequence it has started on this server.
    ADD COLUMN ssh_highest_sequence        bigint NOT NULL DEFAULT 0;
