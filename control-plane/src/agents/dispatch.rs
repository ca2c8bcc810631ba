//! Handing jobs to a connected agent. Each poll stream the agent opens gets the next queued
//! job for its server: at once if one is queued, otherwise as soon as one is (woken through
//! the hub, with a periodic re-check of the table as a safety net). The job is signed for this
//! server and this certificate. Then the agent's log lines and result are recorded.

use std::time::Duration;

use chrono::Utc;
use ed25519_dalek::SigningKey;
use quinn::VarInt;
use sensei_certs::{AgentCertStatus, Fingerprint};
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::job::{
    DeploySpec, ForgetEnvSpec, Hooks, JobPayload, JobTask, RollbackSpec, SignedJob,
};
use sensei_shared::protocol::{AgentMessage, ControlMessage, JobResult, LogLine};
use sensei_shared::session::{ControlJob, ControlJobAction};
use uuid::Uuid;

use super::gateway::GatewayContext;

/// How often a waiting poll looks at the table even without a wake-up. Wake-ups come from
/// PostgreSQL notifications (and every poll is woken when the LISTEN connection comes back),
/// so this is only a safety net; every idle agent costs one query per interval, which at
/// 5 s and 10,000 agents was 2,000 queries a second (see docs/benchmarks.md).
const RECHECK: Duration = Duration::from_secs(60);
/// How long a signed job stays valid for the agent after it is sent.
const JOB_VALIDITY_SECS: i64 = 300;
/// Lines kept per deployment; beyond this the log says it was cut.
pub const MAX_LOG_LINES: i64 = 20_000;

/// A job claimed for dispatch.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub sequence: i64,
    pub kind: String,
    pub git_ref: Option<String>,
    pub release_id: Option<String>,
    pub project_id: Uuid,
    /// The rollout it belongs to: its deploy configuration is the rollout's copy.
    pub rollout_id: Option<Uuid>,
    /// The commit the ref must resolve to.
    pub expected_commit: Option<String>,
}

/// The columns [`Claimed::from_row`] reads.
pub const CLAIMED_COLUMNS: &str =
    "id, sequence, kind, git_ref, release_id, project_id, rollout_id, expected_commit";

impl Claimed {
    pub fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            id: r.get("id"),
            sequence: r.get("sequence"),
            kind: r.get("kind"),
            git_ref: r.get("git_ref"),
            release_id: r.get("release_id"),
            project_id: r.get("project_id"),
            rollout_id: r.get("rollout_id"),
            expected_commit: r.get("expected_commit"),
        }
    }
}

/// Builds and signs the job for a claimed deployment, bound to `server_id` and to `binding`
/// (an agent certificate's fingerprint, or an SSH login key's).
pub async fn sign(
    pool: &deadpool_postgres::Pool,
    keys: &crate::field_crypto::FieldKeys,
    job: &Claimed,
    server_id: Uuid,
    binding: [u8; 32],
    key: &SigningKey,
) -> Result<SignedJob, String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let mut configs = deploy_configs(&client, std::slice::from_ref(job))
        .await
        .map_err(|e| crate::db::describe(&e))?;
    let p = configs
        .remove(&job.id)
        .ok_or_else(|| "the project no longer exists".to_owned())?;
    sign_with(&p, keys, job, server_id, binding, key)
}

/// The deploy configuration each job is built from, by
/// job id: a rollout's job takes the copy made when the rollout started, any other job its
/// project as it is now. Jobs of deleted projects get none (their claim fails), but for the
/// `forget_env` job their deletion queued.
pub async fn deploy_configs(
    client: &tokio_postgres::Client,
    jobs: &[Claimed],
) -> Result<std::collections::HashMap<Uuid, tokio_postgres::Row>, tokio_postgres::Error> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let rows = client
        .query(
            "SELECT d.id AS job_id, \
                    coalesce(r.repo_url, p.repo_url) AS repo_url, \
                    coalesce(r.deploy_path, p.deploy_path) AS deploy_path, \
                    coalesce(r.keep_releases, p.keep_releases) AS keep_releases, \
                    coalesce(r.shared_paths, p.shared_paths) AS shared_paths, \
                    coalesce(r.hooks, p.hooks) AS hooks, \
                    CASE WHEN r.repo_url IS NOT NULL THEN r.health_check ELSE p.health_check END AS health_check, \
                    coalesce(r.hook_timeout_secs, p.hook_timeout_secs) AS hook_timeout_secs, \
                    CASE WHEN r.repo_url IS NOT NULL THEN r.env_ciphertext ELSE p.env_ciphertext END AS env_ciphertext, \
                    p.id \
             FROM deployments d JOIN projects p ON p.id = d.project_id \
             LEFT JOIN rollouts r ON r.id = d.rollout_id \
             WHERE d.id = ANY($1) AND (p.deleted_at IS NULL OR d.kind = 'forget_env')",
            &[&ids],
        )
        .await?;
    Ok(rows.into_iter().map(|r| (r.get("job_id"), r)).collect())
}

