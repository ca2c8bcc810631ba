//! The agent gateway: one QUIC endpoint (TLS 1.3, ALPN `sensei/1`). A connection without a
//! client certificate is an enrollment and may only enroll; a connection with one is a
//! session, admitted only if its certificate chains to our CA and is in the live valid set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{close, EnrollRequest, ALPN};
use tokio::sync::watch;

use sensei_shared::admission::{self, Decision, HandshakeAdmission};

use super::{enroll, session, AgentHub};

/// How long a peer may take for each step before it is dropped.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a silent connection is kept: what agents ask for (QUIC uses the lower of both
/// sides' idle timeouts). The operator may shorten it (`GatewayContext::idle_timeout`).
pub const IDLE_TIMEOUT: Duration =
    Duration::from_secs(sensei_shared::protocol::AGENT_IDLE_TIMEOUT_SECS as u64);

/// What the gateway's handlers share.
pub struct GatewayContext {
    pub pool: Pool,
    /// The CAs: which issues, which are trusted, which the gateway presents.
    pub authority: Arc<super::authority::Authority>,
    pub hub: Arc<AgentHub>,
    pub heartbeat: Duration,
    /// A connection silent this long is over, on both sides: how long a crashed replica's
    /// agents take to notice and move on, and how long a network outage a connection
    /// survives. At most [`IDLE_TIMEOUT`]; checked against the heartbeat at start
    /// ([`sensei_shared::protocol::check_liveness`]).
    pub idle_timeout: Duration,
    /// How long agent certificates are valid (enrolled or renewed).
    pub agent_cert_lifetime: Duration,
    /// Sign jobs (reloaded when the key rotates).
    pub job_keys: Arc<crate::secrets::job_signing::JobKeys>,
    /// Opens projects' environments at dispatch.
    pub keys: std::sync::Arc<crate::secrets::field_crypto::FieldKeys>,
    /// Claims and results of jobs, in batches.
    pub jobs: crate::jobs::batch::JobBatches,
    /// Which agents are connected here, written in batches.
    pub presence: super::presence::Presence,
    /// Handshakes admitted per second, fixed by the operator; `None`: the measured reconnect
    /// rate ([`AgentHub::reconnect_rate`]) with [`admission::HEADROOM`].
    pub handshake_rate: Option<f64>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    #[error("agent gateway TLS: {0}")]
    Tls(#[from] sensei_certs::tls::TlsConfigError),
    #[error("agent gateway QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot listen for agents on UDP {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
}

/// Binds the endpoint. Its certificate and the CAs it trusts are the authority's, and follow
/// a CA rotation.
pub fn bind(addr: SocketAddr, ctx: &GatewayContext) -> Result<quinn::Endpoint, GatewayError> {
    let tls = sensei_certs::tls::agent_gateway_config(
        ctx.authority.certificate.clone(),
        ctx.authority.verifier.clone(),
        ALPN,
    )?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| GatewayError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            ctx.idle_timeout
                .min(IDLE_TIMEOUT)
                .try_into()
                .map_err(|_| GatewayError::Quic("idle timeout out of range".into()))?,
        ))
        // A control stream plus a few job polls; agents never open unidirectional streams.
        .max_concurrent_bidi_streams(VarInt::from_u32(8))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // Segmentation offload batches up to ten packets per send, and every connection keeps
        // a send buffer sized for the batch (about 13 KiB, a third of an idle agent's memory
        // here: docs/benchmarks.md). An agent's connection sends a few small packets at a
        // time; one packet per send costs nothing measurable.
        .enable_segmentation_offload(false)
        // No unreliable datagrams are used: none are accepted.
        .datagram_receive_buffer_size(None);
    config.transport_config(Arc::new(transport));
    // A client asked for a stateless retry may then be deferred by admission, and QUIC's probe
    // timer doubles between its retransmissions (1 s, 2 s, 4 s, 8 s…): with quinn's default
    // 15 s lifetime its token could expire while it waits, which ends its attempt with a fatal
    // INVALID_TOKEN. The token stays bound to the client's address; it now lives as long as
    // the gateway would wait for any silent peer.
    config.retry_token_lifetime(IDLE_TIMEOUT);
    let bind_error = |e: std::io::Error| GatewayError::Bind {
        addr,
        message: e.to_string(),
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_error)?;
    if addr.is_ipv6() {
        // Dual-stack where the address allows it, as quinn's own bind does.
        let _ = socket.set_only_v6(false);
    }
    set_buffers(&socket);
    socket.bind(&addr.into()).map_err(bind_error)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| GatewayError::Quic("no async runtime for the gateway".into()))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        runtime,
    )
    .map_err(bind_error)
}

