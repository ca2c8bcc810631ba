//! Jobs that nobody will end are ended here, about once a second across all replicas (the
//! updates are idempotent, so running them anywhere, or twice, is harmless):
//! - a queued job nobody collected before its deadline fails as "agent offline";
//! - a running job whose replica is gone (no heartbeat for [`REPLICA_SILENCE_SECS`]) and
//!   whose server did not report a result within [`ORPHAN_GRACE_SECS`] fails.
//!
//! Replicas say they are alive in the `replicas` table for the second rule.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use uuid::Uuid;

use super::claim::PRESENTED_CERTIFICATE_VALID;
use super::wake::JOB_CHANNEL;
use super::Step;

/// How long a replica may miss heartbeats before it counts as gone.
pub const REPLICA_SILENCE_SECS: i64 = 15;
/// How long a job handed out by a gone replica waits for its server to report, before it
/// fails. (An agent notices a dead replica within its 60 s idle timeout, then reconnects and
/// reports, or polls: its first poll ends the job at once, [`fail_jobs_left_behind`]. This
/// grace is for agents that do not come back, and for SSH deploys.)
pub const ORPHAN_GRACE_SECS: i64 = 180;
/// How often the sweep runs; a replica's heartbeat is written every other sweep.
const SWEEP: Duration = Duration::from_secs(1);

/// Fails the jobs still running for the servers of `returned` (server, fingerprint of the
/// certificate its new connection presented), whose agents have just polled for the first
/// time on a new session. An agent keeps one connection at a time; the deploy it was running
/// stopped with the connection it ran on (its processes are killed), and a result it kept
/// from that connection was reported before this first poll. So a job still running in the
/// table now will never report: without this it would hold up the server's next job until
/// its replica noticed the lost connection, or, when that replica died, for
/// [`ORPHAN_GRACE_SECS`]. Answers how many jobs were failed.
pub async fn fail_jobs_left_behind(
    client: &tokio_postgres::Client,
    returned: &[(Uuid, Vec<u8>)],
) -> Result<u64, tokio_postgres::Error> {
    let (servers, bindings): (Vec<Uuid>, Vec<Vec<u8>>) = returned.iter().cloned().unzip();
    let failed = client
        .execute(
            &format!(
                "UPDATE deployments d SET status = 'failed', error_step = $3, \
                 error_message = 'the server''s agent came back on a new connection without a result: the deploy stopped with the connection it ran on (a control plane replica stopped, or the network dropped); current still points at a complete release', \
                 finished_at = now() \
                 FROM unnest($1::uuid[], $2::bytea[]) AS s(server_id, fingerprint) \
                 WHERE d.server_id = s.server_id AND d.status = 'running' \
                   AND {PRESENTED_CERTIFICATE_VALID}"
            ),
            &[&servers, &bindings, &Step::Run],
        )
        .await?;
    if failed > 0 {
        tracing::info!(
            jobs = failed,
            "failed jobs whose agents came back on a new connection without a result"
        );
    }
    Ok(failed)
}

/// Sweeps until `shutdown`, then says this replica is leaving. The sweep's updates are the
/// same whichever replica runs them, so with `n` replicas alive each one sweeps every `n`th
/// tick (at a phase of its own): the database sees about one sweep a second however many
/// replicas there are, instead of `n` (docs/benchmarks.md, several replicas).
pub async fn run(pool: Pool, replica: Uuid, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP);
    let mut ticks = 0u64;
    let phase: u64 = rand::random::<u16>().into();
    let mut alive = 1u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if ticks.is_multiple_of(2) {
                    alive = heartbeat(&pool, replica).await.unwrap_or(alive);
                }
                if ticks.is_multiple_of(RELEASE_EVERY) {
                    release_silent_replicas_agents(&pool).await;
                }
                if (ticks + phase).is_multiple_of(alive.max(1)) {
                    sweep(&pool).await;
                }
                ticks += 1;
            }
            _ = shutdown.changed() => break,
        }
    }
    retire(&pool, replica).await;
}

/// How many sweeps apart the agents of silent replicas are released.
const RELEASE_EVERY: u64 = 15;

