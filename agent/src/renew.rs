//! Renewing this agent's certificate over its live session: at about two thirds of the
//! certificate's lifetime (`sensei_shared::renewal`), make a new key pair here, send a CSR on
//! a stream of its own (`sensei_shared::session::AgentRenewal`), store the new key and
//! certificate together, and let the control plane close the session once no job runs on it;
//! the agent then reconnects at once with the new certificate. A failure leaves the current
//! certificate in use and is retried with backoff; near the expiry every failure is logged as
//! an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn::VarInt;
use sensei_certs::{AgentKeyRequest, Fingerprint};
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::protocol::{close, ControlMessage};
use sensei_shared::renewal::{RenewalSchedule, Urgency};
use sensei_shared::session::{AgentRenewal, AgentRenewalAction, AgentRenewalError, HelloSent};
use tokio::time::Instant;
use uuid::Uuid;

use crate::identity::{Identity, StateDir};
use crate::session::{sleep_until, StreamEnd};
use crate::transport::CONNECT_TIMEOUT;

/// The renewal plan of one certificate. Kept across reconnections, so that a connection lost
/// now and then neither resets the backoff nor moves the jittered first attempt.
#[derive(Debug)]
pub struct RenewalPlan {
    fingerprint: Fingerprint,
    schedule: RenewalSchedule,
    /// Renewed (the new pair is stored), or refused for good: nothing more to do with this
    /// certificate.
    done: bool,
}

impl RenewalPlan {
    /// The plan for `identity`'s certificate: `previous` if it was made for the same one,
    /// else a new schedule. `None` if the certificate's validity cannot be read (the session
    /// will then be refused anyway).
    pub fn for_identity(identity: &Identity, previous: Option<RenewalPlan>) -> Option<Self> {
        let der = sensei_certs::tls::first_cert_der(&identity.cert_pem).ok()?;
        let fingerprint = Fingerprint::of_der(&der);
        if let Some(previous) = previous.filter(|p| p.fingerprint == fingerprint) {
            return Some(previous);
        }
        let (not_before, not_after) = sensei_certs::validity(&identity.cert_pem).ok()?;
        let since_epoch = |unix: i64| Duration::from_secs(u64::try_from(unix).unwrap_or(0));
        let (not_before, not_after) = (
            since_epoch(not_before.unix_timestamp()),
            since_epoch(not_after.unix_timestamp()),
        );
        let schedule = RenewalSchedule::new(not_before, not_after, rand::random());
        tracing::info!(
            expires_in = ?not_after.saturating_sub(wall_clock()),
            renews_in = ?schedule.next_attempt().saturating_sub(wall_clock()),
            "certificate loaded"
        );
        Some(Self {
            fingerprint,
            schedule,
            done: false,
        })
    }
}

/// Time since the Unix epoch, which is what certificates' validity is measured in.
fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("cannot make a key pair: {0}")]
    Key(String),
    #[error("cannot open the renewal stream")]
    Stream,
    #[error(transparent)]
    Exchange(#[from] AgentRenewalError),
    #[error("the renewed certificate does not certify the new key")]
    Mismatch,
    #[error("cannot store the renewed certificate: {0}")]
    Store(String),
}

impl AttemptError {
    /// Whether trying again is pointless: the certificate is revoked or expired.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Exchange(e) if e.is_final())
    }
}

/// Renews when the plan says so, for as long as the session lasts. Never ends the session by
/// itself: after a successful renewal the control plane closes it (between jobs), and after a
/// failure the current certificate simply stays in use.
pub async fn renewal_loop(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    state: &StateDir,
    plan: &mut RenewalPlan,
) -> StreamEnd {
    loop {
        if plan.done {
            return std::future::pending().await;
        }
        let wait = plan.schedule.next_attempt().saturating_sub(wall_clock());
        tokio::time::sleep(wait).await;
        let now = wall_clock();
        if plan.schedule.urgency(now) == Urgency::Expired {
            tracing::error!(%server_id, "this agent's certificate has expired without being renewed; the server is offline until it is enrolled again (create a new enrollment token and run `sensei-agent enroll`)");
            plan.done = true;
            continue;
        }
        match attempt(connection, hello, server_id, state).await {
            Ok(()) => {
                tracing::info!(%server_id, "certificate renewed and stored; reconnecting with it once no job runs");
                plan.done = true;
            }
            Err(AttemptError::Exchange(e)) if e.is_final() => {
                tracing::error!(%server_id, error = %e, "certificate renewal refused for good; this agent must be enrolled again");
                plan.done = true;
            }
            Err(e) => {
                let urgency = plan.schedule.failed(now, rand::random());
                let retry_in = plan.schedule.next_attempt().saturating_sub(now);
                match urgency {
                    Urgency::OnTime => {
                        tracing::warn!(%server_id, error = %e, ?retry_in, "certificate renewal failed; retrying")
                    }
                    Urgency::Alert { left } => {
                        tracing::error!(%server_id, error = %e, expires_in = ?left, ?retry_in, failures = plan.schedule.failures(), "CERTIFICATE RENEWAL KEEPS FAILING: this server goes offline when its certificate expires; check the control plane's logs, or enroll the server again")
                    }
                    Urgency::Expired => {}
                }
            }
        }
    }
}

