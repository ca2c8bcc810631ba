//! Jobs read back, for the API: the history of an account's deployments, one deployment, its
//! status and its log. Rows become [`Deployment`]s read by column name, with the stored words
//! parsed into their enums (a value this version does not know is an error, not a guess).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{JobKind, JobStatus};
use crate::identity::reach::Reach;

/// One job as stored.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub id: Uuid,
    pub project_id: Uuid,
    pub server_id: Uuid,
    pub kind: JobKind,
    pub git_ref: Option<String>,
    pub status: JobStatus,
    pub commit: Option<String>,
    pub release_id: Option<String>,
    pub sequence: i64,
    /// On failure: the step and why.
    pub error: Option<(String, String)>,
    pub rollback_of: Option<Uuid>,
    pub rollout_id: Option<Uuid>,
    /// Who queued it (none for jobs the platform queued), and their email while they are
    /// still a member.
    pub created_by: Option<(Uuid, Option<String>)>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const SELECT: &str =
    "SELECT d.id, d.project_id, d.server_id, d.kind, d.git_ref, d.status, d.commit, \
     d.release_id, d.sequence, d.error_step, d.error_message, d.rollback_of, d.rollout_id, \
     d.created_by, u.email AS created_by_email, d.created_at, d.started_at, d.finished_at \
     FROM deployments d LEFT JOIN users u ON u.id = d.created_by WHERE d.account_id = $1 \
     AND d.kind <> 'upgrade_agent'";

impl Deployment {
    fn from_row(r: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        let step: Option<String> = r.try_get("error_step")?;
        let message: Option<String> = r.try_get("error_message")?;
        let created_by: Option<Uuid> = r.try_get("created_by")?;
        Ok(Self {
            id: r.try_get("id")?,
            project_id: r.try_get("project_id")?,
            server_id: r.try_get("server_id")?,
            kind: r.try_get("kind")?,
            git_ref: r.try_get("git_ref")?,
            status: r.try_get("status")?,
            commit: r.try_get("commit")?,
            release_id: r.try_get("release_id")?,
            sequence: r.try_get("sequence")?,
            error: step.map(|step| (step, message.unwrap_or_default())),
            rollback_of: r.try_get("rollback_of")?,
            rollout_id: r.try_get("rollout_id")?,
            created_by: match created_by {
                Some(id) => Some((id, r.try_get("created_by_email")?)),
                None => None,
            },
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
        })
    }
}

/// Which deployments of an account to list; `None` is "any".
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub project_id: Option<Uuid>,
    pub server_id: Option<Uuid>,
    pub status: Option<JobStatus>,
    pub kind: Option<JobKind>,
    pub rollout_id: Option<Uuid>,
    /// Queued at or after.
    pub since: Option<DateTime<Utc>>,
    /// Queued before.
    pub until: Option<DateTime<Utc>>,
}

/// Where a page of the history starts, and how many rows to fetch.
#[derive(Debug, Clone)]
pub struct Keyset<'a> {
    /// The ordering and limit clause over `d.created_at, d.id`, with placeholders `$9`
    /// (time), `$10` (id) and `$11` (count).
    pub sql: &'a str,
    pub after: Option<(DateTime<Utc>, Uuid)>,
    pub fetch: i64,
}

/// The condition that keeps a member's deployments within their resource scope: the project
/// among `$p` and the server carrying the labels `$s` (NULL: no limit).
fn within_reach(p: u8, s: u8) -> String {
    format!(
        " AND (${p}::uuid[] IS NULL OR d.project_id = ANY(${p})) \
         AND (${s}::jsonb IS NULL OR EXISTS (SELECT 1 FROM servers rs \
              WHERE rs.id = d.server_id AND rs.labels @> ${s}))"
    )
}

/// One page of an account's deployments, within the caller's reach.
pub async fn list(
    client: &tokio_postgres::Client,
    account: Uuid,
    reach: &Reach,
    filter: &Filter,
    page: &Keyset<'_>,
) -> Result<Vec<Deployment>, tokio_postgres::Error> {
    // Absent filters are NULL parameters, so one statement (and one plan) serves them all.
    let rows = client
        .query(
            &format!(
                "{SELECT} AND ($2::uuid IS NULL OR d.project_id = $2) \
                 AND ($3::uuid IS NULL OR d.server_id = $3) \
                 AND ($4::text IS NULL OR d.status = $4) \
                 AND ($5::text IS NULL OR d.kind = $5) \
                 AND ($6::uuid IS NULL OR d.rollout_id = $6) \
                 AND ($7::timestamptz IS NULL OR d.created_at >= $7) \
                 AND ($8::timestamptz IS NULL OR d.created_at < $8){}{}",
                within_reach(12, 13),
                page.sql
            ),
            &[
                &account,
                &filter.project_id,
                &filter.server_id,
                &filter.status,
                &filter.kind,
                &filter.rollout_id,
                &filter.since,
                &filter.until,
                &page.after.map(|(t, _)| t),
                &page.after.map(|(_, id)| id),
                &page.fetch,
                &reach.project_filter(),
                &reach.server_filter(),
            ],
        )
        .await?;
    rows.iter().map(Deployment::from_row).collect()
}

/// One deployment of an account, if it is within the caller's reach.
pub async fn one(
    client: &tokio_postgres::Client,
    account: Uuid,
    reach: &Reach,
    id: Uuid,
) -> Result<Option<Deployment>, tokio_postgres::Error> {
    client
        .query_opt(
            &format!("{SELECT} AND d.id = $2{}", within_reach(3, 4)),
            &[
                &account,
                &id,
                &reach.project_filter(),
                &reach.server_filter(),
            ],
        )
        .await?
        .as_ref()
        .map(Deployment::from_row)
        .transpose()
}

