-- Custom roles: an account's own named sets of permissions (the scope names of the route
-- table), besides the five built-in roles. A member holds either a built-in role or one custom
-- role; `users.role` keeps the built-in rank ('viewer' for a custom-role member), which is what
-- the owner guards compare.
CREATE TABLE roles (
    id           uuid PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    permissions  text[] NOT NULL CHECK (cardinality(permissions) BETWEEN 1 AND 64),
    created_by   uuid,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX roles_name_unique ON roles (account_id, lower(name));

-- A role in use cannot be deleted (RESTRICT): the API answers role_in_use.
ALTER TABLE users ADD COLUMN custom_role_id uuid REFERENCES roles(id) ON DELETE RESTRICT;
-- Resources a member may reach: NULL is the whole account; otherwise
-- {"projects": [uuid, ...] | null, "server_labels": {"k": "v", ...} | null}.
ALTER TABLE users ADD COLUMN resource_scope jsonb
    CHECK (resource_scope IS NULL OR jsonb_typeof(resource_scope) = 'object');

-- Four-eyes approval: the person who approves a rollout's canary is not the one who started it.
ALTER TABLE accounts ADD COLUMN four_eyes_approval boolean NOT NULL DEFAULT false;

-- Approving a rollout becomes its own permission (rollouts:approve). Keys that could approve
-- before (rollouts:write) keep that power.
UPDATE api_keys SET scopes = array_append(scopes, 'rollouts:approve')
    WHERE 'rollouts:write' = ANY(scopes) AND NOT 'rollouts:approve' = ANY(scopes);