/// One renewal exchange on a stream of its own (also how an agent moves to a new CA:
/// [`crate::trust`]).
pub(crate) async fn attempt(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    state: &StateDir,
) -> Result<(), AttemptError> {
    exchange(connection, hello, server_id, |key_pem, certificate_pem| {
        state
            .store_renewed(key_pem, certificate_pem)
            .map_err(|e| AttemptError::Store(e.to_string()))
    })
    .await
}

/// One renewal exchange with a new key pair made here: `store` keeps the key and the
/// certificate that came back for it (checked to certify the key) before the control plane is
/// told they are stored. Shared by the agent (which writes them to its state directory) and
/// the load generator's simulated agents (which keep them in memory).
pub async fn exchange(
    connection: &quinn::Connection,
    hello: HelloSent,
    server_id: Uuid,
    store: impl FnOnce(&str, &str) -> Result<(), AttemptError>,
) -> Result<(), AttemptError> {
    // The subject is the server's UUID, as the current certificate's; the key is new and
    // stays here, written only once the certificate for it has come back.
    let request = AgentKeyRequest::generate(&server_id.to_string())
        .map_err(|e| AttemptError::Key(e.to_string()))?;
    let mut store = Some(store);
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|_| AttemptError::Stream)?;
    let mut recv = FrameReader::new(recv);
    let mut machine = AgentRenewal::new(hello, request.csr_der, CONNECT_TIMEOUT, Instant::now());
    loop {
        while let Some(action) = machine.poll() {
            match action {
                AgentRenewalAction::Send(message) => {
                    if write_frame(&mut send, &message).await.is_err() {
                        machine.handle_end()?;
                    }
                }
                AgentRenewalAction::Store { certificate_pem } => {
                    let stored = match store.take() {
                        Some(store)
                            if sensei_certs::certifies(&certificate_pem, &request.key_pem) =>
                        {
                            store(&request.key_pem, &certificate_pem)
                        }
                        _ => Err(AttemptError::Mismatch),
                    };
                    if let Err(e) = stored {
                        // A reset, not an end: the control plane must not take the new
                        // certificate as stored. The current one stays valid.
                        let _ = send.reset(VarInt::from_u32(close::LEAVING));
                        return Err(e);
                    }
                    // Cannot be out of order: the machine asked for the certificate to be
                    // stored.
                    let _ = machine.stored();
                }
                AgentRenewalAction::Finish => {
                    let _ = send.finish();
                    return Ok(());
                }
            }
        }
        let handled = tokio::select! {
            message = recv.next::<ControlMessage>() => match message {
                Ok(Some(message)) => machine.handle(message),
                // An older control plane drops a stream it cannot read.
                Ok(None) | Err(_) => machine.handle_end(),
            },
            () = sleep_until(machine.poll_timeout()) => machine.handle_timeout(Instant::now()),
        };
        if let Err(e) = handled {
            let _ = send.reset(VarInt::from_u32(close::LEAVING));
            return Err(e.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityMeta;

    fn identity(ca: &sensei_certs::CertificateAuthority, server_id: Uuid, days: i64) -> Identity {
        let request = AgentKeyRequest::generate(&server_id.to_string()).expect("key");
        let now = time::OffsetDateTime::now_utc();
        let issued = ca
            .sign_agent_csr(
                &request.csr_der,
                server_id,
                now,
                now + time::Duration::days(days),
            )
            .expect("sign");
        Identity {
            meta: IdentityMeta {
                server_id,
                control_plane: "cp.example:7443".into(),
                ca_fingerprint: ca.fingerprint().to_string(),
                job_signing_public_key: "ab".repeat(32),
                agent_version: crate::version().into(),
                job_signing_keys: Vec::new(),
            },
            key_pem: request.key_pem,
            cert_pem: issued.cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
        }
    }

    /// A lost connection does not move the jittered first attempt nor reset the backoff; a
    /// renewed certificate starts a plan of its own.
    #[test]
    fn the_plan_survives_reconnections_and_follows_the_certificate() {
        let ca = sensei_certs::CertificateAuthority::generate("ca").expect("ca");
        let server_id = Uuid::new_v4();
        let current = identity(&ca, server_id, 90);
        let mut plan = RenewalPlan::for_identity(&current, None).expect("plan");
        let due = plan.schedule.next_attempt();
        let lifetime = plan.schedule.lifetime();
        assert_eq!(lifetime, Duration::from_secs(90 * 86_400));
        let issued = wall_clock();
        assert!(due >= issued + lifetime.mul_f64(7.0 / 12.0) - Duration::from_secs(2));
        assert!(due <= issued + lifetime.mul_f64(9.0 / 12.0) + Duration::from_secs(2));
        plan.schedule.failed(due, 0.5);
        let retry = plan.schedule.next_attempt();
        let again = RenewalPlan::for_identity(&current, Some(plan)).expect("same plan");
        assert_eq!(again.schedule.next_attempt(), retry);
        assert_eq!(again.schedule.failures(), 1);
        let renewed = identity(&ca, server_id, 90);
        let fresh = RenewalPlan::for_identity(&renewed, Some(again)).expect("new plan");
        assert_eq!(fresh.schedule.failures(), 0);
        assert!(!fresh.done);
        let mut garbled = renewed.clone();
        garbled.cert_pem = "not a certificate".into();
        assert!(RenewalPlan::for_identity(&garbled, None).is_none());
    }
}