/// Servers whose row still names a replica that is gone (killed, or stopped while its
/// disconnect marks could not be written) are marked disconnected, last seen at that
/// replica's last heartbeat. The API already shows them offline (it checks the replica's
/// heartbeat); this keeps the rows true for everything that reads `connected_replica`
/// (rotation status and retirement), and costs one statement every [`RELEASE_EVERY`] s.
pub async fn release_silent_replicas_agents(pool: &Pool) {
    let released = match pool.get().await {
        Ok(client) => client
            .execute(
                "UPDATE servers s SET connected_replica = NULL, \
                   last_seen_at = coalesce((SELECT r.heartbeat_at FROM replicas r \
                                            WHERE r.id = s.connected_replica), s.last_seen_at) \
                 WHERE s.connected_replica IS NOT NULL \
                   AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = s.connected_replica \
                                   AND r.heartbeat_at > now() - make_interval(secs => $1))",
                &[&(REPLICA_SILENCE_SECS as f64)],
            )
            .await
            .map_err(|e| crate::store::db::describe(&e)),
        Err(e) => Err(e.to_string()),
    };
    match released {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            servers = n,
            "marked the agents of silent replicas disconnected"
        ),
        Err(error) => tracing::warn!(%error, "releasing the agents of silent replicas"),
    }
}

/// Records `replica` as alive; answers how many replicas are alive, this one included (None
/// if the database could not be reached).
pub async fn heartbeat(pool: &Pool, replica: Uuid) -> Option<u64> {
    let written = match pool.get().await {
        Ok(client) => client
            .query_one(
                // The statement's snapshot does not see its own upsert: count the others.
                // (PostgreSQL runs a data-modifying WITH whether or not it is read.)
                "WITH beat AS (INSERT INTO replicas (id) VALUES ($1) \
                               ON CONFLICT (id) DO UPDATE SET heartbeat_at = now() RETURNING id) \
                 SELECT 1 + count(*) FROM replicas r \
                 WHERE r.id <> $1 AND r.heartbeat_at > now() - make_interval(secs => $2)",
                &[&replica, &(REPLICA_SILENCE_SECS as f64)],
            )
            .await
            .map(|row| row.get::<_, i64>(0).max(1) as u64)
            .map_err(|e| crate::store::db::describe(&e)),
        Err(e) => Err(e.to_string()),
    };
    match written {
        Ok(alive) => Some(alive),
        Err(error) => {
            tracing::warn!(%error, "recording this replica's heartbeat");
            None
        }
    }
}

/// A replica stopping cleanly says so: its jobs need not wait for the silence to be noticed.
pub async fn retire(pool: &Pool, replica: Uuid) {
    if let Ok(client) = pool.get().await {
        if let Err(e) = client
            .execute("DELETE FROM replicas WHERE id = $1", &[&replica])
            .await
        {
            tracing::warn!(error = %crate::store::db::describe(&e), "retiring this replica");
        }
    }
}

/// One pass of both rules.
pub async fn sweep(pool: &Pool) {
    let Ok(client) = pool.get().await else {
        return;
    };
    // Both rules in one statement (they touch disjoint rows: queued and running; PostgreSQL
    // runs a data-modifying WITH whether or not it is read), so that the live-follow trigger
    // on `deployments` fires once a sweep, not twice. A server runs
    // one job at a time, so each orphan failed here may free its server's next job: its poll,
    // on whichever replica, is told to look.
    if let Err(e) = client
        .execute(
            "WITH expired AS ( \
               UPDATE deployments SET status = 'failed', error_step = $5, \
               error_message = 'agent offline: the server''s agent did not collect the job in time; the application keeps running', \
               finished_at = now() WHERE status = 'queued' AND expires_at <= now()), \
             orphans AS ( \
               UPDATE deployments d SET status = 'failed', error_step = $3, \
               error_message = 'the control plane replica running this deploy stopped and the server did not report a result', \
               finished_at = now() \
               WHERE d.status = 'running' AND d.started_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = d.dispatched_replica \
                               AND r.heartbeat_at > now() - make_interval(secs => $2)) \
               RETURNING d.server_id) \
             SELECT pg_notify($4, server_id::text) FROM orphans",
            &[
                &(ORPHAN_GRACE_SECS as f64),
                &(REPLICA_SILENCE_SECS as f64),
                &Step::Run,
                &JOB_CHANNEL,
                &Step::Dispatch,
            ],
        )
        .await
    {
        tracing::warn!(error = %crate::store::db::describe(&e), "sweeping deployments");
    }
}
