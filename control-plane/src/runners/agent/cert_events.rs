//! Keeping every replica's [`AgentHub`] in step: certificate changes are committed to
//! PostgreSQL together with a `NOTIFY`, and every replica LISTENs and applies them. Job rows
//! and certificate rows stay the truth; the notifications only say "look now".

use std::sync::Arc;

use deadpool_postgres::Pool;
use sensei_certs::Fingerprint;
use tokio::sync::watch;
use uuid::Uuid;

use super::AgentHub;
use crate::jobs::wake::JOB_CHANNEL;

/// The PostgreSQL channel of certificate changes.
pub const CHANNEL: &str = "sensei_agent_certs";

/// Loads every valid and revoked certificate into the hub (at start, and after the
/// notification connection was lost, since notifications may have been missed).
pub async fn load_all(pool: &Pool, hub: &AgentHub) -> Result<(), tokio_postgres::Error> {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot load agent certificates");
            return Ok(());
        }
    };
    let rows = client
        .query(
            "SELECT c.fingerprint, c.server_id, \
                    c.revoked_at IS NULL AND c.retired_at IS NULL AND c.not_after > now() \
                      AND s.deleted_at IS NULL AS valid, \
                    c.retired_at IS NOT NULL AND s.deleted_at IS NULL AS retired, \
                    c.renewed_from IS NOT NULL AND c.first_connected_at IS NULL AS pending, \
                    extract(epoch FROM c.not_after)::bigint AS not_after \
             FROM agent_certificates c JOIN servers s ON s.id = c.server_id",
            &[],
        )
        .await?;
    for row in rows {
        let Some(fp) = fingerprint(row.get::<_, &[u8]>("fingerprint")) else {
            continue;
        };
        if row.get::<_, bool>("valid") && row.get::<_, bool>("pending") {
            hub.renewed(fp, row.get("server_id"), row.get("not_after"));
        } else if row.get::<_, bool>("valid") {
            hub.certificates
                .allow(fp, row.get("server_id"), row.get("not_after"));
        } else if row.get::<_, bool>("retired") {
            hub.retire(&[fp]);
        } else {
            hub.revoke(&[fp]);
        }
    }
    Ok(())
}

fn fingerprint(bytes: &[u8]) -> Option<Fingerprint> {
    Fingerprint::from_raw(bytes)
}

