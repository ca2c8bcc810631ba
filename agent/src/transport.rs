//! QUIC plumbing shared by enrollment and sessions: resolving the control plane's address and
//! building client configurations (TLS from `sensei-certs`, transport settings here).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use sensei_shared::protocol::{self, ALPN};

/// A QUIC PING after this long without a packet from the control plane. An idle agent's
/// liveness signal is the heartbeat the control plane chooses in its welcome (30 s by
/// default): it and its answer keep NAT bindings and both sides' idle timers fresh, so this
/// is only a floor for a heartbeat chosen longer. quinn restarts the timer on every packet it
/// receives, so while heartbeats are answered more often than this it never fires. At 15 s it
/// fired once or twice between two default heartbeats: four of the seven packets an idle
/// agent cost the gateway every 30 s (docs/benchmarks.md). Behind a NAT that forgets UDP
/// mappings in less than 30 s, the operator lowers the heartbeat.
pub const KEEP_ALIVE: Duration = Duration::from_secs(protocol::AGENT_KEEP_ALIVE_SECS as u64);
/// What the agent asks for; the control plane may shorten it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(protocol::AGENT_IDLE_TIMEOUT_SECS as u64);
// Heartbeats at the default interval keep the keep-alive quiet, with room for a late one.
const _: () = assert!(
    protocol::AGENT_KEEP_ALIVE_SECS >= protocol::DEFAULT_HEARTBEAT_SECS + 10
        && protocol::AGENT_KEEP_ALIVE_SECS + protocol::LIVENESS_SPARE_SECS
            <= protocol::AGENT_IDLE_TIMEOUT_SECS
);
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
    client_config_timed(verifier, identity, KEEP_ALIVE, IDLE_TIMEOUT)
}

fn client_config_timed(
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: Option<(&str, &str)>,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TransportError> {
    let tls = sensei_certs::tls::agent_client_config(verifier, identity, ALPN)
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = idle_timeout.try_into() {
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

    /// The keep-alive stays quiet while heartbeats are answered and fills in when they stop,
    /// keeping the connection past its idle timeout: what lets an idle agent cost the gateway
    /// a heartbeat, its answer and an acknowledgement, and no PINGs. Real QUIC on loopback,
    /// with the production timers scaled down (heartbeats well inside the keep-alive, the
    /// keep-alive well inside the idle timeout).
    #[tokio::test]
    async fn the_keep_alive_fires_only_when_heartbeats_stop() {
        const HEARTBEAT: Duration = Duration::from_millis(100);
        // Heartbeats every 100 ms against a 3 s keep-alive: a PING in the first phase needs
        // the test stalled for 2.9 s, not a slow machine.
        const KEEP_ALIVE: Duration = Duration::from_secs(3);
        const IDLE: Duration = Duration::from_secs(8);
        let ca = sensei_certs::CertificateAuthority::generate("keep-alive test").expect("ca");
        let issued = ca
            .issue_server_certificate(&["localhost".into()], time::Duration::hours(1))
            .expect("server certificate");
        let mut tls = rustls::ServerConfig::builder_with_provider(sensei_certs::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(
                sensei_certs::tls::certs_from_pem(&issued.cert_pem).expect("chain"),
                sensei_certs::tls::key_from_pem(&issued.key_pem).expect("key"),
            )
            .expect("server TLS");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut server_transport = quinn::TransportConfig::default();
        server_transport.max_idle_timeout(Some(IDLE.try_into().expect("idle")));
        server_config.transport_config(Arc::new(server_transport));
        let server = quinn::Endpoint::server(server_config, addr(0)).expect("bind");
        let server_addr = server.local_addr().expect("address");
        // The control plane's side: answers every heartbeat byte, sends nothing of its own.
        let answering = tokio::spawn(async move {
            let connection = server.accept().await?.await.ok()?;
            let (mut send, mut recv) = connection.accept_bi().await.ok()?;
            let mut byte = [0u8; 1];
            while recv.read_exact(&mut byte).await.is_ok() {
                send.write_all(&byte).await.ok()?;
            }
            Some(connection)
        });

        let verifier = sensei_certs::tls::verifier_trusting(ca.cert_pem()).expect("verifier");
        let config = client_config_timed(verifier, None, KEEP_ALIVE, IDLE).expect("config");
        let mut client = endpoint(server_addr).expect("client endpoint");
        client.set_default_client_config(config);
        let connection = client
            .connect(server_addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = connection.open_bi().await.expect("stream");
        async fn heartbeat(send: &mut quinn::SendStream, recv: &mut quinn::RecvStream) {
            send.write_all(&[1]).await.expect("heartbeat");
            recv.read_exact(&mut [0u8; 1]).await.expect("answer");
            tokio::time::sleep(HEARTBEAT).await;
        }
        // Path MTU probes count as PINGs too; they are over after the first round trips.
        for _ in 0..5 {
            heartbeat(&mut send, &mut recv).await;
        }
        let pings = || connection.stats().frame_tx.ping;
        let before = pings();
        let heartbeats_end = tokio::time::Instant::now() + KEEP_ALIVE * 2;
        while tokio::time::Instant::now() < heartbeats_end {
            heartbeat(&mut send, &mut recv).await;
        }
        assert_eq!(
            pings(),
            before,
            "no keep-alive while heartbeats are answered"
        );

        // Silence for longer than the idle timeout: the keep-alive holds the connection.
        tokio::time::sleep(IDLE + KEEP_ALIVE).await;
        assert_eq!(connection.close_reason(), None, "still connected");
        assert!(
            pings() >= before + 2,
            "keep-alives filled the silence: {} PINGs",
            pings() - before
        );
        heartbeat(&mut send, &mut recv).await;
        drop((send, recv));
        connection.close(0u32.into(), b"done");
        assert!(answering.await.expect("server task").is_some());
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
