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

/// Splits `HOST:PORT` and resolves it to its first address. The host is also the TLS server
/// name.
pub async fn resolve(address: &str) -> Result<(SocketAddr, String), TransportError> {
    let (addresses, host) = resolve_all(address).await?;
    // `resolve_all` answers at least one address or an error.
    Ok((addresses[0], host))
}

/// Splits `HOST:PORT` and resolves it to every address it names (several replicas behind
/// one DNS name), sorted so that the order does not change when a resolver rotates its
/// answers. Never empty. The host is also the TLS server name.
pub async fn resolve_all(address: &str) -> Result<(Vec<SocketAddr>, String), TransportError> {
    let (host, _port) = address
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        .ok_or_else(|| TransportError::BadAddress(address.to_owned()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let mut addresses: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|e| TransportError::Resolve {
            address: address.to_owned(),
            message: e.to_string(),
        })?
        .collect();
    addresses.sort();
    addresses.dedup();
    if addresses.is_empty() {
        return Err(TransportError::Resolve {
            address: address.to_owned(),
            message: "no address".into(),
        });
    }
    Ok((addresses, host))
}

/// Which of the control plane's addresses the next connection goes to. An agent stays on
/// the address that works, and moves to the next one after an attempt that failed or a
/// connection that was lost: a replica that died without a word (whose address still
/// resolves) is left behind at the next attempt instead of being retried forever.
#[derive(Debug, Clone, Copy)]
pub struct Gateways {
    cursor: usize,
}

impl Gateways {
    /// Starts at position `start` (a random draw, so that a fleet behind one name spreads
    /// over its addresses).
    pub fn starting_at(start: usize) -> Self {
        Self { cursor: start }
    }

    /// The address for the next connection.
    pub fn pick(&self, addresses: &[SocketAddr]) -> Option<SocketAddr> {
        match addresses.len() {
            0 => None,
            n => addresses.get(self.cursor % n).copied(),
        }
    }

    /// The last connection to the picked address failed or was lost: try the next.
    pub fn failed(&mut self) {
        self.cursor = self.cursor.wrapping_add(1);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// An agent stays on an address until a connection to it fails, then moves to the next,
    /// wrapping around; with one address it always picks that one.
    #[test]
    fn gateways_move_on_after_a_failure_and_wrap_around() {
        let addresses = [addr(1), addr(2), addr(3)];
        let mut gateways = Gateways::starting_at(1);
        assert_eq!(gateways.pick(&addresses), Some(addr(2)));
        assert_eq!(gateways.pick(&addresses), Some(addr(2)), "no failure: stay");
        gateways.failed();
        assert_eq!(gateways.pick(&addresses), Some(addr(3)));
        gateways.failed();
        assert_eq!(gateways.pick(&addresses), Some(addr(1)));
        // A name that now resolves to fewer addresses still picks one of them.
        assert_eq!(gateways.pick(&addresses[..1]), Some(addr(1)));
        assert_eq!(gateways.pick(&[]), None);
        let mut far = Gateways::starting_at(usize::MAX);
        far.failed();
        assert!(far.pick(&addresses).is_some());
    }

    /// Every address a name resolves to is kept, in a stable order.
    #[tokio::test]
    async fn every_address_of_a_name_is_resolved_in_a_stable_order() {
        let (all, host) = resolve_all("localhost:7443").await.expect("resolve");
        assert_eq!(host, "localhost");
        assert!(!all.is_empty());
        let mut sorted = all.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(all, sorted);
        let (v6, host) = resolve_all("[::1]:7443").await.expect("resolve");
        assert_eq!(
            (v6, host.as_str()),
            (vec!["[::1]:7443".parse().expect("addr")], "::1")
        );
        assert!(matches!(
            resolve_all("no-port").await,
            Err(TransportError::BadAddress(_))
        ));
    }
}
