//! The hourly housekeeping every replica runs: audit retention, deployment-log retention and
//! forgetting old idempotency keys. Each step is one idempotent statement (or the audit
//! expiry's own locking), so replicas running it at the same time do no harm.

use deadpool_postgres::Pool;
use tokio::sync::watch;

/// How often the housekeeping runs.
pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(3600);

/// What one round removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub audit_rows: u64,
    pub log_lines: u64,
    pub idempotency_keys: u64,
}

/// One round of housekeeping now.
pub async fn run_once(pool: &Pool) -> anyhow::Result<Report> {
    let audit = crate::audit::expire(pool).await?;
    let client = pool.get().await?;
    let log_lines = expire_deploy_logs(&client).await?;
    let idempotency_keys = crate::api::idempotency::prune(&client).await?;
    Ok(Report {
        audit_rows: audit.rows,
        log_lines,
        idempotency_keys,
    })
}

/// Deletes deployment log lines older than their account's `deploy_log_retention_days`.
/// The deployments themselves (status, commit, release, timings) are kept.
pub async fn expire_deploy_logs(
    client: &tokio_postgres::Client,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM deployment_logs l USING deployments d, accounts a \
             WHERE l.deployment_id = d.id AND d.account_id = a.id \
             AND l.at < now() - make_interval(days => a.deploy_log_retention_days)",
            &[],
        )
        .await
}

/// Runs housekeeping a minute after start and then every [`INTERVAL`], until shutdown.
pub async fn run(pool: Pool, mut shutdown: watch::Receiver<bool>) {
    let mut wait = std::time::Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        match run_once(&pool).await {
            Ok(report) if report != Report::default() => {
                tracing::info!(?report, "housekeeping removed expired rows");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "housekeeping failed; retrying next hour"),
        }
        wait = INTERVAL;
    }
}
