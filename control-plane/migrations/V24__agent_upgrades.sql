-- The fleet's agents: the host each agent runs on, and upgrading agents through rollouts
-- (docs/agent.md "Upgrading agents").

-- What the agent said about its host (the HostFacts message), bounded as
-- sensei_shared::upgrade::check_host_facts bounds it. NULL: an agent older than this.
ALTER TABLE servers
    ADD COLUMN agent_os   text CHECK (agent_os ~ '^[ -~]{1,100}$'),
    ADD COLUMN agent_arch text CHECK (agent_arch ~ '^[a-z0-9_]{1,32}$');

-- An upgrade rollout upgrades the agent package to an exact version: it deploys no project
-- and no ref. Exactly one of the two kinds per rollout.
ALTER TABLE rollouts
    ALTER COLUMN project_id DROP NOT NULL,
    ALTER COLUMN git_ref DROP NOT NULL,
    ADD COLUMN upgrade_agent_version text
        CHECK (length(upgrade_agent_version) <= 64
               AND upgrade_agent_version ~ '^([0-9]+:)?[0-9][A-Za-z0-9.+~-]*$'),
    ADD CONSTRAINT rollouts_one_kind CHECK (
        (upgrade_agent_version IS NULL AND project_id IS NOT NULL AND git_ref IS NOT NULL)
        OR (upgrade_agent_version IS NOT NULL AND project_id IS NULL AND git_ref IS NULL));

-- When a target's job was queued: an upgrade target fails when its agent has not come back
-- on the new version within the strategy's deadline from then.
ALTER TABLE rollout_targets ADD COLUMN started_at timestamptz;

-- An upgrade job belongs to no project; it carries the version.
ALTER TABLE deployments DROP CONSTRAINT deployments_kind_check;
ALTER TABLE deployments
    ALTER COLUMN project_id DROP NOT NULL,
    ADD COLUMN upgrade_version text
        CHECK (length(upgrade_version) <= 64
               AND upgrade_version ~ '^([0-9]+:)?[0-9][A-Za-z0-9.+~-]*$'),
    ADD CONSTRAINT deployments_kind_check
        CHECK (kind IN ('deploy', 'rollback', 'forget_env', 'upgrade_agent')),
    ADD CONSTRAINT deployments_upgrade_has_version_no_project CHECK (
        (kind = 'upgrade_agent') = (upgrade_version IS NOT NULL)
        AND (kind = 'upgrade_agent') = (project_id IS NULL));
