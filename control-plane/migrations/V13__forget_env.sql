-- A deleted project's servers are sent one last job: remove the `shared/.env` its deploys
-- wrote (the environment is erased from the database at once; this erases it on the servers).
ALTER TABLE deployments DROP CONSTRAINT deployments_kind_check;
ALTER TABLE deployments ADD CONSTRAINT deployments_kind_check
    CHECK (kind IN ('deploy', 'rollback', 'forget_env'));
