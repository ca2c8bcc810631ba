//! Enrollment: an agent presents a single-use token and a CSR; the control plane checks the
//! token (constant-time), signs the CSR with its CA, records the certificate and returns it
//! with the CA certificate and the job-signing public key. Every refusal says why and is
//! audited.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use sensei_certs::Fingerprint;
use sensei_shared::protocol::{EnrollRequest, EnrollResponse};
use serde_json::json;
use uuid::Uuid;

use super::cert_events;
use super::gateway::GatewayContext;
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::admission;
use crate::identity::tokens::{Token, TokenKind};

/// A refusal: what the agent is told, and the account to audit it under (when known).
struct Refusal {
    reason: String,
    account_id: Option<Uuid>,
    server_id: Option<Uuid>,
    /// Refused by a throttle: audited once per window under this key, not every time.
    throttled: Option<String>,
}

fn refuse(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        account_id: None,
        server_id: None,
        throttled: None,
    }
}

fn database_unavailable() -> Refusal {
    refuse("the control plane's database is unavailable; try again")
}

/// Handles one enrollment request. Failures count against the client's address and, once
/// the token names one, the server; past either limit the request is refused before its
/// token is looked at, and the refusal is audited once per window.
pub async fn process(ctx: &GatewayContext, request: EnrollRequest, peer: IpAddr) -> EnrollResponse {
    let address = admission::address_key(peer);
    let outcome = match reserve(ctx, admission::ENROLL_PER_ADDRESS, &address).await {
        Err(refusal) => Err(refusal),
        Ok(Err(refused)) => Err(Refusal {
            throttled: Some(format!("ip:{address}")),
            ..refuse(format!(
                "too many failed enrollments from this address; try again in {} seconds",
                refused.retry_after_secs
            ))
        }),
        Ok(Ok(attempt)) => match enroll(ctx, &request, peer).await {
            Ok((response, server_attempt)) => {
                // A success is not a failure to count.
                release(ctx, [Some(attempt), server_attempt]).await;
                Ok(response)
            }
            Err(refusal) => Err(refusal),
        },
    };
    match outcome {
        Ok(response) => response,
        Err(refusal) => {
            tracing::info!(%peer, reason = %refusal.reason, "enrollment refused");
            if let Err(e) = audit_refusal(ctx, &refusal, &request, peer).await {
                tracing::error!(error = %e, "could not audit a refused enrollment");
            }
            EnrollResponse::Refused {
                reason: refusal.reason,
            }
        }
    }
}

async fn reserve(
    ctx: &GatewayContext,
    limit: admission::Limit,
    key: &str,
) -> Result<Result<admission::Reservation, admission::Refused>, Refusal> {
    let mut client = ctx.pool.get().await.map_err(|_| database_unavailable())?;
    admission::reserve(&mut client, limit, key)
        .await
        .map_err(|e| {
            tracing::error!(error = %crate::store::db::describe(&e), "enrollment throttle");
            database_unavailable()
        })
}

async fn release(ctx: &GatewayContext, attempts: [Option<admission::Reservation>; 2]) {
    let Ok(client) = ctx.pool.get().await else {
        return;
    };
    for attempt in attempts.into_iter().flatten() {
        if let Err(e) = admission::release(&**client, attempt).await {
            tracing::warn!(error = %crate::store::db::describe(&e), "could not release an enrollment attempt");
        }
    }
}

async fn audit_refusal(
    ctx: &GatewayContext,
    refusal: &Refusal,
    request: &EnrollRequest,
    peer: IpAddr,
) -> Result<(), String> {
    let mut client = ctx.pool.get().await.map_err(|e| e.to_string())?;
    if let Some(key) = &refusal.throttled {
        // One row per window for a throttled key: a flood must not flood the audit log.
        let first = admission::reserve(&mut client, admission::ENROLL_THROTTLED_AUDIT, key)
            .await
            .map_err(|e| crate::store::db::describe(&e))?;
        if first.is_err() {
            return Ok(());
        }
    }
    let tx = client.transaction().await.map_err(|e| e.to_string())?;
    audit::append(
        &tx,
        ctx.keys.audit_keys(),
        &AuditEvent {
            account_id: refusal.account_id,
            actor: Actor::Anonymous,
            client_ip: Some(peer.to_string()),
            user_agent: Some(format!("sensei-agent/{}", truncate(&request.agent_version))),
            action: "agent.enrollment_refused",
            target: refusal.server_id.map(|id| ("server", id)),
            outcome: Outcome::Denied,
            metadata: json!({
                "reason": refusal.reason,
                "hostname": truncate(&request.hostname),
                "throttled": refusal.throttled.is_some(),
            }),
        },
    )
    .await
    .map_err(|e| crate::store::db::describe(&e))?;
    tx.commit()
        .await
        .map_err(|e| crate::store::db::describe(&e))
}

