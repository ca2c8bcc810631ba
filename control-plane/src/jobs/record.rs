//! What comes back from a running job: its log lines, then how it ended. Also every other
//! way a job ends without a result from its server: its agent left mid-deploy, its
//! certificate was revoked, its project deleted. An end is final: only a job still open is
//! ever given one, so a late or repeated report changes nothing.

use std::time::Duration;

use sensei_shared::protocol::{JobResult, LogLine};
use uuid::Uuid;

use super::{JobStatus, Step};

/// Lines kept per deployment; beyond this the log says it was cut.
pub const MAX_LOG_LINES: i64 = 20_000;

/// The reason a revocation gives the jobs it fails.
pub const CERTIFICATE_REVOKED: &str = "certificate revoked";

/// The result of a job whose server's certificate was revoked before it ran.
pub fn certificate_revoked() -> JobResult {
    JobResult::failed(Step::Dispatch.as_str(), CERTIFICATE_REVOKED)
}

/// Records how deployments ended, in one statement; a deployment no longer running is left
/// as it is. Answers how many were recorded.
pub async fn record_ends(
    client: &tokio_postgres::Client,
    ends: &[(Uuid, &JobResult)],
) -> Result<u64, tokio_postgres::Error> {
    // What servers report is untrusted text: one NUL would fail the whole statement.
    let stored: Vec<JobResult> = ends.iter().map(|(_, r)| r.storable()).collect();
    let ends: Vec<(Uuid, &JobResult)> = ends.iter().map(|(id, _)| *id).zip(&stored).collect();
    let ids: Vec<Uuid> = ends.iter().map(|(id, _)| *id).collect();
    let statuses: Vec<JobStatus> = ends
        .iter()
        .map(|(_, r)| {
            if r.succeeded {
                JobStatus::Succeeded
            } else {
                JobStatus::Failed
            }
        })
        .collect();
    let commits: Vec<Option<&str>> = ends.iter().map(|(_, r)| r.commit.as_deref()).collect();
    let releases: Vec<Option<&str>> = ends.iter().map(|(_, r)| r.release_id.as_deref()).collect();
    let steps: Vec<Option<&str>> = ends
        .iter()
        .map(|(_, r)| r.error.as_ref().map(|(s, _)| s.as_str()))
        .collect();
    let messages: Vec<Option<&str>> = ends
        .iter()
        .map(|(_, r)| r.error.as_ref().map(|(_, m)| m.as_str()))
        .collect();
    client
        .execute(
            "UPDATE deployments d SET status = f.status, commit = COALESCE(f.commit, d.commit), \
             release_id = COALESCE(f.release_id, d.release_id), error_step = f.step, \
             error_message = f.message, finished_at = now() \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
               AS f(id, status, commit, release_id, step, message) \
             WHERE d.id = f.id AND d.status = 'running'",
            &[&ids, &statuses, &commits, &releases, &steps, &messages],
        )
        .await
}

/// Waits before each further attempt at writing job ends: about 8 s in all, enough for a lost
/// database connection to be replaced, short enough that an agent waiting for its
/// acknowledgement is not kept long.
pub const RECORD_RETRIES: [Duration; 5] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// [`record_ends`], tried again after each of [`RECORD_RETRIES`] while the database fails.
/// Both runners write the ends of their jobs through this: a result is never dropped at the
/// first error.
pub async fn record_ends_retrying(
    pool: &deadpool_postgres::Pool,
    ends: &[(Uuid, &JobResult)],
) -> Result<u64, String> {
    let mut waits = RECORD_RETRIES.iter();
    loop {
        let written = match pool.get().await {
            Ok(client) => record_ends(&client, ends)
                .await
                .map_err(|e| crate::store::db::describe(&e)),
            Err(e) => Err(e.to_string()),
        };
        match (written, waits.next()) {
            (Err(error), Some(wait)) => {
                tracing::warn!(%error, jobs = ends.len(), "recording the end of deployments; trying again");
                tokio::time::sleep(*wait).await;
            }
            (written, _) => return written,
        }
    }
}

/// Records the end of a deployment this replica ran itself (over SSH). Nobody else holds the
/// result (an agent keeps its own and reports it again; an SSH server does not), so it is
/// written again, round after round of [`RECORD_RETRIES`], until the database takes it; the
/// server takes no other job meanwhile, as its state is not yet known. If the replica stops
/// first, or is silent in the database long enough for another replica to take it for gone,
/// the orphan sweep fails the job.
pub async fn finish(pool: &deadpool_postgres::Pool, id: Uuid, result: &JobResult) {
    loop {
        match record_ends_retrying(pool, &[(id, result)]).await {
            Ok(0) => {
                // Another replica ended it meanwhile (as an orphan, this one having been
                // silent in the database too long): an end is final, so say what is dropped.
                tracing::warn!(deployment = %id, succeeded = result.succeeded, "the deployment had already ended (failed as an orphan while this replica could not reach the database); its SSH result is not recorded");
                return;
            }
            Ok(_) => return,
            Err(error) => {
                tracing::error!(deployment = %id, %error, "recording a deployment's end failed; trying again");
            }
        }
    }
}

/// Records a result an agent reports after reconnecting (to any replica), if the job belongs
/// to that server and is still open. Answers whether it was recorded; an error when the
/// database could not say (the agent must keep the result and report it again).
pub async fn report(
    pool: &deadpool_postgres::Pool,
    server_id: Uuid,
    job_id: Uuid,
    result: &JobResult,
) -> Result<bool, super::batch::NotRecorded> {
    let recorded = match pool.get().await {
        Ok(client) => record_ends_of_server(&client, server_id, &[(job_id, result)]).await,
        Err(e) => Err(e.to_string()),
    };
    match recorded {
        Ok(n) => Ok(n > 0),
        Err(error) => {
            tracing::error!(%server_id, deployment = %job_id, %error, "recording a reported result");
            Err(super::batch::NotRecorded(error))
        }
    }
}

