-- The SSH runner looks for SSH servers with a queued job once a second on every replica. It
-- used to start from the queued jobs and join their servers: during a rollout to 10,000
-- agents that read 10,000 queued agent jobs to find none for SSH, 50 to 100 ms of the
-- database's CPU a second (docs/benchmarks.md). It now starts from the SSH servers, found
-- through this index, and probes each one's queue (deployments_queue) in a LATERAL subquery,
-- a plan that holds even with statistics taken while the queue was empty.
CREATE INDEX servers_ssh ON servers (id) WHERE transport = 'ssh';
