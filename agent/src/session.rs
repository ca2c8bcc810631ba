//! `sensei-agent run`: keep one mTLS QUIC connection to the control plane, say hello, send
//! heartbeats (the protocol is `sensei_shared::session`; this is its driver), renew the
//! certificate when it is due ([`crate::renew`]), follow a CA rotation ([`crate::trust`]), and come back after any failure with
//! jittered exponential backoff (or after the delay the control plane suggested; at once after
//! a renewal). The identity is read again before every connection, so a renewed certificate
//! is used from the next one. A "revoked" close, or a handshake refused with the TLS alert
//! `certificate_revoked`, ends the loop for good.

use std::time::Duration;

use quinn::{ConnectionError, TransportErrorCode, VarInt};
use sensei_shared::backoff::Backoff;
use sensei_shared::codec::io::{write_frame, FrameReader};
use sensei_shared::protocol::{close, CloseVerdict, ControlMessage, TLS_ALERT_CERTIFICATE_REVOKED};
use sensei_shared::session::{AgentAction, AgentSession, HelloSent};
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

use crate::identity::{Identity, IdentityError, StateDir};
use crate::jobs::{job_loop, JobContext, JobPolicy};
use crate::renew::{renewal_loop, RenewalPlan};
use crate::status;
use crate::transport::{self, TransportError, CONNECT_TIMEOUT};
use crate::trust::trust_loop;

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The control plane revoked this agent's certificate. Do not restart.
    Revoked,
    /// Asked to stop.
    Shutdown,
}

