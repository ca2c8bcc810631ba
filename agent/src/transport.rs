//! QUIC plumbing shared by enrollment and sessions: resolving the control plane's address and
//! building client configurations (TLS from `sensei-certs`, transport settings here).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use sensei_shared::protocol::ALPN;

/// Sent when nothing else is, so that NAT bindings and the control plane's idle timer stay
/// fresh.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a connection could not be set up (before any protocol exchange).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error("control plane address {0:?} must be HOST:PORT")]
    BadAddress(String),
    #[error("cannot resolve {address}: {message}")]
    Resolve { address: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot open a UDP socket: {0}")]
    Socket(String),
}

/// Splits `HOST:PORT` and resolves it. The host is also the TLS server name.
pub async fn resolve(address: &str) -> Result<(SocketAddr, String), TransportError> {
    let (host, _port) = address
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| TransportError::BadAddress(address.to_owned()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| TransportError::Resolve {
            address: address.to_owned(),
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| TransportError::Resolve {
            address: address.to_owned(),
            message: "no address".into(),
        })?;
    Ok((addr, host))
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn endpoint(remote: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    let local: SocketAddr = if remote.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| TransportError::Socket("address".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| TransportError::Socket("address".into()))?
    };
    quinn::Endpoint::client(local).map_err(|e| TransportError::Socket(e.to_string()))
}

/// A QUIC client configuration around a rustls one.
pub fn client_config(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: Option<(&str, &str)>,
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = sensei_certs::tls::agent_client_config(verifier, identity, ALPN)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        transport.max_idle_timeout(Some(idle));
    }
    config.transport_config(Arc::new(transport));
    Ok(config)
}
