//! Rotating the job-signing key (`sensei-control-plane job-key rotate`, then `job-key
//! retire`), the way the CA rotates ([`super::ca_rotation`]).
//!
//! The key is the `job-signing` row of `signing_keys`, sealed under the field key. A rotation
//! renames it `job-signing.previous` and writes a new `job-signing`, in one transaction. From
//! then on, until `job-key retire`:
//! - every agent watching its trust stream with its job keys named is sent the new public key
//!   endorsed by the previous key (`sensei_shared::job_key`), pins it, and watches again
//!   naming it: that is its acknowledgement, recorded per server
//!   (`servers.job_key_acknowledged`, [`record_acknowledged`]);
//! - a server's jobs are signed by the new key once its agent acknowledged it, by the
//!   previous key until then ([`JobKeyRing::for_server`]);
//! - a server enrolled meanwhile is given the new key, and counts as having acknowledged it:
//!   its jobs are signed by the key it pinned from its first one, and nothing changes for it
//!   at the retirement.
//!
//! `job-key retire` destroys the previous key; from then on every job is signed by the new
//! one, and an agent that never acknowledged it refuses them (it must enroll again). It
//! refuses while a connected agent has not acknowledged, unless forced. Both steps are
//! audited and told to every replica with a `NOTIFY` on the agent-certificate channel.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use ed25519_dalek::SigningKey;
use sensei_shared::backoff::Backoff;
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use super::ca_rotation::LaggingServer;
use super::{cert_events, AgentHub};
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::job_signing::{self, JobKeyRing, JobKeys, NAME, PREVIOUS};
use crate::secrets::pki::PkiError;

/// Why a rotation step was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobKeyRotationError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "a job-key rotation is already under way (the key {0} still signs for agents that have \
         not acknowledged the new one): finish it with `job-key retire` first"
    )]
    AlreadyRotating(String),
    #[error("no job-key rotation is under way: nothing to retire")]
    NotRotating,
    #[error(
        "{} connected agent(s) have not acknowledged the new job-signing key: {}. Wait until \
         they did (`job-key status`), or retire with --force: they will refuse every job until \
         they are enrolled again",
        .0.len(),
        .0.iter().map(|s| format!("{} ({})", s.name, s.id)).collect::<Vec<_>>().join(", ")
    )]
    StillConnected(Vec<LaggingServer>),
}

impl From<tokio_postgres::Error> for JobKeyRotationError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pki(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for JobKeyRotationError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Pki(e.into())
    }
}

/// The public key of `key`, as operators see it (hex).
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().as_bytes())
}

/// The current and the previous key's rows (name, public key), locked: two rotations (or a
/// rotation and a retirement) never interleave.
async fn lock_keys(
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    tx.query(
        "SELECT name, public_key FROM signing_keys WHERE name IN ($1, $2) FOR UPDATE",
        &[&NAME, &PREVIOUS],
    )
    .await
}

/// What `job-key rotate` did.
#[derive(Debug)]
pub struct Rotated {
    pub previous: String,
    pub current: String,
}

/// Starts a rotation: the current key becomes the previous one, a new key is made.
pub async fn rotate(pool: &Pool, keys: &FieldKeys) -> Result<Rotated, JobKeyRotationError> {
    // The key exists (a control plane that never started has none yet), and the audit chain
    // key these field keys open is loaded.
    let old = job_signing::load_or_create(pool, keys).await?;
    audit::keys::load(pool, keys)
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = lock_keys(&tx).await?;
    if let Some(row) = rows.iter().find(|r| r.get::<_, &str>(0) == PREVIOUS) {
        return Err(JobKeyRotationError::AlreadyRotating(hex::encode(
            row.get::<_, &[u8]>(1),
        )));
    }
    let new = SigningKey::generate(&mut rand::rngs::OsRng);
    tx.execute(
        "UPDATE signing_keys SET name = $1 WHERE name = $2",
        &[&PREVIOUS, &NAME],
    )
    .await?;
    tx.execute(
        "INSERT INTO signing_keys (name, public_key, private_key_ciphertext) VALUES ($1, $2, $3)",
        &[
            &NAME,
            &new.verifying_key().to_bytes().as_slice(),
            &keys.encrypt(&new.to_bytes()),
        ],
    )
    .await?;
    cert_events::notify_job_key_changed(&tx).await?;
    let (previous, current) = (public_hex(&old), public_hex(&new));
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "job_key.rotated",
            target: None,
            outcome: Outcome::Success,
            metadata: json!({"previous_key": previous, "new_key": current}),
        },
    )
    .await
    .map_err(|e| PkiError::Db(e.to_string()))?;
    tx.commit().await?;
    Ok(Rotated { previous, current })
}

/// Agent servers (not deleted, with a certificate not revoked) whose agent has not
/// acknowledged the job-signing key `current`: during a rotation, the ones whose jobs are
/// still signed by the previous key; after it, the ones that must enroll again.
pub async fn servers_on_old_job_key(
    client: &impl tokio_postgres::GenericClient,
    current: &[u8; 32],
    account: Option<Uuid>,
) -> Result<Vec<LaggingServer>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT s.id, s.account_id, s.name, s.connected_replica IS NOT NULL AS connected \
                 FROM servers s WHERE {} AND ($2::uuid IS NULL OR s.account_id = $2) \
                 ORDER BY s.name, s.id",
                OLD_JOB_KEY_SQL.replace("$KEY", "$1")
            ),
            &[&current.as_slice(), &account],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| LaggingServer {
            id: row.get(0),
            account_id: row.get(1),
            name: row.get(2),
            connected: row.get(3),
        })
        .collect())
}