/// [`record_ends`] limited to the jobs of one server: a report names its job, and a server
/// may only end its own.
async fn record_ends_of_server(
    client: &tokio_postgres::Client,
    server_id: Uuid,
    ends: &[(Uuid, &JobResult)],
) -> Result<u64, String> {
    let own: Vec<Uuid> = client
        .query(
            "SELECT id FROM deployments WHERE id = ANY($1) AND server_id = $2 AND status = 'running'",
            &[&ends.iter().map(|(id, _)| *id).collect::<Vec<_>>(), &server_id],
        )
        .await
        .map_err(|e| crate::store::db::describe(&e))?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    let ends: Vec<(Uuid, &JobResult)> = ends
        .iter()
        .filter(|(id, _)| own.contains(id))
        .copied()
        .collect();
    if ends.is_empty() {
        return Ok(0);
    }
    record_ends(client, &ends)
        .await
        .map_err(|e| crate::store::db::describe(&e))
}

/// Appends log lines to a deployment (up to [`MAX_LOG_LINES`] in all, each cut to
/// [`sensei_shared::lines::MAX_STORED_LINE_CHARS`] characters). NUL bytes, which PostgreSQL text cannot
/// hold, are dropped.
pub async fn store_lines(pool: &deadpool_postgres::Pool, id: Uuid, lines: &[LogLine]) {
    let Ok(client) = pool.get().await else {
        tracing::warn!(deployment = %id, lines = lines.len(), "no database connection: deploy log lines lost");
        return;
    };
    // A hostile agent's lines are bounded here as the engine bounds its own output: one
    // message may carry a mebibyte of lines, so their count is cut too, not only checked.
    let kept = usize::try_from(MAX_LOG_LINES).unwrap_or(usize::MAX);
    let lines = &lines[..lines.len().min(kept)];
    let streams: Vec<i16> = lines.iter().map(|l| i16::from(l.stream)).collect();
    let texts: Vec<String> = lines
        .iter()
        .map(|l| {
            sensei_shared::protocol::storable_text(
                &l.text,
                sensei_shared::lines::MAX_STORED_LINE_CHARS,
            )
        })
        .collect();
    let result = client
        .execute(
            "INSERT INTO deployment_logs (deployment_id, stream, line) \
             SELECT $1, s, l FROM unnest($2::smallint[], $3::text[]) WITH ORDINALITY AS t(s, l, n) \
             WHERE n <= $4 - (SELECT count(*) FROM deployment_logs WHERE deployment_id = $1)",
            &[&id, &streams, &texts, &MAX_LOG_LINES],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(deployment = %id, error = %crate::store::db::describe(&e), "storing deploy log lines");
    }
}

/// Deletes log lines older than their account's `deploy_log_retention_days`. The jobs
/// themselves (status, commit, release, timings) are kept.
pub async fn expire_logs(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM deployment_logs l USING deployments d, accounts a \
             WHERE l.deployment_id = d.id AND d.account_id = a.id \
             AND l.at < now() - make_interval(days => a.deploy_log_retention_days)",
            &[],
        )
        .await
}

/// Fails the jobs `replica` handed to `server_id` that are still running: their agent went
/// away mid-deploy. Answers how many.
pub async fn fail_interrupted(
    pool: &deadpool_postgres::Pool,
    replica: Uuid,
    server_id: Uuid,
) -> u64 {
    let Ok(client) = pool.get().await else {
        tracing::warn!(%server_id, "no database connection: interrupted deployments stay running until the orphan sweep");
        return 0;
    };
    match client
        .execute(
            "UPDATE deployments SET status = 'failed', error_step = $3, \
             error_message = 'the agent disconnected during the deploy; current still points at a complete release', \
             finished_at = now() WHERE server_id = $1 AND status = 'running' AND dispatched_replica = $2",
            &[&server_id, &replica, &Step::Run],
        )
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(%server_id, error = %crate::store::db::describe(&e), "failing interrupted deployments");
            0
        }
    }
}

/// Fails, inside the caller's transaction, every open job of these agent servers: their
/// certificates are being revoked, and nothing queued for them may still reach them.
pub async fn fail_revoked(
    tx: &tokio_postgres::Transaction<'_>,
    servers: &[Uuid],
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "UPDATE deployments d SET status = 'failed', error_step = $3, \
         error_message = $2, finished_at = now() \
         FROM servers s WHERE s.id = d.server_id AND s.transport = 'agent' \
         AND d.server_id = ANY($1) AND d.status IN ('queued', 'running')",
        &[&servers, &CERTIFICATE_REVOKED, &Step::Dispatch],
    )
    .await
}

/// Fails, inside the caller's transaction, the queued jobs of a project being deleted (but
/// the `forget_env` jobs its deletion queues). Answers how many.
pub async fn fail_for_deleted_project(
    tx: &tokio_postgres::Transaction<'_>,
    project: Uuid,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "UPDATE deployments SET status = 'failed', error_step = $2, \
         error_message = 'the project was deleted', finished_at = now() \
         WHERE project_id = $1 AND status = 'queued' AND kind <> $3",
        &[&project, &Step::Dispatch, &super::JobKind::ForgetEnv],
    )
    .await
}
