//! A claimed job becomes a signed envelope: its task built from the deploy configuration it
//! must use (a rollout's copy, or its project as it is now), bound to its server and to the
//! credential that will receive it (an agent certificate's fingerprint or an SSH login key's),
//! valid for a few minutes, and signed with the job-signing key.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use ed25519_dalek::SigningKey;
use sensei_shared::job::{
    DeploySpec, ForgetEnvSpec, Hooks, JobPayload, JobTask, RollbackSpec, SignedJob,
    UpgradeAgentSpec,
};
use uuid::Uuid;

use super::claim::Claimed;
use super::JobKind;
use crate::secrets::field_crypto::FieldKeys;

/// How long a signed job stays valid for its server after it is sent.
const JOB_VALIDITY_SECS: i64 = 300;

/// Why a claimed job could not be signed; the message becomes the job's error (step
/// `dispatch`).
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The project was deleted between queueing and claiming.
    #[error("the project no longer exists")]
    ProjectGone,
    /// The sealed environment does not open with the configured keys.
    #[error("the project's environment cannot be decrypted with the configured field keys")]
    EnvironmentSealed,
    /// The environment opened but is not the JSON map Sensei writes.
    #[error("the project's environment is unreadable: {0}")]
    EnvironmentUnreadable(String),
    /// Deploying without the hooks the project asked for (a migration, a health step) would
    /// be worse than not deploying.
    #[error("the project's hooks cannot be read ({0}); fix them with PATCH /v1/projects/{{id}}")]
    HooksUnreadable(String),
    #[error("the job cannot be encoded: {0}")]
    Envelope(String),
    #[error("{0}")]
    Database(String),
}

/// Where and what a job deploys: the rollout's copy for a rollout's job, the project as it
/// is now for any other.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    repo_url: String,
    deploy_path: String,
    keep_releases: i32,
    shared_paths: Vec<String>,
    hooks: serde_json::Value,
    health_check: Option<String>,
    hook_timeout_secs: i32,
    env_ciphertext: Option<String>,
}

impl DeployConfig {
    fn from_row(r: &tokio_postgres::Row) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            repo_url: r.try_get("repo_url")?,
            deploy_path: r.try_get("deploy_path")?,
            keep_releases: r.try_get("keep_releases")?,
            shared_paths: r.try_get("shared_paths")?,
            hooks: r.try_get("hooks")?,
            health_check: r.try_get("health_check")?,
            hook_timeout_secs: r.try_get("hook_timeout_secs")?,
            env_ciphertext: r.try_get("env_ciphertext")?,
        })
    }
}

/// The deploy configuration of each job, by job id. Jobs of deleted projects get none (their
/// claim fails), but for the `forget_env` job their deletion queued.
pub async fn deploy_configs(
    client: &impl tokio_postgres::GenericClient,
    jobs: &[&Claimed],
) -> Result<HashMap<Uuid, DeployConfig>, tokio_postgres::Error> {
    if jobs.is_empty() {
        return Ok(HashMap::new());
    }
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
                    CASE WHEN r.repo_url IS NOT NULL THEN r.env_ciphertext ELSE p.env_ciphertext END AS env_ciphertext \
             FROM deployments d JOIN projects p ON p.id = d.project_id \
             LEFT JOIN rollouts r ON r.id = d.rollout_id \
             WHERE d.id = ANY($1) AND (p.deleted_at IS NULL OR d.kind = 'forget_env')",
            &[&ids],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("job_id")?, DeployConfig::from_row(r)?)))
        .collect()
}

/// Builds and signs one claimed job, reading its deploy configuration first (the SSH
/// runner's path; agents' jobs are signed in batches with [`sign_with`]).
pub async fn sign(
    client: &tokio_postgres::Client,
    keys: &FieldKeys,
    job: &Claimed,
    binding: [u8; 32],
    key: &SigningKey,
) -> Result<SignedJob, SignError> {
    let mut configs = deploy_configs(client, &[job])
        .await
        .map_err(|e| SignError::Database(crate::store::db::describe(&e)))?;
    sign_with(configs.remove(&job.id).as_ref(), keys, job, binding, key)
}

/// Builds and signs a claimed job from its deploy configuration (none for an agent
/// upgrade, which deploys nothing; none for any other job: its project is gone).
pub fn sign_with(
    config: Option<&DeployConfig>,
    keys: &FieldKeys,
    job: &Claimed,
    binding: [u8; 32],
    key: &SigningKey,
) -> Result<SignedJob, SignError> {
    let task = match (job.kind, config) {
        (JobKind::UpgradeAgent, _) => JobTask::UpgradeAgent(UpgradeAgentSpec {
            // Required by a CHECK constraint for this kind.
            version: job.upgrade_version.clone().unwrap_or_default(),
        }),
        (_, None) => return Err(SignError::ProjectGone),
        (kind, Some(config)) => deploy_task(kind, config, keys, job)?,
    };
    let now = Utc::now().timestamp();
    let payload = JobPayload {
        job_id: job.id,
        server_id: job.server_id,
        certificate_fingerprint: binding,
        // Sequences start at 1 and only grow (`servers.job_sequence + 1`).
        sequence: u64::try_from(job.sequence).unwrap_or(0),
        not_before: now,
        expires_at: now + JOB_VALIDITY_SECS,
        task,
    };
    SignedJob::sign(&payload, key).map_err(|e| SignError::Envelope(e.to_string()))
}

/// The task of a job that works in a project's deploy directory.
fn deploy_task(
    kind: JobKind,
    config: &DeployConfig,
    keys: &FieldKeys,
    job: &Claimed,
) -> Result<JobTask, SignError> {
    let deploy_path = config.deploy_path.clone();
    Ok(match kind {
        JobKind::Rollback => JobTask::Rollback(RollbackSpec {
            deploy_path,
            // A rollback's release id is the one chosen when it was queued, if any.
            to_release: job.release_id.clone(),
        }),
        JobKind::ForgetEnv => JobTask::ForgetEnv(ForgetEnvSpec { deploy_path }),
        // An upgrade never gets here: `sign_with` builds it without a configuration.
        JobKind::Deploy | JobKind::UpgradeAgent => {
            let env: Vec<(String, String)> = match &config.env_ciphertext {
                Some(sealed) => {
                    let plain = keys
                        .decrypt(sealed)
                        .map_err(|_| SignError::EnvironmentSealed)?;
                    let map: BTreeMap<String, String> = serde_json::from_slice(&plain)
                        .map_err(|e| SignError::EnvironmentUnreadable(e.to_string()))?;
                    map.into_iter().collect()
                }
                None => Vec::new(),
            };
            let hooks: Hooks = serde_json::from_value(config.hooks.clone())
                .map_err(|e| SignError::HooksUnreadable(e.to_string()))?;
            JobTask::Deploy(DeploySpec {
                repo_url: config.repo_url.clone(),
                git_ref: job.git_ref.clone().unwrap_or_default(),
                release_id: job.release_id.clone().unwrap_or_default(),
                deploy_path,
                // Both are bounded by CHECK constraints (1..=100, 1..=86400).
                keep_releases: u32::try_from(config.keep_releases).unwrap_or(5),
                shared_paths: config.shared_paths.clone(),
                hooks,
                health_check: config.health_check.clone(),
                env,
                hook_timeout_secs: u32::try_from(config.hook_timeout_secs).unwrap_or(600),
                expected_commit: job.expected_commit.clone(),
            })
        }
    })
}