/// Socket buffer size asked for. A reconnecting fleet sends thousands of handshakes a second,
/// and a fleet answering a rollout all at once a burst of results: what the buffer cannot hold
/// is dropped, and each drop costs the agent a retransmission timeout of a second or more.
/// With 4 MiB the gateway still dropped 19,691 datagrams in a rollout to 10,000 agents, and in
/// one to 100,000 some agents lost enough in a row to time out (docs/benchmarks.md). The
/// package raises the kernel's ceiling to this (`60-sensei-control-plane.conf`).
pub const SOCKET_BUFFER: usize = 32 << 20;

fn set_buffers(socket: &socket2::Socket) {
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it granted, capped by net.core.rmem_max.
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < SOCKET_BUFFER {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER,
            "the agent gateway's UDP receive buffer is small; raise net.core.rmem_max and \
             net.core.wmem_max to 33554432 (sysctl; the Debian package does) so that a \
             reconnecting fleet's handshakes and a rollout's results are not dropped"
        );
    }
}

/// Accepts connections until `shutdown`, admitting new handshakes at the rate this machine
/// sustains ([`HandshakeAdmission`]).
pub async fn run(
    endpoint: quinn::Endpoint,
    ctx: Arc<GatewayContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission_rate = |ctx: &GatewayContext| {
        ctx.handshake_rate
            .unwrap_or_else(|| ctx.hub.reconnect_rate() * admission::HEADROOM)
    };
    let mut admission = HandshakeAdmission::new(admission_rate(&ctx), Instant::now());
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
            _ = shutdown.changed() => break,
        };
        let now = Instant::now();
        let rate = admission_rate(&ctx);
        if rate != admission.rate() {
            admission.set_rate(rate, now);
        }
        let validated = incoming.remote_address_validated();
        match admission.decide(now, validated, incoming.may_retry()) {
            Decision::Admit => {}
            Decision::Retry => {
                // Prove the address first: one MAC, no state. A forged one never answers.
                ctx.hub.handshake_retried();
                if let Err(refused) = incoming.retry() {
                    refused.into_incoming().ignore();
                }
                continue;
            }
            Decision::Defer => {
                // Past the rate: no answer, no state, no cryptography. The client retransmits.
                ctx.hub.handshake_deferred();
                incoming.ignore();
                continue;
            }
        }
        let ctx = ctx.clone();
        tokio::spawn(async move { handle(incoming, ctx).await });
    }
}

async fn handle(incoming: quinn::Incoming, ctx: Arc<GatewayContext>) {
    let peer = incoming.remote_address();
    let handshake = match tokio::time::timeout(STEP_TIMEOUT, incoming).await {
        Ok(done) => done,
        Err(_) => {
            tracing::debug!(%peer, "agent handshake timed out");
            return;
        }
    };
    let connection = match handshake {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "agent handshake refused");
            return;
        }
    };
    let leaf = connection
        .peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    // Boxed: this task lives as long as the session, and an unboxed enrollment future would
    // make every session's task as large as an enrollment (memory per agent: benchmarks.md).
    match leaf {
        None => Box::pin(enrollment(connection, &ctx, peer)).await,
        Some(leaf) => Box::pin(session::run(connection, leaf, &ctx)).await,
    }
}

/// An unauthenticated connection: exactly one enrollment request, then the end.
async fn enrollment(connection: quinn::Connection, ctx: &GatewayContext, peer: SocketAddr) {
    let protocol_error = |connection: &quinn::Connection, why: &str| {
        connection.close(VarInt::from_u32(close::PROTOCOL_ERROR), why.as_bytes());
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(STEP_TIMEOUT, connection.accept_bi()).await
    else {
        protocol_error(&connection, "expected an enrollment request");
        return;
    };
    let request =
        match tokio::time::timeout(STEP_TIMEOUT, read_frame::<EnrollRequest, _>(&mut recv)).await {
            Ok(Ok(Some(request))) => request,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "malformed enrollment request");
                protocol_error(&connection, "malformed enrollment request");
                return;
            }
            _ => {
                protocol_error(&connection, "expected an enrollment request");
                return;
            }
        };
    let response = enroll::process(ctx, request, peer.ip()).await;
    if write_frame(&mut send, &response).await.is_ok() {
        let _ = send.finish();
        // Let the agent read the answer and close; do not wait for ever.
        let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
    }
    connection.close(VarInt::from_u32(close::DONE), b"enrollment finished");
}