/// Builds and signs a claimed job from its deploy configuration (a row of
/// [`deploy_configs`]).
pub fn sign_with(
    p: &tokio_postgres::Row,
    keys: &crate::field_crypto::FieldKeys,
    job: &Claimed,
    server_id: Uuid,
    binding: [u8; 32],
    key: &SigningKey,
) -> Result<SignedJob, String> {
    let deploy_path: String = p.get("deploy_path");
    let task = if job.kind == "rollback" {
        JobTask::Rollback(RollbackSpec {
            deploy_path,
            // A rollback's release id is the one chosen when it was queued, if any.
            to_release: job.release_id.clone(),
        })
    } else if job.kind == "forget_env" {
        JobTask::ForgetEnv(ForgetEnvSpec { deploy_path })
    } else {
        let env: Vec<(String, String)> = match p.get::<_, Option<&str>>("env_ciphertext") {
            Some(sealed) => {
                let plain = keys
                    .decrypt(sealed)
                    .map_err(|_| "the project's environment cannot be decrypted with the configured field keys".to_owned())?;
                let map: std::collections::BTreeMap<String, String> =
                    serde_json::from_slice(&plain).map_err(|e| e.to_string())?;
                map.into_iter().collect()
            }
            None => Vec::new(),
        };
        // A project whose hooks do not decode fails its job: deploying without the hooks it
        // asked for (a migration, a health step) would be worse than not deploying.
        let hooks: Hooks = serde_json::from_value(p.get("hooks")).map_err(|e| {
            format!(
                "the project's hooks cannot be read ({e}); fix them with PATCH /v1/projects/{{id}}"
            )
        })?;
        JobTask::Deploy(DeploySpec {
            repo_url: p.get("repo_url"),
            git_ref: job.git_ref.clone().unwrap_or_default(),
            release_id: job.release_id.clone().unwrap_or_default(),
            deploy_path,
            keep_releases: u32::try_from(p.get::<_, i32>("keep_releases")).unwrap_or(5),
            shared_paths: p.get("shared_paths"),
            hooks,
            health_check: p.get("health_check"),
            env,
            hook_timeout_secs: u32::try_from(p.get::<_, i32>("hook_timeout_secs")).unwrap_or(600),
            expected_commit: job.expected_commit.clone(),
        })
    };
    let now = Utc::now().timestamp();
    let payload = JobPayload {
        job_id: job.id,
        server_id,
        certificate_fingerprint: binding,
        sequence: u64::try_from(job.sequence).unwrap_or(0),
        not_before: now,
        expires_at: now + JOB_VALIDITY_SECS,
        task,
    };
    SignedJob::sign(&payload, key).map_err(|e| e.to_string())
}

/// Records the end of a deployment (only if it is still running: an end is final).
pub async fn finish(pool: &deadpool_postgres::Pool, id: Uuid, result: &JobResult) {
    let written = match pool.get().await {
        Ok(client) => record_ends(&client, &[(id, result)]).await,
        Err(e) => Err(e.to_string()),
    };
    if let Err(error) = written {
        tracing::error!(deployment = %id, %error, "recording a deployment's end");
    }
}

/// Records how deployments ended, in one statement; a deployment no longer running is left
/// as it is (an end is final).
pub async fn record_ends(
    client: &deadpool_postgres::Client,
    ends: &[(Uuid, &JobResult)],
) -> Result<u64, String> {
    let ids: Vec<Uuid> = ends.iter().map(|(id, _)| *id).collect();
    let statuses: Vec<&str> = ends
        .iter()
        .map(|(_, r)| if r.succeeded { "succeeded" } else { "failed" })
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
        .map_err(|e| crate::db::describe(&e))
}

