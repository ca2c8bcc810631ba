-- A server runs one job at a time, for agents as for SSH: the claims check it, and this index
-- makes it hold even when two replicas claim for one server in the same instant (each
-- statement's snapshot cannot see the other's claim; the index can). Before it exists, any
-- server with several running jobs keeps its oldest; the others end as interrupted.
UPDATE deployments SET status = 'failed', error_step = 'run',
    error_message = 'interrupted: another job of this server was already running',
    finished_at = now()
WHERE status = 'running' AND id NOT IN (
    SELECT DISTINCT ON (server_id) id FROM deployments
    WHERE status = 'running' ORDER BY server_id, started_at, id);
CREATE UNIQUE INDEX deployments_one_running ON deployments (server_id) WHERE status = 'running';