/// A deployment's log line as stored: its id, when, which stream (0 Sensei, 1 stdout,
/// 2 stderr) and the text.
#[derive(Debug, Clone)]
pub struct StoredLine {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub stream: i16,
    pub line: String,
}

/// Up to `limit` log lines after line `after`, and the deployment's status when they were
/// read (so a follower knows whether more can come).
pub async fn lines_after(
    client: &tokio_postgres::Client,
    id: Uuid,
    after: i64,
    limit: i64,
) -> Result<(Vec<StoredLine>, JobStatus), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, at, stream, line FROM deployment_logs WHERE deployment_id = $1 AND id > $2 \
             ORDER BY id LIMIT $3",
            &[&id, &after, &limit],
        )
        .await?;
    let status: JobStatus = client
        .query_one("SELECT status FROM deployments WHERE id = $1", &[&id])
        .await?
        .try_get("status")?;
    let lines = rows
        .iter()
        .map(|r| {
            Ok(StoredLine {
                id: r.try_get("id")?,
                at: r.try_get("at")?,
                stream: r.try_get("stream")?,
                line: r.try_get("line")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    Ok((lines, status))
}

/// Whether a successful deploy of `project` on `server` made `release`: the only releases a
/// rollback may be sent to.
pub async fn made_release(
    client: &impl tokio_postgres::GenericClient,
    account: Uuid,
    project: Uuid,
    server: Uuid,
    release: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM deployments WHERE account_id = $1 AND server_id = $2 \
             AND project_id = $3 AND kind = 'deploy' AND status = 'succeeded' AND release_id = $4",
            &[&account, &server, &project, &release],
        )
        .await?
        .is_some())
}

/// How many deployments are in each status, for the metrics page.
pub async fn count_by_status(
    client: &tokio_postgres::Client,
) -> Result<Vec<(JobStatus, i64)>, tokio_postgres::Error> {
    client
        .query(
            "SELECT status, count(*) AS n FROM deployments GROUP BY status",
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
        .collect()
}

/// A running target of an agent upgrade rollout, with what its job and its agent say.
#[derive(Debug, Clone)]
pub struct UpgradeTargetState {
    pub server: Uuid,
    /// When its job was queued (unix seconds).
    pub started_at: i64,
    /// The version its agent last reported.
    pub agent_version: Option<String>,
    /// Its upgrade job's status, if it has one.
    pub job_status: Option<JobStatus>,
    /// The job never reached its server (failed at [`Step::Dispatch`](super::Step::Dispatch)).
    pub undelivered: bool,
    pub message: Option<String>,
    /// The database's clock (unix seconds), the one `started_at` was read with.
    pub now: i64,
}

/// The running targets of the agent upgrade rollout `rollout`.
pub async fn upgrade_targets(
    tx: &tokio_postgres::Transaction<'_>,
    rollout: Uuid,
) -> Result<Vec<UpgradeTargetState>, tokio_postgres::Error> {
    tx.query(
        "SELECT t.server_id, extract(epoch FROM coalesce(t.started_at, now()))::bigint AS started, \
                s.agent_version, d.status AS job_status, d.error_step, d.error_message, \
                extract(epoch FROM now())::bigint AS now \
         FROM rollout_targets t JOIN servers s ON s.id = t.server_id \
         LEFT JOIN deployments d ON d.id = t.deployment_id \
         WHERE t.rollout_id = $1 AND t.status = 'running'",
        &[&rollout],
    )
    .await?
    .iter()
    .map(|r| {
        let step: Option<&str> = r.try_get("error_step")?;
        Ok(UpgradeTargetState {
            server: r.try_get("server_id")?,
            started_at: r.try_get("started")?,
            agent_version: r.try_get("agent_version")?,
            job_status: r.try_get("job_status")?,
            undelivered: step == Some(super::Step::Dispatch.as_str()),
            message: r.try_get("error_message")?,
            now: r.try_get("now")?,
        })
    })
    .collect()
}

/// The commit the first successful job of `rollout` deployed (a full hex commit id only).
pub async fn first_deployed_commit(
    tx: &tokio_postgres::Transaction<'_>,
    rollout: Uuid,
) -> Result<Option<String>, tokio_postgres::Error> {
    tx.query_opt(
        "SELECT d.commit FROM rollout_targets t JOIN deployments d ON d.id = t.deployment_id \
         WHERE t.rollout_id = $1 AND t.status = 'succeeded' AND d.commit ~ '^[0-9a-f]{40}$' \
         ORDER BY d.finished_at, d.id LIMIT 1",
        &[&rollout],
    )
    .await?
    .map(|r| r.try_get("commit"))
    .transpose()
}

/// How many of `rollout`'s rollback jobs are still queued or running.
pub async fn open_rollbacks(
    tx: &tokio_postgres::Transaction<'_>,
    rollout: Uuid,
) -> Result<i64, tokio_postgres::Error> {
    tx.query_one(
        "SELECT count(*) AS n FROM rollout_targets t JOIN deployments d ON d.id = t.rollback_deployment_id \
         WHERE t.rollout_id = $1 AND d.status IN ('queued', 'running')",
        &[&rollout],
    )
    .await?
    .try_get("n")
}

/// The (project, server) pairs where a deploy of a project with DNS settings succeeded: the
/// servers that get the project's DNS record.
pub async fn deployed_pairs(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<(Uuid, Uuid)>, tokio_postgres::Error> {
    client
        .query(
            "SELECT DISTINCT d.project_id, d.server_id FROM deployments d \
             JOIN projects p ON p.id = d.project_id \
             WHERE p.dns IS NOT NULL AND p.deleted_at IS NULL \
               AND d.kind = 'deploy' AND d.status = 'succeeded'",
            &[],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get("project_id")?, r.try_get("server_id")?)))
        .collect()
}
