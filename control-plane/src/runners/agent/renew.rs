//! Certificate renewal over the live connection: the agent sends a CSR for a key it has just
//! made; the control plane checks it against the certificate the session uses (the CSR names
//! only the server, and the key is new), signs it, records the new certificate as *pending*
//! and tells every replica. The old certificate stays valid until the agent first connects
//! with the new one ([`activate`]); then it is *retired* (not revoked). A crash anywhere in
//! between leaves the agent with a certificate that works.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sensei_certs::{AgentCertStatus, Fingerprint, RenewalCsrError};
use sensei_shared::protocol::RenewalRefusal;
use serde_json::json;
use uuid::Uuid;

use super::cert_events;
use super::gateway::GatewayContext;
use super::session::SessionLink;
use crate::audit::{self, Actor, AuditEvent, Outcome};

/// How long a pending renewal holds back another one, and the window of the per-server
/// attempt limit: a thirtieth of the certificate lifetime, between 1 s and an hour (an hour
/// with 90-day certificates). Past it, a renewal the agent never used (its answer was lost)
/// is replaced by the next.
pub fn cooldown(lifetime: Duration) -> Duration {
    (lifetime / 30).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The validity of a certificate issued now: backdated a little for replicas whose clocks lag
/// (five minutes, or a tenth of a short lifetime).
pub fn validity(lifetime: Duration) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    let back = (lifetime / 10).min(Duration::from_secs(300));
    (now - back, now + lifetime)
}

/// Why a renewal was refused, for the audit row (the agent gets the [`RenewalRefusal`]).
struct Refused {
    reason: RenewalRefusal,
    /// Audited under this account once the server is known.
    account_id: Option<Uuid>,
}

fn refused(reason: RenewalRefusal) -> Refused {
    Refused {
        reason,
        account_id: None,
    }
}

/// Renews the certificate of the session `link` of `server_id` with `csr_der` (at most
/// `MAX_CSR_LEN` bytes: the session machine refused larger ones unread). Returns the new
/// certificate, PEM.
pub async fn process(
    ctx: &GatewayContext,
    server_id: Uuid,
    link: &SessionLink,
    csr_der: &[u8],
) -> Result<String, RenewalRefusal> {
    let window = cooldown(ctx.agent_cert_lifetime);
    if !ctx.hub.admit_renewal(server_id, window) {
        tracing::info!(%server_id, "renewal refused: too many attempts");
        return Err(RenewalRefusal::TooSoon);
    }
    match renew(ctx, server_id, link, csr_der, window).await {
        Ok(renewed) => Ok(renewed),
        Err(refusal) => {
            tracing::info!(%server_id, reason = %refusal.reason, "certificate renewal refused");
            if let Some(account_id) = refusal.account_id {
                if let Err(e) =
                    audit_refusal(ctx, server_id, account_id, link, refusal.reason).await
                {
                    tracing::error!(error = %e, "could not audit a refused renewal");
                }
            }
            Err(refusal.reason)
        }
    }
}

