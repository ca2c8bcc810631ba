//! What a full agent handshake costs on this machine, measured rather than assumed.
//!
//! The gateway's capacity for new connections is bounded by the handshake's public-key work:
//! per connection the server makes an ephemeral key share, signs with its certificate's key
//! and verifies the agent's certificate chain and signature. A restarting control plane
//! spreads its fleet's return over a window sized from this figure (a slower machine gets a
//! proportionally longer window instead of dropped packets), and `sensei-loadgen handshakes`
//! reports it as the machine's physical limit.
//!
//! The measurement runs complete TLS 1.3 handshakes in memory with the configurations the
//! gateway and the agent use (`tls::agent_gateway_config`, `tls::agent_client_config`, an
//! `AgentClientVerifier` over a live set holding the agent's certificate), and counts the CPU
//! time of the calling thread spent on each side, so the result does not depend on what the
//! other cores are doing.

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, ServerConnection};
use uuid::Uuid;

use crate::tls::TlsConfigError;
use crate::tls::{
    agent_client_config, agent_gateway_config, verifier_trusting, GatewayCertificate,
};
use crate::Fingerprint;
use crate::{AgentCertificateSet, AgentClientVerifier, AgentKeyRequest, CertificateAuthority};

/// CPU time one full mutual-TLS handshake costs each side, on one core.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandshakeCost {
    pub server: Duration,
    pub client: Duration,
    /// Handshakes measured.
    pub rounds: u32,
}

impl HandshakeCost {
    /// Full handshakes per second one core can serve (server side only).
    pub fn server_per_core_per_sec(&self) -> f64 {
        1.0 / self.server.as_secs_f64().max(1e-9)
    }
}

/// Why the measurement could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeCostError {
    #[error("certificates for the measurement: {0}")]
    Certificates(#[from] crate::CertError),
    #[error("TLS configuration for the measurement: {0}")]
    Config(#[from] TlsConfigError),
    #[error("measurement handshake failed: {0}")]
    Handshake(#[from] rustls::Error),
    #[error("the thread's CPU clock: {0}")]
    Clock(String),
}

fn thread_cpu() -> Result<Duration, HandshakeCostError> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_err(|e| HandshakeCostError::Clock(e.to_string()))?;
    Ok(Duration::from(t))
}

/// Runs `rounds` full handshakes (after one warm-up) with a throwaway CA, gateway certificate
/// and agent certificate of the kinds the product issues (ECDSA P-256), and returns the mean
/// CPU time of each side. Blocking: about 1.5 ms of CPU per round on a current x86 core.
pub fn measure(rounds: u32) -> Result<HandshakeCost, HandshakeCostError> {
    let ca = CertificateAuthority::generate("sensei handshake measurement")?;
    let gateway = ca.issue_server_certificate(&["localhost".into()], time::Duration::hours(1))?;
    let now = time::OffsetDateTime::now_utc();
    let server_id = Uuid::new_v4();
    let request = AgentKeyRequest::generate("measurement")?;
    let agent = ca.sign_agent_csr(
        &request.csr_der,
        server_id,
        now - time::Duration::minutes(5),
        now + time::Duration::hours(1),
    )?;
    let set = Arc::new(AgentCertificateSet::new());
    set.allow(
        Fingerprint::of_der(&agent.cert_der),
        server_id,
        (now + time::Duration::hours(1)).unix_timestamp(),
    );
    let server_config = Arc::new(agent_gateway_config(
        GatewayCertificate::new(&gateway.cert_pem, &gateway.key_pem)?,
        AgentClientVerifier::new(ca.cert_pem(), set)?,
        b"sensei-measure",
    )?);
    let client_config = Arc::new(agent_client_config(
        verifier_trusting(ca.cert_pem())?,
        Some((&agent.cert_pem, &request.key_pem)),
        b"sensei-measure",
    )?);
    let mut total = HandshakeCost {
        server: Duration::ZERO,
        client: Duration::ZERO,
        rounds: 0,
    };
    for round in 0..=rounds {
        let (server, client) = one_handshake(&server_config, &client_config)?;
        if round > 0 {
            total.server += server;
            total.client += client;
            total.rounds += 1;
        }
    }
    let n = total.rounds.max(1);
    Ok(HandshakeCost {
        server: total.server / n,
        client: total.client / n,
        rounds: total.rounds,
    })
}

/// One handshake over in-memory buffers; CPU time of the server's and the client's calls.
fn one_handshake(
    server_config: &Arc<rustls::ServerConfig>,
    client_config: &Arc<rustls::ClientConfig>,
) -> Result<(Duration, Duration), HandshakeCostError> {
    let mut server_cpu = Duration::ZERO;
    let mut client_cpu = Duration::ZERO;
    let started = thread_cpu()?;
    let name = rustls::pki_types::ServerName::try_from("localhost")
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut client = ClientConnection::new(client_config.clone(), name)?;
    let mut to_server = Vec::new();
    client.write_tls(&mut to_server).map_err(io_error)?;
    client_cpu += thread_cpu()? - started;

    let started = thread_cpu()?;
    let mut server = ServerConnection::new(server_config.clone())?;
    server_cpu += thread_cpu()? - started;
    // A handshake is a few flights; a bound keeps a broken exchange from spinning.
    for _ in 0..8 {
        let started = thread_cpu()?;
        let mut to_client = Vec::new();
        server
            .read_tls(&mut to_server.as_slice())
            .map_err(io_error)?;
        to_server.clear();
        server.process_new_packets()?;
        while server.wants_write() {
            server.write_tls(&mut to_client).map_err(io_error)?;
        }
        server_cpu += thread_cpu()? - started;

        let started = thread_cpu()?;
        if !to_client.is_empty() {
            client
                .read_tls(&mut to_client.as_slice())
                .map_err(io_error)?;
            client.process_new_packets()?;
        }
        while client.wants_write() {
            client.write_tls(&mut to_server).map_err(io_error)?;
        }
        client_cpu += thread_cpu()? - started;
        if !client.is_handshaking() && !server.is_handshaking() && to_server.is_empty() {
            return Ok((server_cpu, client_cpu));
        }
    }
    Err(rustls::Error::General("the measurement handshake did not finish".into()).into())
}

fn io_error(e: std::io::Error) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handshake_costs_both_sides_some_cpu() {
        let cost = measure(3).expect("measure");
        assert_eq!(cost.rounds, 3);
        // Public-key operations on both sides: well above a microsecond, well below a second.
        assert!(cost.server > Duration::from_micros(20), "{cost:?}");
        assert!(cost.client > Duration::from_micros(20), "{cost:?}");
        assert!(cost.server < Duration::from_secs(1), "{cost:?}");
        assert!(cost.server_per_core_per_sec() > 1.0);
    }
}
