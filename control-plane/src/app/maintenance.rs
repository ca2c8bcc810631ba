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
    /// Sign-in failures, and signup and enrollment attempts, past their windows.
    pub login_failures: u64,
    /// Sessions, enrollment tokens, invitations and password resets past their use.
    pub spent_credentials: u64,
}

/// One round of housekeeping now.
pub async fn run_once(
    pool: &Pool,
    keys: &crate::secrets::field_crypto::FieldKeys,
) -> anyhow::Result<Report> {
    let audit = crate::audit::expire(pool, keys.audit_keys()).await?;
    let client = pool.get().await?;
    let log_lines = crate::jobs::record::expire_logs(&client).await?;
    let idempotency_keys = crate::api::idempotency::prune(&client).await?;
    let login_failures = crate::identity::login_throttle::prune(&**client).await?
        + crate::identity::admission::prune(&**client).await?;
    let spent_credentials = prune_spent_credentials(&client).await?;
    Ok(Report {
        audit_rows: audit.rows,
        log_lines,
        idempotency_keys,
        login_failures,
        spent_credentials,
    })
}

/// Spent credentials kept this long after they stopped working (for the sessions list and
/// investigations), then deleted.
const SPENT_KEPT_DAYS: i32 = 30;

/// Deletes sessions, enrollment tokens, invitations and password resets that expired, were
/// used or were revoked more than [`SPENT_KEPT_DAYS`] ago. Only their hashes were stored.
async fn prune_spent_credentials(
    client: &tokio_postgres::Client,
) -> Result<u64, tokio_postgres::Error> {
    // A session ends when revoked or after its idle limit without use.
    let idle = i32::try_from(crate::identity::auth::SESSION_IDLE_DAYS).unwrap_or(i32::MAX);
    let mut removed = client
        .execute(
            "DELETE FROM sessions WHERE coalesce(revoked_at, last_seen_at + make_interval(days => $2)) \
             < now() - make_interval(days => $1)",
            &[&SPENT_KEPT_DAYS, &idle],
        )
        .await?;
    for sql in [
        "DELETE FROM enrollment_tokens WHERE coalesce(used_at, expires_at) < now() - make_interval(days => $1)",
        "DELETE FROM invitations WHERE coalesce(accepted_at, revoked_at, expires_at) < now() - make_interval(days => $1)",
        "DELETE FROM password_resets WHERE coalesce(used_at, expires_at) < now() - make_interval(days => $1)",
    ] {
        removed += client.execute(sql, &[&SPENT_KEPT_DAYS]).await?;
    }
    Ok(removed)
}

/// Runs housekeeping a minute after start and then every [`INTERVAL`], until shutdown.
pub async fn run(
    pool: Pool,
    keys: std::sync::Arc<crate::secrets::field_crypto::FieldKeys>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = std::time::Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        match run_once(&pool, &keys).await {
            Ok(report) if report != Report::default() => {
                tracing::info!(?report, "housekeeping removed expired rows");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "housekeeping failed; retrying next hour"),
        }
        wait = INTERVAL;
    }
}