/// Queues, inside the caller's transaction, the notification that a certificate is valid
/// until `not_after` (Unix seconds).
pub async fn notify_allowed(
    tx: &tokio_postgres::Transaction<'_>,
    fp: &Fingerprint,
    server_id: Uuid,
    not_after: i64,
) -> Result<(), tokio_postgres::Error> {
    let payload = format!(
        "allow:{}:{server_id}:{not_after}",
        hex::encode(fp.as_bytes())
    );
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

/// Queues, inside the caller's transaction, the notification that a renewed certificate is
/// valid until `not_after` (Unix seconds) and pending until its agent connects with it.
pub async fn notify_renewed(
    tx: &tokio_postgres::Transaction<'_>,
    fp: &Fingerprint,
    server_id: Uuid,
    not_after: i64,
) -> Result<(), tokio_postgres::Error> {
    let payload = format!(
        "renewed:{}:{server_id}:{not_after}",
        hex::encode(fp.as_bytes())
    );
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

/// Queues, inside the caller's transaction, the notification that a certificate is retired.
pub async fn notify_retired(
    tx: &tokio_postgres::Transaction<'_>,
    fp: &Fingerprint,
) -> Result<(), tokio_postgres::Error> {
    let payload = format!("retire:{}", hex::encode(fp.as_bytes()));
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

/// Queues, inside the caller's transaction, the notification that a certificate is revoked.
pub async fn notify_revoked(
    tx: &tokio_postgres::Transaction<'_>,
    fp: &Fingerprint,
) -> Result<(), tokio_postgres::Error> {
    let payload = format!("revoke:{}", hex::encode(fp.as_bytes()));
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await?;
    Ok(())
}

/// Queues, inside the caller's transaction, the notification that the CAs changed (a
/// rotation started or was retired): every replica reloads them, and the certificates.
pub async fn notify_ca_changed(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_notify($1, 'ca')", &[&CHANNEL])
        .await?;
    Ok(())
}

/// Queues, inside the caller's transaction, the notification that the job-signing keys
/// changed (a rotation started or was retired): every replica reloads them.
pub async fn notify_job_key_changed(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_notify($1, 'job_key')", &[&CHANNEL])
        .await?;
    Ok(())
}

/// Applies one notification payload to the hub.
pub fn apply(hub: &AgentHub, payload: &str) {
    let mut parts = payload.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("allow"), Some(fp), Some(id), Some(not_after)) => {
            let fp = hex::decode(fp).ok().and_then(|b| fingerprint(&b));
            match (fp, id.parse::<Uuid>(), not_after.parse::<i64>()) {
                (Some(fp), Ok(id), Ok(not_after)) => hub.certificates.allow(fp, id, not_after),
                _ => tracing::warn!(payload, "malformed agent certificate notification"),
            }
        }
        (Some("renewed"), Some(fp), Some(id), Some(not_after)) => {
            let fp = hex::decode(fp).ok().and_then(|b| fingerprint(&b));
            match (fp, id.parse::<Uuid>(), not_after.parse::<i64>()) {
                (Some(fp), Ok(id), Ok(not_after)) => hub.renewed(fp, id, not_after),
                _ => tracing::warn!(payload, "malformed agent certificate notification"),
            }
        }
        (Some("revoke"), Some(fp), None, None) => {
            if let Some(fp) = hex::decode(fp).ok().and_then(|b| fingerprint(&b)) {
                hub.revoke(&[fp]);
            }
        }
        (Some("retire"), Some(fp), None, None) => {
            if let Some(fp) = hex::decode(fp).ok().and_then(|b| fingerprint(&b)) {
                hub.retire(&[fp]);
            }
        }
        (Some("ca"), None, None, None) => hub.ca_changed.notify_one(),
        (Some("job_key"), None, None, None) => hub.job_key_changed.notify_one(),
        _ => tracing::warn!(payload, "unknown agent certificate notification"),
    }
}

/// Listens on [`CHANNEL`] and on the jobs' [`JOB_CHANNEL`] until `shutdown`, reconnecting (and reloading
/// the certificates) when the connection drops. Job polls re-check the table on their own
/// every few seconds, so a wake-up missed during a reconnect only delays a job.
pub async fn listen(
    pool: Pool,
    database_url: String,
    hub: Arc<AgentHub>,
    shutdown: watch::Receiver<bool>,
) {
    let reload = || {
        let (pool, hub) = (pool.clone(), hub.clone());
        async move {
            // Anything committed while we were not listening is in the tables.
            if let Err(e) = load_all(&pool, &hub).await {
                tracing::warn!(error = %e, "reloading agent certificates failed");
            }
            // Jobs queued while nobody was listening were announced to no one.
            hub.wakes.wake_all();
            // Nor was a CA or job-key rotation.
            hub.ca_changed.notify_one();
            hub.job_key_changed.notify_one();
        }
    };
    crate::store::db::listen_until_shutdown(
        &database_url,
        &[CHANNEL, JOB_CHANNEL],
        "agent certificates and jobs",
        shutdown,
        reload,
        |channel, payload| {
            if channel == JOB_CHANNEL {
                hub.wakes.apply(payload);
            } else {
                apply(&hub, payload);
            }
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensei_certs::AgentCertStatus;

    #[test]
    fn notifications_allow_and_revoke_and_garbage_changes_nothing() {
        let hub = AgentHub::new();
        let fp = Fingerprint::of_der(b"agent certificate");
        let id = Uuid::new_v4();
        let far = i64::MAX / 2;
        apply(
            &hub,
            &format!("allow:{}:{id}:{far}", hex::encode(fp.as_bytes())),
        );
        assert_eq!(hub.certificates.status(&fp), AgentCertStatus::Valid(id));
        for garbage in [
            "",
            "allow",
            "allow:zz:not-a-uuid:1",
            &format!("allow:{}:{id}", hex::encode(fp.as_bytes())),
            &format!("allow:{}:{id}:soon", hex::encode(fp.as_bytes())),
            "revoke:nothex",
            &format!("revoke:{}:extra", hex::encode(fp.as_bytes())),
            "something:else",
        ] {
            apply(&hub, garbage);
            assert_eq!(
                hub.certificates.status(&fp),
                AgentCertStatus::Valid(id),
                "{garbage}"
            );
        }
        // A renewal: valid and pending; its predecessor retired, which is not revoked.
        let renewed = Fingerprint::of_der(b"renewed");
        apply(
            &hub,
            &format!("renewed:{}:{id}:{far}", hex::encode(renewed.as_bytes())),
        );
        assert_eq!(
            hub.certificates.status(&renewed),
            AgentCertStatus::Valid(id)
        );
        assert!(hub.take_pending(&renewed));
        assert!(!hub.take_pending(&fp));
        apply(&hub, &format!("retire:{}", hex::encode(fp.as_bytes())));
        assert_eq!(hub.certificates.status(&fp), AgentCertStatus::Retired);
        apply(&hub, "retire:nothex");
        apply(&hub, &format!("revoke:{}", hex::encode(fp.as_bytes())));
        assert_eq!(hub.certificates.status(&fp), AgentCertStatus::Revoked);
        // An allow that is already past its expiry is not valid.
        let other = Fingerprint::of_der(b"expired");
        apply(
            &hub,
            &format!("allow:{}:{id}:1", hex::encode(other.as_bytes())),
        );
        assert_eq!(hub.certificates.status(&other), AgentCertStatus::Expired);
    }
}