async fn renew(
    ctx: &GatewayContext,
    server_id: Uuid,
    link: &SessionLink,
    csr_der: &[u8],
    window: Duration,
) -> Result<String, Refused> {
    let unavailable = |e: tokio_postgres::Error| {
        tracing::error!(error = %crate::store::db::describe(&e), "certificate renewal");
        refused(RenewalRefusal::Unavailable)
    };
    // This replica's view first: a certificate it knows revoked never gets further.
    match ctx.hub.certificates.status(&link.fingerprint) {
        AgentCertStatus::Valid(id) if id == server_id => {}
        AgentCertStatus::Expired | AgentCertStatus::Retired => {
            return Err(refused(RenewalRefusal::Expired))
        }
        AgentCertStatus::Valid(_) | AgentCertStatus::Revoked | AgentCertStatus::Unknown => {
            return Err(refused(RenewalRefusal::Revoked))
        }
    }
    let mut client = ctx
        .pool
        .get()
        .await
        .map_err(|_| refused(RenewalRefusal::Unavailable))?;
    let tx = client.transaction().await.map_err(unavailable)?;
    // The server's row is the lock every change of its certificates takes (enrollment,
    // revocation, deletion), so none of them can interleave with this.
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(unavailable)?;
    let server = tx
        .query_opt(
            "SELECT account_id, deleted_at IS NOT NULL AS deleted FROM servers \
             WHERE id = $1 FOR UPDATE",
            &[&server_id],
        )
        .await
        .map_err(unavailable)?
        .ok_or_else(|| refused(RenewalRefusal::Revoked))?;
    let account_id: Uuid = server.get("account_id");
    let scoped = |reason| Refused {
        reason,
        account_id: Some(account_id),
    };
    // PostgreSQL is the truth: a revocation this replica has not heard of yet counts.
    let current = tx
        .query_opt(
            "SELECT serial, revoked_at IS NOT NULL AS revoked, \
                    retired_at IS NOT NULL OR not_after <= now() AS expired \
             FROM agent_certificates WHERE fingerprint = $1 AND server_id = $2",
            &[&link.fingerprint.as_bytes().as_slice(), &server_id],
        )
        .await
        .map_err(unavailable)?;
    let current_serial: String = match current {
        None => return Err(scoped(RenewalRefusal::Revoked)),
        Some(row) if server.get::<_, bool>("deleted") || row.get::<_, bool>("revoked") => {
            return Err(scoped(RenewalRefusal::Revoked))
        }
        Some(row) if row.get::<_, bool>("expired") => return Err(scoped(RenewalRefusal::Expired)),
        Some(row) => row.get("serial"),
    };
    sensei_certs::check_renewal_csr(csr_der, server_id, &link.certificate_der).map_err(|e| {
        scoped(match e {
            RenewalCsrError::WrongSubject => RenewalRefusal::WrongSubject,
            RenewalCsrError::KeyReused => RenewalRefusal::KeyReused,
            _ => RenewalRefusal::MalformedCsr,
        })
    })?;
    // The session's own certificate counts as connected with, whatever the registration's
    // bookkeeping got to: its predecessors are retired now.
    let retired = retire_predecessors(&tx, server_id, &link.fingerprint)
        .await
        .map_err(unavailable)?;
    // One pending renewal per server: a recent one holds this back; an older one (its agent
    // never connected with it: the answer was lost) is replaced.
    let pending = tx
        .query_opt(
            "SELECT fingerprint, issued_at > now() - make_interval(secs => $2) AS recent \
             FROM agent_certificates WHERE server_id = $1 AND renewed_from IS NOT NULL \
               AND first_connected_at IS NULL AND retired_at IS NULL AND revoked_at IS NULL",
            &[&server_id, &window.as_secs_f64()],
        )
        .await
        .map_err(unavailable)?;
    let mut superseded = Vec::new();
    if let Some(row) = pending {
        if row.get::<_, bool>("recent") {
            return Err(scoped(RenewalRefusal::TooSoon));
        }
        if let Some(fp) = Fingerprint::from_raw(row.get::<_, &[u8]>("fingerprint")) {
            tx.execute(
                "UPDATE agent_certificates SET retired_at = now() WHERE fingerprint = $1",
                &[&fp.as_bytes().as_slice()],
            )
            .await
            .map_err(unavailable)?;
            cert_events::notify_retired(&tx, &fp)
                .await
                .map_err(unavailable)?;
            superseded.push(fp);
        }
    }
    let (not_before, not_after) = validity(ctx.agent_cert_lifetime);
    // During a CA rotation the new CA issues: this is how agents move to it.
    let ring = ctx.authority.ring();
    let issued = ring
        .current
        .sign_agent_csr(csr_der, server_id, not_before, not_after)
        .map_err(|_| scoped(RenewalRefusal::MalformedCsr))?;
    let fingerprint = Fingerprint::of_der(&issued.cert_der);
    let not_after =
        DateTime::from_timestamp(issued.not_after.unix_timestamp(), 0).unwrap_or_else(Utc::now);
    tx.execute(
        "INSERT INTO agent_certificates \
         (fingerprint, server_id, serial, not_after, renewed_from, ca_fingerprint) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &fingerprint.as_bytes().as_slice(),
            &server_id,
            &issued.serial_hex,
            &not_after,
            &link.fingerprint.as_bytes().as_slice(),
            &ring.current.fingerprint().as_bytes().as_slice(),
        ],
    )
    .await
    .map_err(unavailable)?;
    cert_events::notify_renewed(&tx, &fingerprint, server_id, not_after.timestamp())
        .await
        .map_err(unavailable)?;
    audit::append(
        &tx,
        ctx.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::Anonymous,
            client_ip: Some(link.peer.to_string()),
            user_agent: Some(format!("sensei-agent/{}", link.agent_version)),
            action: "agent.certificate_renewed",
            target: Some(("server", server_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "certificate_serial": issued.serial_hex,
                "certificate_fingerprint": fingerprint.to_string(),
                "renewed_serial": current_serial,
                "renewed_fingerprint": link.fingerprint.to_string(),
                "expires_at": not_after.to_rfc3339(),
                "replaced_pending": superseded.len(),
            }),
        },
    )
    .await
    .map_err(unavailable)?;
    tx.commit().await.map_err(unavailable)?;
    // Apply here at once; other replicas hear the NOTIFY.
    ctx.hub.retire(&superseded);
    ctx.hub.retire(&retired);
    ctx.hub
        .renewed(fingerprint, server_id, not_after.timestamp());
    tracing::info!(%server_id, serial = %issued.serial_hex, "agent certificate renewed");
    Ok(issued.cert_pem)
}

