-- Rotating the job-signing key (`sensei-control-plane job-key rotate | retire`). During a
-- rotation the key being replaced stays in `signing_keys` as 'job-signing.previous' (sealed
-- like the current one); each agent server records the newest job-signing key its agent
-- named on its trust watch, or was given at enrollment: its jobs are signed with the new key
-- only once that names it.
ALTER TABLE servers ADD COLUMN job_key_acknowledged bytea;

-- Every agent enrolled so far pinned the one key there has ever been.
UPDATE servers SET job_key_acknowledged =
    (SELECT public_key FROM signing_keys WHERE name = 'job-signing')
WHERE transport = 'agent';
