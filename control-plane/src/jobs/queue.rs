//! A job begins here: a deploy or rollback someone asked for, a rollout's batch, or the
//! `forget_env` jobs of a deleted project. Queued inside the caller's transaction (so the job
//! exists exactly when what asked for it commits) with the server's next sequence number,
//! and announced to every replica with a notification that commits with it.

use std::time::Duration;

use uuid::Uuid;

use super::wake::{JOB_CHANNEL, WAKE_LIST_MAX};
use super::JobKind;

/// What to queue: the same for every server of one request.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub account_id: Uuid,
    /// The user who asked (none for jobs the platform queues itself).
    pub created_by: Option<Uuid>,
    /// The project deployed; none for an agent upgrade.
    pub project_id: Option<Uuid>,
    pub kind: JobKind,
    pub git_ref: Option<&'a str>,
    pub rollback_of: Option<Uuid>,
    /// The rollout the job is part of.
    pub rollout_id: Option<Uuid>,
    /// The commit the ref must resolve to on the server (signed into the job).
    pub expected_commit: Option<&'a str>,
    /// A rollback's chosen release; `None`: the newest good one before `current`.
    pub rollback_to: Option<&'a str>,
    /// How long it waits for its server before it fails as unreachable.
    pub timeout: Duration,
    /// An agent upgrade's package version (checked).
    pub upgrade_version: Option<&'a str>,
}

/// Why one job could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No such server in the account (or it was deleted).
    #[error("no such server")]
    NoSuchServer,
    /// An SSH server whose credentials are gone.
    #[error("this SSH server has no stored credentials")]
    NoSshCredentials,
    /// An agent server without a valid certificate: revoked, expired or never enrolled.
    #[error(
        "this server has no valid agent certificate: enroll its agent first (a revoked agent is never reached by any other way)"
    )]
    AgentNotEnrolled,
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// Queues `job` on each of `servers` that can take it, answering (server, job id) for those.
///
/// Release ids (computed here) sort by time: `YYYYMMDDHHMMSS-`, the server's job sequence
/// number zero-padded (orders releases made within the same second), and six hex digits of
/// the job id (unique even where several servers share one deploy path, e.g. NFS).
pub async fn enqueue_many(
    tx: &tokio_postgres::Transaction<'_>,
    job: &NewJob<'_>,
    servers: &[Uuid],
) -> Result<Vec<(Uuid, Uuid)>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "WITH locked AS ( \
               SELECT id FROM servers s WHERE id = ANY($1) AND account_id = $2 AND deleted_at IS NULL \
                 AND ((transport = 'agent' AND EXISTS (SELECT 1 FROM agent_certificates c \
                        WHERE c.server_id = s.id AND c.revoked_at IS NULL AND c.retired_at IS NULL \
                          AND c.not_after > now())) \
                   OR (transport = 'ssh' AND (ssh_private_key_ciphertext IS NOT NULL \
                        OR ssh_password_ciphertext IS NOT NULL))) \
               ORDER BY id FOR UPDATE), \
             numbered AS ( \
               UPDATE servers SET job_sequence = job_sequence + 1 FROM locked \
               WHERE servers.id = locked.id RETURNING servers.id AS server, servers.job_sequence AS seq), \
             jobs AS (SELECT gen_random_uuid() AS job, server, seq FROM numbered), \
             queued AS ( \
               INSERT INTO deployments (id, account_id, project_id, server_id, kind, git_ref, rollback_of, \
                 sequence, release_id, status, created_by, expires_at, rollout_id, expected_commit, \
                 upgrade_version) \
               SELECT job, $2, $3, server, $4, $5, $6, seq, \
                 CASE WHEN $4 = 'deploy' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS') \
                   || '-' || lpad(seq::text, 10, '0') || '-' || substr(job::text, 1, 6) \
                   ELSE $11 END, \
                 'queued', $7, now() + make_interval(secs => $8), $9, $10, $12 \
               FROM jobs RETURNING server_id, id) \
             SELECT server_id, id FROM queued",
            &[&servers, &job.account_id, &job.project_id, &job.kind.as_str(), &job.git_ref,
              &job.rollback_of, &job.created_by, &job.timeout.as_secs_f64(), &job.rollout_id,
              &job.expected_commit, &job.rollback_to, &job.upgrade_version],
        )
        .await?;
    let queued: Vec<(Uuid, Uuid)> = rows
        .iter()
        .map(|r| (r.get("server_id"), r.get("id")))
        .collect();
    // Wake the servers' polls on every replica: their ids, [`WAKE_LIST_MAX`] to a
    // notification, so that each replica wakes only the polls of servers that got a job.
    // (A batch once sent one "wake everyone" instead: every idle poll of every replica then
    // claimed, and a rollout's batch, queued a chunk at a time, would do so once a chunk.)
    if !queued.is_empty() {
        let servers: Vec<Uuid> = queued.iter().map(|(s, _)| *s).collect();
        tx.execute(
            "SELECT pg_notify($1, string_agg(s::text, ',')) \
             FROM unnest($2::uuid[]) WITH ORDINALITY AS t(s, n) GROUP BY (n - 1) / $3",
            &[&JOB_CHANNEL, &servers, &(WAKE_LIST_MAX as i64)],
        )
        .await?;
    }
    Ok(queued)
}

/// Queues one job, saying clearly why its server cannot take it.
pub async fn enqueue(
    tx: &tokio_postgres::Transaction<'_>,
    job: &NewJob<'_>,
    server_id: Uuid,
) -> Result<Uuid, QueueError> {
    let queued = enqueue_many(tx, job, &[server_id]).await?;
    if let Some((_, id)) = queued.first() {
        return Ok(*id);
    }
    let transport: Option<String> = tx
        .query_opt(
            "SELECT transport FROM servers WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&server_id, &job.account_id],
        )
        .await?
        .map(|r| r.get("transport"));
    Err(match transport.as_deref() {
        None => QueueError::NoSuchServer,
        Some("ssh") => QueueError::NoSshCredentials,
        Some(_) => QueueError::AgentNotEnrolled,
    })
}

/// The servers a deploy of `project` started on: where its environment may have been
/// written, and so where a `forget_env` job must go when it is deleted.
pub async fn servers_deployed_to(
    tx: &tokio_postgres::Transaction<'_>,
    project: Uuid,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    Ok(tx
        .query(
            "SELECT DISTINCT server_id FROM deployments \
             WHERE project_id = $1 AND kind = 'deploy' AND started_at IS NOT NULL",
            &[&project],
        )
        .await?
        .iter()
        .map(|r| r.get("server_id"))
        .collect())
}