/// The condition on `servers s` of [`servers_on_old_job_key`], with `$KEY` standing for the
/// parameter holding the current public key (the server list's filter uses it too).
pub const OLD_JOB_KEY_SQL: &str = "s.deleted_at IS NULL AND s.transport = 'agent' \
     AND s.job_key_acknowledged IS DISTINCT FROM $KEY \
     AND EXISTS (SELECT 1 FROM agent_certificates c \
                 WHERE c.server_id = s.id AND c.revoked_at IS NULL)";

/// Records that the agent of `server_id` named `current` on its watch, if the server had not
/// acknowledged it yet: its jobs are signed by it from now on. Called only during a rotation
/// (outside one, nothing depends on it), so an ordinary reconnection costs no write.
pub async fn record_acknowledged(
    pool: &Pool,
    server_id: Uuid,
    current: &[u8; 32],
) -> Result<bool, JobKeyRotationError> {
    let client = pool.get().await?;
    let changed = client
        .execute(
            "UPDATE servers SET job_key_acknowledged = $2 \
             WHERE id = $1 AND job_key_acknowledged IS DISTINCT FROM $2",
            &[&server_id, &current.as_slice()],
        )
        .await?;
    Ok(changed > 0)
}

/// What `job-key retire` did.
#[derive(Debug)]
pub struct Retired {
    pub retired: String,
    pub current: String,
    /// Agents that never acknowledged the current key: they must enroll again.
    pub stranded: Vec<LaggingServer>,
}

/// Ends a rotation: the previous key is destroyed, every job is signed by the current one.
/// Refused while a connected agent has not acknowledged it, unless `force`.
pub async fn retire(
    pool: &Pool,
    keys: &FieldKeys,
    force: bool,
) -> Result<Retired, JobKeyRotationError> {
    audit::keys::load(pool, keys)
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = lock_keys(&tx).await?;
    let public_of = |name: &str| -> Option<[u8; 32]> {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .and_then(|r| <[u8; 32]>::try_from(r.get::<_, &[u8]>(1)).ok())
    };
    let (Some(previous), Some(current)) = (public_of(PREVIOUS), public_of(NAME)) else {
        return Err(JobKeyRotationError::NotRotating);
    };
    let stranded = servers_on_old_job_key(&*tx, &current, None).await?;
    let connected: Vec<LaggingServer> = stranded.iter().filter(|s| s.connected).cloned().collect();
    if !connected.is_empty() && !force {
        return Err(JobKeyRotationError::StillConnected(connected));
    }
    tx.execute("DELETE FROM signing_keys WHERE name = $1", &[&PREVIOUS])
        .await?;
    cert_events::notify_job_key_changed(&tx).await?;
    let (retired, current) = (hex::encode(previous), hex::encode(current));
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "job_key.retired",
            target: None,
            outcome: Outcome::Success,
            metadata: json!({
                "retired_key": retired,
                "current_key": current,
                "forced": force,
                "servers_to_enroll_again": stranded.len(),
                "connected_not_acknowledged": connected.len(),
            }),
        },
    )
    .await
    .map_err(|e| PkiError::Db(e.to_string()))?;
    // Each account learns which of its servers must enroll again, in its own chain.
    for server in &stranded {
        audit::append(
            &tx,
            keys.audit_keys(),
            &AuditEvent {
                account_id: Some(server.account_id),
                actor: Actor::System,
                client_ip: None,
                user_agent: None,
                action: "agent.job_key_retired",
                target: Some(("server", server.id)),
                outcome: Outcome::Success,
                metadata: json!({"retired_key": retired, "connected": server.connected}),
            },
        )
        .await
        .map_err(|e| PkiError::Db(e.to_string()))?;
    }
    tx.commit().await?;
    Ok(Retired {
        retired,
        current,
        stranded,
    })
}

/// Reloads the job-signing keys each time the hub hears they changed, until `shutdown`. A
/// reload that fails is tried again (backoff from 0.25 s to 30 s) until it succeeds: no
/// further notification may come, and a replica left on the old keys would sign with a key
/// that agents drop once the rotation is retired.
pub async fn follow(
    job_keys: Arc<JobKeys>,
    hub: Arc<AgentHub>,
    pool: Pool,
    keys: Arc<FieldKeys>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::select! {
            () = hub.job_key_changed.notified() => {}
            _ = shutdown.changed() => return,
        }
        while let Err(e) = job_keys.reload(&pool, &keys).await {
            let wait = backoff.next_delay(rand::random());
            tracing::error!(error = %e, retry_in = ?wait, "reloading the job-signing keys failed; still using the previous ones");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        backoff.reset();
    }
}

/// The ring as `job-key status` shows it.
pub async fn load(pool: &Pool, keys: &FieldKeys) -> Result<JobKeyRing, PkiError> {
    job_signing::load_ring(pool, keys).await
}