/// Untrusted strings from the agent are cut short before they are stored.
fn truncate(s: &str) -> String {
    // Anyone may try to enroll: without its NULs (which PostgreSQL text and jsonb refuse) the
    // attempt's audit row is written whatever the client sent.
    sensei_shared::protocol::storable_text(s, 128)
}

/// Enrolls, or says why not; on success also the server's counted attempt, to release.
async fn enroll(
    ctx: &GatewayContext,
    request: &EnrollRequest,
    peer: IpAddr,
) -> Result<(EnrollResponse, Option<admission::Reservation>), Refusal> {
    let db = |e: tokio_postgres::Error| {
        tracing::error!(error = %crate::store::db::describe(&e), "enrollment");
        refuse("the control plane could not complete enrollment; try again")
    };
    let token = Token::parse(TokenKind::Enrollment, request.token.trim())
        .ok_or_else(|| refuse("the enrollment token is malformed; copy it again from the API"))?;
    let mut client = ctx.pool.get().await.map_err(|_| database_unavailable())?;
    // Everything that needs no lock first, on this one connection: which server the token
    // names, whether its secret is right, and that server's throttle. Only then is the
    // server's row locked (in the order server deletion locks: server, then its tokens), and
    // never while waiting for a second connection: a burst of replays cannot hold the pool.
    let known = client
        .query_opt(
            "SELECT t.server_id, t.secret_hash, s.account_id FROM enrollment_tokens t \
             JOIN servers s ON s.id = t.server_id WHERE t.id = $1",
            &[&token.id],
        )
        .await
        .map_err(db)?
        .filter(|r| token.matches(r.get::<_, &[u8]>(1)))
        .ok_or_else(|| refuse("unknown enrollment token"))?;
    let server_id: Uuid = known.get(0);
    let account_id: Uuid = known.get(2);
    let scoped = |reason: String| Refusal {
        reason,
        account_id: Some(account_id),
        server_id: Some(server_id),
        throttled: None,
    };
    // The token is genuine: from here failures count against its server too (a spent or
    // expired token replayed, from wherever).
    let server_attempt = match admission::reserve(
        &mut client,
        admission::ENROLL_PER_SERVER,
        &server_id.to_string(),
    )
    .await
    .map_err(db)?
    {
        Ok(attempt) => attempt,
        Err(refused) => {
            return Err(Refusal {
                throttled: Some(format!("server:{server_id}")),
                ..scoped(format!(
                    "too many failed enrollments for this server; try again in {} seconds",
                    refused.retry_after_secs
                ))
            })
        }
    };
    let tx = client.transaction().await.map_err(db)?;
    // A server row held by a long deletion makes this wait a bounded time, then refuse.
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(db)?;
    let server = tx
        .query_opt(
            "SELECT deleted_at IS NOT NULL, transport FROM servers WHERE id = $1 FOR UPDATE",
            &[&server_id],
        )
        .await
        .map_err(db)?
        .ok_or_else(|| refuse("unknown enrollment token"))?;
    let row = tx
        .query_opt(
            "SELECT expires_at, used_at FROM enrollment_tokens \
             WHERE id = $1 AND server_id = $2 FOR UPDATE",
            &[&token.id, &server_id],
        )
        .await
        .map_err(db)?
        // Deleted with its server while this waited for the server's lock.
        .ok_or_else(|| refuse("unknown enrollment token"))?;
    let expires_at: DateTime<Utc> = row.get(0);
    let used_at: Option<DateTime<Utc>> = row.get(1);
    if let Some(at) = used_at {
        return Err(scoped(format!(
            "this enrollment token was already used at {}; create a new one with \
             POST /v1/servers/{server_id}/enrollment-token",
            at.to_rfc3339()
        )));
    }
    if expires_at <= Utc::now() {
        return Err(scoped(format!(
            "this enrollment token expired at {}; create a new one with \
             POST /v1/servers/{server_id}/enrollment-token",
            expires_at.to_rfc3339()
        )));
    }
    if server.get::<_, bool>(0) {
        return Err(scoped(
            "the server this token belongs to was deleted".into(),
        ));
    }
    if server.get::<_, &str>(1) != "agent" {
        return Err(scoped("this server uses SSH, not an agent".into()));
    }
    if let Some(expected) = request.expected_server_id.filter(|e| *e != server_id) {
        return Err(scoped(format!(
            "this token belongs to another server ({server_id}), not {expected}"
        )));
    }
    let (not_before, not_after) = super::renew::validity(ctx.agent_cert_lifetime);
    let ring = ctx.authority.ring();
    let issued = ring
        .current
        .sign_agent_csr(&request.csr_der, server_id, not_before, not_after)
        .map_err(|e| scoped(e.to_string()))?;
    let fingerprint = Fingerprint::of_der(&issued.cert_der);
    let not_after =
        DateTime::from_timestamp(issued.not_after.unix_timestamp(), 0).unwrap_or_else(Utc::now);

    tx.execute(
        "UPDATE enrollment_tokens SET used_at = now() WHERE id = $1",
        &[&token.id],
    )
    .await
    .map_err(db)?;
    // A new enrollment replaces the server's identity: older certificates stop working.
    let replaced: Vec<Fingerprint> = tx
        .query(
            "UPDATE agent_certificates SET revoked_at = now() \
             WHERE server_id = $1 AND revoked_at IS NULL AND retired_at IS NULL \
             RETURNING fingerprint",
            &[&server_id],
        )
        .await
        .map_err(db)?
        .iter()
        .filter_map(|r| Fingerprint::from_raw(r.get::<_, &[u8]>(0)))
        .collect();
    tx.execute(
        "INSERT INTO agent_certificates (fingerprint, server_id, serial, not_after, ca_fingerprint) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &fingerprint.as_bytes().as_slice(),
            &server_id,
            &issued.serial_hex,
            &not_after,
            &ring.current.fingerprint().as_bytes().as_slice(),
        ],
    )
    .await
    .map_err(db)?;
    // The agent pins the current job-signing key, and its jobs are signed by it from the
    // first one (during a job-key rotation too: it never needs the key being retired, so the
    // retirement changes nothing for it).
    let job_key = ctx.job_keys.ring().current_public();
    tx.execute(
        "UPDATE servers SET job_key_acknowledged = $2 WHERE id = $1",
        &[&server_id, &job_key.as_slice()],
    )
    .await
    .map_err(db)?;
    for old in &replaced {
        cert_events::notify_revoked(&tx, old).await.map_err(db)?;
    }
    cert_events::notify_allowed(&tx, &fingerprint, server_id, not_after.timestamp())
        .await
        .map_err(db)?;
    audit::append(
        &tx,
        ctx.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::Anonymous,
            client_ip: Some(peer.to_string()),
            user_agent: Some(format!("sensei-agent/{}", truncate(&request.agent_version))),
            action: "agent.enrolled",
            target: Some(("server", server_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "certificate_serial": issued.serial_hex,
                "certificate_fingerprint": fingerprint.to_string(),
                "hostname": truncate(&request.hostname),
                "replaced_certificates": replaced.len(),
            }),
        },
    )
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    // Apply here at once; other replicas hear the NOTIFY.
    ctx.hub
        .certificates
        .allow(fingerprint, server_id, not_after.timestamp());
    ctx.hub.revoke(&replaced);
    Ok((
        EnrollResponse::Enrolled {
            server_id,
            certificate_pem: issued.cert_pem,
            // The CA the agent pinned (the presented one): during a CA rotation it learns
            // the new one on its first session.
            ca_pem: ctx.authority.ring().presented().cert_pem().to_owned(),
            job_signing_public_key: job_key,
        },
        Some(server_attempt),
    ))
}