/// What jobs are checked against: the pinned job-signing keys (read for each job, checked
/// here so that an unreadable set stops the agent before it connects), this server, this
/// certificate.
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
    identity.meta.job_keys().map_err(|e| corrupt(&e))?;
    let cert = sensei_certs::tls::first_cert_der(&identity.cert_pem)
        .map_err(|_| corrupt("the certificate is unreadable"))?;
    Ok(JobContext {
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
    /// The certificate was renewed: reconnect at once, with the new one.
    Renewed,
    /// Lost or refused, with the reason for the log.
    Lost(String),
}

/// Runs until revoked or `shutdown` turns true.
pub async fn run(
    state_dir: &StateDir,
    policy: JobPolicy,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunOutcome, RunError> {
    let mut backoff = Backoff::agent_default();
    let mut gateways = transport::Gateways::starting_at(rand::random::<u16>().into());
    let mut plan = None;
    loop {
        // Read before every connection: a renewal stores a new key and certificate.
        let identity = state_dir.load()?;
        let jobs = job_context(&identity, state_dir, policy.clone())?;
        let server_id = identity.meta.server_id;
        let verifier = sensei_certs::tls::verifier_trusting(&identity.ca_pem)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let config = transport::client_config(
            verifier,
            Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
        )?;
        plan = RenewalPlan::for_identity(&identity, plan.take());
        let renewal = Renewal {
            state: state_dir,
            plan: plan.as_mut(),
        };
        let end = tokio::select! {
            end = session(&identity, config, &mut backoff, &jobs, renewal, gateways) => end,
            _ = shutdown.changed() => {
                status::record(state_dir, |s| {
                    s.connected = false;
                    s.since = status::now();
                    s.detail = Some("stopped".into());
                });
                return Ok(RunOutcome::Shutdown);
            }
        };
        status::record(state_dir, |s| {
            s.connected = false;
            s.since = status::now();
            s.detail = Some(match &end {
                SessionEnd::Revoked => "revoked".into(),
                SessionEnd::RetryAfter(_) => "the control plane asked to reconnect later".into(),
                SessionEnd::Renewed => "reconnecting with a renewed certificate".into(),
                SessionEnd::Lost(reason) => reason.clone(),
            });
        });
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
            // At once only if there is a new certificate to reconnect with: a control plane
            // that says "renewed" to an agent with nothing new gets the usual backoff, not a
            // tight loop.
            SessionEnd::Renewed
                if state_dir
                    .load()
                    .is_ok_and(|renewed| renewed.cert_pem != identity.cert_pem) =>
            {
                tracing::info!(%server_id, "reconnecting with the renewed certificate");
                continue;
            }
            SessionEnd::Renewed => {
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(?delay, "the control plane asked to reconnect with a renewed certificate, but none is stored; retrying");
                delay
            }
            SessionEnd::RetryAfter(delay) => {
                let delay = Backoff::suggested(delay, rand::random());
                tracing::info!(?delay, "the control plane asked to reconnect later");
                delay
            }
            SessionEnd::Lost(reason) => {
                gateways.failed();
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
pub fn refused_as_revoked(e: &ConnectionError) -> bool {
    let revoked = TransportErrorCode::crypto(TLS_ALERT_CERTIFICATE_REVOKED);
    match e {
        ConnectionError::ConnectionClosed(close) => close.error_code == revoked,
        ConnectionError::TransportError(t) => t.code == revoked,
        _ => false,
    }
}

/// Whether a handshake failure is the control plane refusing an expired (or retired)
/// certificate.
fn refused_as_expired(e: &ConnectionError) -> bool {
    let expired = TransportErrorCode::crypto(TLS_ALERT_CERTIFICATE_EXPIRED);
    match e {
        ConnectionError::ConnectionClosed(close) => close.error_code == expired,
        ConnectionError::TransportError(t) => t.code == expired,
        _ => false,
    }
}

/// TLS alert `certificate_expired` (RFC 8446).
const TLS_ALERT_CERTIFICATE_EXPIRED: u8 = 45;

fn verdict(e: &ConnectionError) -> SessionEnd {
    if refused_as_revoked(e) {
        return SessionEnd::Revoked;
    }
    if refused_as_expired(e) {
        tracing::error!("the control plane refused this agent's certificate as expired or replaced by a renewal; if it has expired, enroll this server again");
    }
    match e {
        ConnectionError::ApplicationClosed(close) => {
            match CloseVerdict::from_application_close(close.error_code.into_inner(), &close.reason)
            {
                CloseVerdict::Stop => SessionEnd::Revoked,
                CloseVerdict::Reconnect => SessionEnd::Renewed,
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

/// What a session needs to renew its certificate: where to store it, and the plan (none when
/// the certificate's validity is unreadable).
struct Renewal<'a> {
    state: &'a StateDir,
    plan: Option<&'a mut RenewalPlan>,
}

async fn session(
    identity: &Identity,
    config: quinn::ClientConfig,
    backoff: &mut Backoff,
    jobs: &JobContext,
    renewal: Renewal<'_>,
    gateways: transport::Gateways,
) -> SessionEnd {
    let (remote, server_name) = match transport::resolve_all(&identity.meta.control_plane).await {
        Ok((addresses, name)) => match gateways.pick(&addresses) {
            Some(remote) => (remote, name),
            None => return SessionEnd::Lost("the control plane's name has no address".into()),
        },
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
    let server_id = identity.meta.server_id;
    // The hello goes out on the control stream (the connection's first) before the job loop
    // may open its first poll stream: the control plane reads a poll where it expects the
    // hello as a protocol error. `HelloSent` is the proof the job loop needs.
    let end = match ControlStream::open(&connection, server_id, crate::version().into()).await {
        Ok((control, hello)) => {
            // The control stream and the job loop share the connection; when either ends,
            // both end.
            let state = renewal.state;
            let welcomed = |_heartbeat| {
                tracing::info!(%server_id, "connected to the control plane");
                backoff.reset();
                status::record(state, |s| {
                    s.connected = true;
                    s.since = status::now();
                    s.detail = None;
                });
            };
            let state = renewal.state;
            let renewing = async {
                match renewal.plan {
                    Some(plan) => {
                        renewal_loop(&connection, hello, server_id, renewal.state, plan).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                end = control.run(welcomed) => end,
                end = job_loop(&connection, jobs, hello) => end,
                end = renewing => end,
                end = trust_loop(&connection, hello, server_id, state) => end,
                end = async {
                    crate::upgrade::send_host_facts(&connection, hello).await;
                    std::future::pending().await
                } => end,
            }
        }
        Err(end) => end,
    };
    let end = match end {
        StreamEnd::Connection => verdict(&connection.closed().await),
        StreamEnd::GiveUp { code, reason } => {
            connection.close(VarInt::from_u32(code), reason.as_bytes());
            SessionEnd::Lost(reason)
        }
    };
    connection.close(VarInt::from_u32(close::LEAVING), b"agent leaving");
    endpoint.close(VarInt::from_u32(close::LEAVING), b"agent leaving");
    end
}

/// Why a stream's driver stopped.
#[derive(Debug)]
pub enum StreamEnd {
    /// The stream or the connection failed or ended: the connection's close reason says why.
    Connection,
    /// The agent gives up on the session (the control plane broke the protocol or went
    /// silent): close the connection with `code`; `reason` says why.
    GiveUp { code: u32, reason: String },
}

impl StreamEnd {
    fn give_up(code: u32, reason: impl ToString) -> Self {
        StreamEnd::GiveUp {
            code,
            reason: reason.to_string(),
        }
    }
}

/// The agent's control stream, driven by [`AgentSession`]: hello, welcome, heartbeats.
pub struct ControlStream {
    machine: AgentSession<Instant>,
    send: quinn::SendStream,
    recv: FrameReader<quinn::RecvStream>,
}

impl ControlStream {
    /// Opens the control stream, the connection's first stream, and sends the hello on it.
    /// The [`HelloSent`] returned lets job streams open.
    pub async fn open(
        connection: &quinn::Connection,
        server_id: Uuid,
        agent_version: String,
    ) -> Result<(Self, HelloSent), StreamEnd> {
        let machine = AgentSession::new(server_id, agent_version, CONNECT_TIMEOUT, Instant::now());
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|_| StreamEnd::Connection)?;
        let mut control = Self {
            machine,
            send,
            recv: FrameReader::new(recv),
        };
        control.perform(&mut |_| {}).await?;
        // The machine's first action is the hello, performed just above.
        let hello = control
            .machine
            .hello_sent()
            .ok_or_else(|| StreamEnd::give_up(close::LEAVING, "the hello was not sent"))?;
        Ok((control, hello))
    }

    /// Waits for the welcome, then sends heartbeats until the session ends. `welcomed` is
    /// called once, with the heartbeat interval, when the control plane welcomes the session.
    pub async fn run(mut self, mut welcomed: impl FnMut(Duration)) -> StreamEnd {
        loop {
            if let Err(end) = self.perform(&mut welcomed).await {
                return end;
            }
            let deadline = self.machine.poll_timeout();
            let handled = tokio::select! {
                message = self.recv.next::<ControlMessage>() => match message {
                    Ok(Some(message)) => self.machine.handle(message, Instant::now()),
                    Ok(None) | Err(_) => return StreamEnd::Connection,
                },
                () = sleep_until(deadline) => self.machine.handle_timeout(Instant::now()),
            };
            if let Err(e) = handled {
                return StreamEnd::give_up(e.close_code(), e);
            }
        }
    }

    async fn perform(&mut self, welcomed: &mut impl FnMut(Duration)) -> Result<(), StreamEnd> {
        while let Some(action) = self.machine.poll() {
            match action {
                AgentAction::Send(message) => write_frame(&mut self.send, &message)
                    .await
                    .map_err(|_| StreamEnd::Connection)?,
                AgentAction::Established { heartbeat } => welcomed(heartbeat),
            }
        }
        Ok(())
    }
}

/// Sleeps until `deadline`, or for ever without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