/// Retires, inside `tx`, every other valid certificate of `server_id` once its agent uses
/// `current`, marking `current` connected with. Returns the retired fingerprints (already
/// notified).
async fn retire_predecessors(
    tx: &tokio_postgres::Transaction<'_>,
    server_id: Uuid,
    current: &Fingerprint,
) -> Result<Vec<Fingerprint>, tokio_postgres::Error> {
    let first_use = tx
        .execute(
            "UPDATE agent_certificates SET first_connected_at = now() \
             WHERE fingerprint = $1 AND server_id = $2 AND first_connected_at IS NULL \
               AND renewed_from IS NOT NULL AND revoked_at IS NULL AND retired_at IS NULL",
            &[&current.as_bytes().as_slice(), &server_id],
        )
        .await?;
    if first_use == 0 {
        return Ok(Vec::new());
    }
    let retired: Vec<Fingerprint> = tx
        .query(
            "UPDATE agent_certificates SET retired_at = now() \
             WHERE server_id = $1 AND fingerprint <> $2 \
               AND revoked_at IS NULL AND retired_at IS NULL RETURNING fingerprint",
            &[&server_id, &current.as_bytes().as_slice()],
        )
        .await?
        .iter()
        .filter_map(|r| Fingerprint::from_raw(r.get::<_, &[u8]>(0)))
        .collect();
    for fp in &retired {
        cert_events::notify_retired(tx, fp).await?;
    }
    Ok(retired)
}

/// The agent of `server_id` connected with `current`, a renewed certificate, for the first
/// time: the certificates it replaces are retired. Runs beside the session; if the database
/// cannot be reached the old certificate simply stays valid until the next try (the next
/// connection, or the next renewal).
pub async fn activate(ctx: &GatewayContext, server_id: Uuid, current: Fingerprint) {
    let outcome = async {
        let mut client = ctx.pool.get().await.map_err(|e| e.to_string())?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| crate::store::db::describe(&e))?;
        tx.query_opt(
            "SELECT 1 FROM servers WHERE id = $1 FOR UPDATE",
            &[&server_id],
        )
        .await
        .map_err(|e| crate::store::db::describe(&e))?;
        let retired = retire_predecessors(&tx, server_id, &current)
            .await
            .map_err(|e| crate::store::db::describe(&e))?;
        tx.commit()
            .await
            .map_err(|e| crate::store::db::describe(&e))?;
        Ok::<_, String>(retired)
    }
    .await;
    match outcome {
        Ok(retired) => {
            if !retired.is_empty() {
                tracing::info!(%server_id, retired = retired.len(), "the agent connected with its renewed certificate; the old one is retired");
            }
            ctx.hub.retire(&retired);
        }
        Err(e) => {
            tracing::warn!(%server_id, error = %e, "could not retire a renewed agent's old certificate; it stays valid for now");
        }
    }
}

async fn audit_refusal(
    ctx: &GatewayContext,
    server_id: Uuid,
    account_id: Uuid,
    link: &SessionLink,
    reason: RenewalRefusal,
) -> Result<(), String> {
    let mut client = ctx.pool.get().await.map_err(|e| e.to_string())?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| crate::store::db::describe(&e))?;
    audit::append(
        &tx,
        ctx.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::Anonymous,
            client_ip: Some(link.peer.to_string()),
            user_agent: Some(format!("sensei-agent/{}", link.agent_version)),
            action: "agent.certificate_renewal_refused",
            target: Some(("server", server_id)),
            outcome: Outcome::Denied,
            metadata: json!({
                "reason": reason.to_string(),
                "certificate_fingerprint": link.fingerprint.to_string(),
            }),
        },
    )
    .await
    .map_err(|e| crate::store::db::describe(&e))?;
    tx.commit()
        .await
        .map_err(|e| crate::store::db::describe(&e))
}
