//! `sensei-agent run`: keep one mTLS QUIC connection to the control plane, say hello, send
//! heartbeats, and come back after any failure with jittered exponential backoff (or after the
//! delay the control plane suggested). A "revoked" close, or a handshake refused with the TLS
//! alert `certificate_revoked`, ends the loop for good.

use std::time::Duration;

use quinn::{ConnectionError, TransportErrorCode, VarInt};
use sensei_shared::backoff::Backoff;
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{
    AgentMessage, CloseVerdict, ControlMessage, TLS_ALERT_CERTIFICATE_REVOKED,
};
use tokio::sync::watch;

use crate::identity::{Identity, IdentityError, StateDir};
use crate::jobs::{job_loop, JobContext, JobPolicy};
use crate::transport::{self, TransportError, CONNECT_TIMEOUT};

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The control plane revoked this agent's certificate. Do not restart.
    Revoked,
    /// Asked to stop.
    Shutdown,
}

/// What jobs are checked against: the pinned job-signing key, this server, this certificate.
fn job_context(
    identity: &Identity,
    state_dir: &StateDir,
    policy: JobPolicy,
) -> Result<JobContext, RunError> {
    let corrupt = |detail: &str| {
        RunError::Identity(IdentityError::Corrupt {
            dir: state_dir.path().display().to_string(),
            detail: detail.into(),
        })
    };
    let key: [u8; 32] = hex::decode(&identity.meta.job_signing_public_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| corrupt("the pinned job-signing key is unreadable"))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| corrupt("the pinned job-signing key is invalid"))?;
    let cert = sensei_certs::tls::first_cert_der(&identity.cert_pem)
        .map_err(|_| corrupt("the certificate is unreadable"))?;
    Ok(JobContext {
        key,
        server_id: identity.meta.server_id,
        fingerprint: *sensei_certs::Fingerprint::of_der(&cert).as_bytes(),
        state: state_dir.clone(),
        policy,
    })
}

/// Why `run` could not even start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// How one connection ended.
#[derive(Debug)]
enum SessionEnd {
    Revoked,
    RetryAfter(Duration),
    /// Lost or refused, with the reason for the log.
    Lost(String),
}

/// Runs until revoked or `shutdown` turns true.
pub async fn run(
    state_dir: &StateDir,
    policy: JobPolicy,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunOutcome, RunError> {
    let identity = state_dir.load()?;
    let jobs = job_context(&identity, state_dir, policy)?;
    let server_id = identity.meta.server_id;
    let verifier = sensei_certs::tls::verifier_trusting(&identity.ca_pem)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let config = transport::client_config(
        verifier,
        Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
    )?;
    let mut backoff = Backoff::agent_default();
    loop {
        let end = tokio::select! {
            end = session(&identity, config.clone(), &mut backoff, &jobs) => end,
            _ = shutdown.changed() => return Ok(RunOutcome::Shutdown),
        };
        let delay = match end {
            SessionEnd::Revoked => {
                tracing::error!(
                    %server_id,
                    "the control plane revoked this agent's certificate; it will not reconnect. \
                     To use this server again, create a new enrollment token and run \
                     `sensei-agent enroll`"
                );
                return Ok(RunOutcome::Revoked);
            }
            SessionEnd::RetryAfter(delay) => {
                let delay = Backoff::suggested(delay, rand::random());
                tracing::info!(?delay, "the control plane asked to reconnect later");
                delay
            }
            SessionEnd::Lost(reason) => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(%reason, ?delay, "connection to the control plane lost; retrying");
                delay
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return Ok(RunOutcome::Shutdown),
        }
    }
}

/// Whether a handshake failure is the control plane refusing a revoked certificate.
fn refused_as_revoked(e: &ConnectionError) -> bool {
    let revoked = TransportErrorCode::crypto(TLS_ALERT_CERTIFICATE_REVOKED);
    match e {
        ConnectionError::ConnectionClosed(close) => close.error_code == revoked,
        ConnectionError::TransportError(t) => t.code == revoked,
        _ => false,
    }
}

fn verdict(e: &ConnectionError) -> SessionEnd {
    if refused_as_revoked(e) {
        return SessionEnd::Revoked;
    }
    match e {
        ConnectionError::ApplicationClosed(close) => {
            match CloseVerdict::from_application_close(close.error_code.into_inner(), &close.reason)
            {
                CloseVerdict::Stop => SessionEnd::Revoked,
                CloseVerdict::RetryAfter(d) => SessionEnd::RetryAfter(d),
                CloseVerdict::Retry => SessionEnd::Lost(format!(
                    "closed by the control plane: {}",
                    String::from_utf8_lossy(&close.reason)
                )),
            }
        }
        other => SessionEnd::Lost(other.to_string()),
    }
}

async fn session(
    identity: &Identity,
    config: quinn::ClientConfig,
    backoff: &mut Backoff,
    jobs: &JobContext,
) -> SessionEnd {
    let (remote, server_name) = match transport::resolve(&identity.meta.control_plane).await {
        Ok(r) => r,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let endpoint = match transport::endpoint(remote) {
        Ok(e) => e,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let connecting = match endpoint.connect_with(config, remote, &server_name) {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return verdict(&e),
        Err(_) => return SessionEnd::Lost("handshake timed out".into()),
    };
    // The control stream and the job loop share the connection; when it ends, both end.
    // Biased: the control stream must be opened (and carry the hello) before the job loop
    // opens its first poll stream, or the control plane reads a poll where it expects the
    // hello and closes the connection (seen as a spurious first reconnect in the quickstart).
    let end = tokio::select! {
        biased;
        end = control_stream(&connection, identity, backoff) => end,
        () = job_loop(&connection, jobs) => None,
    };
    let end = match end {
        Some(end) => end,
        None => verdict(&connection.closed().await),
    };
    connection.close(VarInt::from_u32(0), b"agent leaving");
    endpoint.close(VarInt::from_u32(0), b"agent leaving");
    end
}

/// Hello, welcome, then heartbeats until the connection ends. `None`: the connection ended,
/// and its close reason says why.
async fn control_stream(
    connection: &quinn::Connection,
    identity: &Identity,
    backoff: &mut Backoff,
) -> Option<SessionEnd> {
    let (mut send, mut recv) = connection.open_bi().await.ok()?;
    let hello = AgentMessage::Hello {
        server_id: identity.meta.server_id,
        agent_version: crate::VERSION.into(),
    };
    write_frame(&mut send, &hello).await.ok()?;
    let heartbeat =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_frame::<ControlMessage, _>(&mut recv))
            .await
        {
            Ok(Ok(Some(ControlMessage::Welcome { heartbeat_secs }))) => {
                Duration::from_secs(u64::from(heartbeat_secs.clamp(1, 300)))
            }
            Ok(Ok(Some(other))) => {
                return Some(SessionEnd::Lost(format!("expected welcome, got {other:?}")))
            }
            _ => return None,
        };
    tracing::info!(server_id = %identity.meta.server_id, "connected to the control plane");
    backoff.reset();
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                write_frame(&mut send, &AgentMessage::Heartbeat).await.ok()?;
            }
            message = read_frame::<ControlMessage, _>(&mut recv) => match message {
                Ok(Some(ControlMessage::HeartbeatAck)) => {}
                Ok(Some(other)) => {
                    return Some(SessionEnd::Lost(format!("unexpected message {other:?}")))
                }
                Ok(None) | Err(_) => return None,
            },
        }
    }
}