/// Appends log lines to a deployment (up to [`MAX_LOG_LINES`]).
pub async fn store_lines(pool: &deadpool_postgres::Pool, id: Uuid, lines: &[LogLine]) {
    let Ok(client) = pool.get().await else {
        return;
    };
    let streams: Vec<i16> = lines.iter().map(|l| i16::from(l.stream)).collect();
    let texts: Vec<String> = lines.iter().map(|l| l.text.replace('\0', "")).collect();
    let result = client
        .execute(
            "INSERT INTO deployment_logs (deployment_id, stream, line) \
             SELECT $1, s, l FROM unnest($2::smallint[], $3::text[]) AS t(s, l) \
             WHERE (SELECT count(*) FROM deployment_logs WHERE deployment_id = $1) < $4",
            &[&id, &streams, &texts, &MAX_LOG_LINES],
        )
        .await;
    if let Err(e) = result {
        tracing::warn!(deployment = %id, error = %crate::db::describe(&e), "storing deploy log lines");
    }
}

/// Serves one job stream: a poll waits for a job, sends it and records what comes back; a
/// report is recorded. The order of messages is `sensei_shared::session::ControlJob`'s; a
/// message out of place resets the stream with the protocol-error code.
pub async fn serve_poll(
    ctx: &GatewayContext,
    server_id: Uuid,
    fingerprint: Fingerprint,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut recv = FrameReader::new(recv);
    let mut exchange = ControlJob::new();
    // The job sent on this stream, for the log.
    let mut sent: Option<Claimed> = None;
    loop {
        while let Some(action) = exchange.poll() {
            match action {
                ControlJobAction::Claim { .. } => {
                    let signal = ctx.hub.job_signal(server_id);
                    // A job is only ever claimed for, and handed to, a connection whose
                    // certificate is valid at that moment (the in-memory set: no database
                    // round trip).
                    let still_valid = || {
                        ctx.hub.certificates.status(&fingerprint)
                            == AgentCertStatus::Valid(server_id)
                    };
                    let (job, signed) = loop {
                        if !still_valid() {
                            return;
                        }
                        match ctx.batches.claim(server_id, *fingerprint.as_bytes()).await {
                            Ok(Some((job, Ok(_)))) if !still_valid() => {
                                // Revoked while the claim was in flight: the job never leaves.
                                ctx.batches.finish(job.id, certificate_revoked()).await;
                                return;
                            }
                            Ok(Some((job, Ok(signed)))) => break (job, signed),
                            Ok(Some((job, Err(reason)))) => {
                                ctx.batches
                                    .finish(job.id, JobResult::failed("dispatch", reason))
                                    .await;
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(%server_id, error = %e, "looking for queued jobs")
                            }
                        }
                        tokio::select! {
                            _ = signal.notified() => {}
                            _ = tokio::time::sleep(RECHECK) => {}
                        }
                    };
                    // Cannot be out of order: the machine asked for this claim.
                    let _ = exchange.claimed(job.id, signed);
                    sent = Some(job);
                }
                ControlJobAction::Send(message) => {
                    if write_frame(&mut send, &message).await.is_err() {
                        return;
                    }
                    if let (ControlMessage::Job(_), Some(job)) = (&message, &sent) {
                        tracing::info!(%server_id, deployment = %job.id, sequence = job.sequence, "job sent to the agent");
                    }
                }
                ControlJobAction::StoreLines { job_id, lines } => {
                    Box::pin(store_lines(&ctx.pool, job_id, &lines)).await;
                }
                ControlJobAction::Refused { job_id, reason } => {
                    tracing::warn!(%server_id, deployment = %job_id, %reason, "the agent refused a job");
                }
                ControlJobAction::Record { job_id, result } => {
                    ctx.batches.finish(job_id, result).await;
                    // Cannot be out of order: the machine asked for this record.
                    let _ = exchange.recorded();
                }
                ControlJobAction::RecordReport { job_id, result } => {
                    // A result from before a lost connection; whichever replica handed the
                    // job out, it is recorded if the job belongs to this server and is still
                    // open. Boxed, like the other database futures here: a waiting poll task
                    // stays small.
                    Box::pin(record_report(ctx, server_id, job_id, &result)).await;
                    let _ = exchange.recorded();
                }
                ControlJobAction::Finish => {
                    let _ = send.finish();
                    return;
                }
            }
        }
        match recv.next::<AgentMessage>().await {
            Ok(Some(message)) => {
                if let Err(e) = exchange.handle(message) {
                    tracing::info!(%server_id, reason = %e, "agent protocol error on a job stream");
                    let code = VarInt::from_u32(e.close_code());
                    let _ = send.reset(code);
                    let _ = recv.get_mut().stop(code);
                    return;
                }
            }
            // The stream ending or failing: the session's end marks a running job failed.
            Ok(None) | Err(_) => return,
        }
    }
}

