-- A rollout deploys exactly what was approved. `commit` is the commit every later job of the
-- rollout must deploy (the one it was started with, or the one its first success reported);
-- the deploy configuration is copied from the project when the rollout starts, so a later
-- PATCH of the project does not reach a running rollout. Rollouts from before this migration
-- have no copy and keep reading the project.
ALTER TABLE rollouts
    ADD COLUMN commit text CHECK (commit ~ '^[0-9a-f]{40}$'),
    ADD COLUMN repo_url text,
    ADD COLUMN deploy_path text,
    ADD COLUMN keep_releases integer,
    ADD COLUMN shared_paths text[],
    ADD COLUMN hooks jsonb,
    ADD COLUMN health_check text,
    ADD COLUMN hook_timeout_secs integer,
    ADD COLUMN env_ciphertext text;

-- The commit a job must resolve to, signed into its payload and checked on the server.
ALTER TABLE deployments ADD COLUMN expected_commit text CHECK (expected_commit ~ '^[0-9a-f]{40}$');
