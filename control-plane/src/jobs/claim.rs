//! A queued job is claimed by whoever will run it: an agent's poll (through the batched
//! claim of [`super::batch`]) or the SSH runner. One rule for both: **a server runs one job
//! at a time**, its oldest queued one first, and a job is only claimed while it has not
//! expired. Claiming marks it `running`, stamps when and by which replica (so that a replica
//! that dies is noticed by [`super::sweep`]) and returns what signing it needs.

use std::collections::HashMap;

use uuid::Uuid;

use super::JobKind;

/// A job claimed for dispatch.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub server_id: Uuid,
    pub sequence: i64,
    pub kind: JobKind,
    pub git_ref: Option<String>,
    pub release_id: Option<String>,
    /// None for an agent upgrade.
    pub project_id: Option<Uuid>,
    /// An agent upgrade's package version.
    pub upgrade_version: Option<String>,
    /// The rollout it belongs to: its deploy configuration is the rollout's copy.
    pub rollout_id: Option<Uuid>,
    /// The commit the ref must resolve to.
    pub expected_commit: Option<String>,
    /// The newest job-signing key the server's agent acknowledged (agents only).
    pub job_key_acknowledged: Option<Vec<u8>>,
}

/// The columns [`Claimed::from_row`] reads.
const CLAIMED_COLUMNS: &str = "d.id, d.server_id, d.sequence, d.kind, d.git_ref, d.release_id, \
                               d.project_id, d.rollout_id, d.expected_commit, d.upgrade_version, \
                               (SELECT job_key_acknowledged FROM servers \
                                WHERE id = d.server_id) AS job_key_acknowledged";

impl Claimed {
    fn from_row(r: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            server_id: r.try_get("server_id")?,
            sequence: r.try_get("sequence")?,
            kind: r.try_get("kind")?,
            git_ref: r.try_get("git_ref")?,
            release_id: r.try_get("release_id")?,
            project_id: r.try_get("project_id")?,
            upgrade_version: r.try_get("upgrade_version")?,
            rollout_id: r.try_get("rollout_id")?,
            expected_commit: r.try_get("expected_commit")?,
            job_key_acknowledged: r.try_get("job_key_acknowledged")?,
        })
    }
}

/// SQL: the certificate `s.fingerprint` that server `s.server_id`'s connection presented is
/// valid in the database (not revoked, retired or expired). Only such a connection may claim
/// a job, or prove anything about its server's jobs ([`super::sweep::fail_jobs_left_behind`]).
pub(super) const PRESENTED_CERTIFICATE_VALID: &str = "EXISTS (SELECT 1 FROM agent_certificates c \
       WHERE c.server_id = s.server_id AND c.fingerprint = s.fingerprint \
         AND c.revoked_at IS NULL AND c.retired_at IS NULL AND c.not_after > now())";

/// Claims, in one statement, the next job of each agent server in `sessions` (server, the
/// fingerprint of the certificate its connection presented). A server is skipped when its job
/// is still running, and when that certificate is no longer valid in the database: a
/// revocation committed on any replica stops claims at once, before its notification
/// arrives. Answers by server id.
pub async fn for_agents(
    client: &impl tokio_postgres::GenericClient,
    replica: Uuid,
    sessions: &[(Uuid, Vec<u8>)],
) -> Result<HashMap<Uuid, Claimed>, tokio_postgres::Error> {
    let (servers, bindings): (Vec<Uuid>, Vec<Vec<u8>>) = sessions.iter().cloned().unzip();
    let rows = client
        .query(
            &format!(
                "WITH picked AS ( \
                   SELECT q.id FROM unnest($1::uuid[], $3::bytea[]) AS s(server_id, fingerprint) \
                   CROSS JOIN LATERAL (SELECT id FROM deployments \
                       WHERE server_id = s.server_id AND status = 'queued' AND expires_at > now() \
                         AND NOT EXISTS (SELECT 1 FROM deployments r \
                           WHERE r.server_id = s.server_id AND r.status = 'running') \
                         AND {PRESENTED_CERTIFICATE_VALID} \
                       ORDER BY sequence LIMIT 1 FOR UPDATE SKIP LOCKED) q) \
                 UPDATE deployments d SET status = 'running', started_at = now(), dispatched_replica = $2 \
                 FROM picked WHERE d.id = picked.id \
                 RETURNING {CLAIMED_COLUMNS}"
            ),
            &[&servers, &replica, &bindings],
        )
        .await?;
    rows.iter()
        .map(|r| Claimed::from_row(r).map(|c| (c.server_id, c)))
        .collect()
}

/// SSH servers with a job waiting, with their account: the candidates the SSH runner tries
/// to claim for (at most `limit`). Starts from the SSH servers (index `servers_ssh`), not from
/// the queue, which a rollout to agents fills with thousands of jobs that are not SSH's.
pub async fn ssh_candidates(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, tokio_postgres::Error> {
    Ok(client
        .query(
            // LATERAL with LIMIT 1 keeps the plan a loop over the SSH servers whatever the
            // statistics say: written as EXISTS, and planned while the queue was empty, it
            // hashed the whole queue instead (10 ms a call with 10,000 queued, against 0.06).
            "SELECT s.id AS server_id, s.account_id FROM servers s \
             CROSS JOIN LATERAL (SELECT 1 FROM deployments d WHERE d.server_id = s.id \
               AND d.status = 'queued' AND d.expires_at > now() LIMIT 1) queued \
             WHERE s.transport = 'ssh' LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| (r.get("server_id"), r.get("account_id")))
        .collect())
}

/// Claims the next job of one SSH server, if no other job of it is running. The server row's
/// lock serialises this across replicas (a server locked by another claim is skipped, not
/// waited for).
pub async fn for_ssh(
    client: &mut deadpool_postgres::Client,
    replica: Uuid,
    server_id: Uuid,
) -> Result<Option<Claimed>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let locked = tx
        .query_opt(
            "SELECT 1 FROM servers WHERE id = $1 FOR UPDATE SKIP LOCKED",
            &[&server_id],
        )
        .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let row = tx
        .query_opt(
            &format!(
                "UPDATE deployments d SET status = 'running', started_at = now(), dispatched_replica = $2 \
                 WHERE d.id = (SELECT id FROM deployments WHERE server_id = $1 AND status = 'queued' \
                               AND expires_at > now() ORDER BY sequence LIMIT 1) \
                   AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.server_id = $1 AND r.status = 'running') \
                 RETURNING {CLAIMED_COLUMNS}"
            ),
            &[&server_id, &replica],
        )
        .await?;
    let claimed = row.as_ref().map(Claimed::from_row).transpose()?;
    tx.commit().await?;
    Ok(claimed)
}