async fn record_report(ctx: &GatewayContext, server_id: Uuid, job_id: Uuid, result: &JobResult) {
    let open = match ctx.pool.get().await {
        Ok(client) => client
            .query_opt(
                "SELECT 1 FROM deployments WHERE id = $1 AND server_id = $2 AND status = 'running'",
                &[&job_id, &server_id],
            )
            .await
            .ok()
            .flatten()
            .is_some(),
        Err(_) => false,
    };
    if open {
        tracing::info!(%server_id, deployment = %job_id, "recording a result reported after reconnecting");
        finish(&ctx.pool, job_id, result).await;
    }
}

/// Marks the jobs this replica handed to `server_id` and that are still running as failed:
/// their agent went away mid-deploy.
pub async fn fail_interrupted(ctx: &GatewayContext, server_id: Uuid) {
    let Ok(client) = ctx.pool.get().await else {
        return;
    };
    if let Err(e) = client
        .execute(
            "UPDATE deployments SET status = 'failed', error_step = 'run', \
             error_message = 'the agent disconnected during the deploy; current still points at a complete release', \
             finished_at = now() WHERE server_id = $1 AND status = 'running' AND dispatched_replica = $2",
            &[&server_id, &ctx.hub.replica_id],
        )
        .await
    {
        tracing::warn!(%server_id, error = %crate::db::describe(&e), "failing interrupted deployments");
    }
}

/// How long a replica may miss heartbeats before it counts as gone.
pub const REPLICA_SILENCE_SECS: i64 = 15;
/// How long a job handed out by a gone replica waits for its server to report, before it
/// fails. (An agent notices a dead replica within its 60 s idle timeout, then reconnects.)
pub const ORPHAN_GRACE_SECS: i64 = 180;

/// Records this replica as alive.
pub async fn heartbeat(pool: &deadpool_postgres::Pool, replica: Uuid) {
    if let Ok(client) = pool.get().await {
        let _ = client
            .execute(
                "INSERT INTO replicas (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&replica],
            )
            .await;
    }
}

/// A replica stopping cleanly says so.
pub async fn retire(pool: &deadpool_postgres::Pool, replica: Uuid) {
    if let Ok(client) = pool.get().await {
        let _ = client
            .execute("DELETE FROM replicas WHERE id = $1", &[&replica])
            .await;
    }
}

/// The result of a job whose server's certificate was revoked before it ran.
pub fn certificate_revoked() -> JobResult {
    JobResult::failed("dispatch", CERTIFICATE_REVOKED)
}

/// The reason a revocation gives the jobs it fails.
pub const CERTIFICATE_REVOKED: &str = "certificate revoked";

/// Fails queued deployments nobody collected in time: the server's agent is offline.
pub async fn expire_queued(pool: &deadpool_postgres::Pool) {
    let Ok(client) = pool.get().await else {
        return;
    };
    if let Err(e) = client
        .execute(
            "UPDATE deployments SET status = 'failed', error_step = 'dispatch', \
             error_message = 'agent offline: the server''s agent did not collect the job in time; the application keeps running', \
             finished_at = now() WHERE status = 'queued' AND expires_at <= now()",
            &[],
        )
        .await
    {
        tracing::warn!(error = %crate::db::describe(&e), "expiring queued deployments");
    }
    // Jobs handed out by a replica that is gone, whose server never reported a result.
    if let Err(e) = client
        .execute(
            "UPDATE deployments d SET status = 'failed', error_step = 'run', \
             error_message = 'the control plane replica running this deploy stopped and the server did not report a result', \
             finished_at = now() \
             WHERE d.status = 'running' AND d.started_at < now() - make_interval(secs => $1) \
             AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = d.dispatched_replica \
                             AND r.heartbeat_at > now() - make_interval(secs => $2))",
            &[&(ORPHAN_GRACE_SECS as f64), &(REPLICA_SILENCE_SECS as f64)],
        )
        .await
    {
        tracing::warn!(error = %crate::db::describe(&e), "failing orphaned deployments");
    }
}
