//! Every rustls configuration in Sensei is built here, so that "TLS 1.3 only" and "one crypto
//! provider" are true by construction rather than by each caller remembering.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::authority::pem_to_der;
use crate::CertError;

/// The crypto provider used by the whole workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default. Binaries call this first thing: any crate
/// that builds a rustls config without naming a provider then gets ring, never a panic about
/// an ambiguous provider. Calling it twice is harmless.
pub fn install_default_provider() {
    let _already_installed = rustls::crypto::ring::default_provider().install_default();
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    #[error(transparent)]
    Material(#[from] CertError),
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Parses a PEM certificate chain.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| CertError::BadPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::BadPem("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            CertError::BadPem("no private key in PEM".into())
        }
        e => CertError::BadPem(e.to_string()),
    })
}

/// Server side of the HTTPS API: TLS 1.3 only, no client certificate, HTTP/1.1.
pub fn https_server_config(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client that trusts exactly one CA (given as PEM): used by the agent, the tests and the
/// quickstart's self-check. TLS 1.3 only.
pub fn client_config_trusting(ca_pem: &str) -> Result<ClientConfig, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client for a receiver a tenant runs (an audit sink): it trusts exactly the tenant's CA
/// (given as PEM) and offers TLS 1.3 first, with TLS 1.2 (rustls' AEAD, forward-secret suites
/// only) for receivers that have no 1.3 yet: the one configuration here that is not 1.3 only,
/// because the peer is not ours to upgrade.
pub fn sink_client_config(ca_pem: &str) -> Result<ClientConfig, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The agent gateway's server certificate, replaceable while the gateway runs: after a CA
/// rotation is retired, the gateway presents a certificate from the new CA from the next
/// handshake on.
#[derive(Debug)]
pub struct GatewayCertificate {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

fn certified_key(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsConfigError> {
    let key = provider()
        .key_provider
        .load_private_key(key_from_pem(key_pem)?)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        certs_from_pem(chain_pem)?,
        key,
    )))
}

impl GatewayCertificate {
    pub fn new(chain_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsConfigError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(certified_key(chain_pem, key_pem)?),
        }))
    }

    /// Presents `chain_pem` with `key_pem` from the next handshake on.
    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<(), TlsConfigError> {
        let next = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for GatewayCertificate {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Server side of the agent gateway: TLS 1.3, ALPN `alpn`, the certificate `certificate`
/// presents, client certificates checked by `verifier` (which lets certificate-less
/// enrollment connections through).
pub fn agent_gateway_config(
    certificate: Arc<GatewayCertificate>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    alpn: &[u8],
) -> Result<ServerConfig, TlsConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![alpn.to_vec()];
    // No resumption on the gateway: a resumed TLS 1.3 session does not present the client
    // certificate again, so the verifier (chain, validity period, the live valid set) would
    // not run. Every connection is a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A server verifier that trusts exactly the CA in `ca_pem`.
pub fn verifier_trusting(
    ca_pem: &str,
) -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
    Ok(verifier)
}

/// Client side of an agent connection: TLS 1.3, ALPN `alpn`, the server checked by
/// `server_verifier`, and the agent's certificate presented when it has one (enrollment
/// connections have none).
pub fn agent_client_config(
    server_verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    identity: Option<(&str, &str)>,
    alpn: &[u8],
) -> Result<ClientConfig, TlsConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier);
    let mut config = match identity {
        Some((chain_pem, key_pem)) => {
            builder.with_client_auth_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A certificate's DER as PEM (what an agent writes to its pinned trust: the bytes it
/// checked, not the text it was sent).
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The SHA-256 fingerprints of every certificate in a PEM document (none if it does not
/// parse).
pub fn fingerprints(pem: &str) -> Vec<crate::Fingerprint> {
    certs_from_pem(pem)
        .unwrap_or_default()
        .iter()
        .map(|der| crate::Fingerprint::of_der(der))
        .collect()
}

/// The DER of the first certificate in a PEM document.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, CertError> {
    pem_to_der(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CertificateAuthority;

    /// Drives a client and a server through a handshake in memory, no sockets.
    fn handshake(client: ClientConfig, server: Arc<ServerConfig>) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("write");
            s.read_tls(&mut buf.as_slice()).expect("read");
            s.process_new_packets()?;
            buf.clear();
            s.write_tls(&mut buf).expect("write");
            c.read_tls(&mut buf.as_slice()).expect("read");
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn server() -> (CertificateAuthority, Arc<ServerConfig>) {
        let ca = CertificateAuthority::generate("t").expect("ca");
        let issued = ca
            .issue_server_certificate(&["localhost".into()], time::Duration::days(1))
            .expect("issue");
        let config = https_server_config(&issued.cert_pem, &issued.key_pem).expect("config");
        (ca, config)
    }

    #[test]
    fn tls13_client_completes_handshake() {
        let (ca, config) = server();
        let client = client_config_trusting(ca.cert_pem()).expect("client");
        handshake(client, config).expect("handshake");
    }

    #[test]
    fn tls12_client_is_refused() {
        let (ca, config) = server();
        let mut roots = RootCertStore::empty();
        roots
            .add(certs_from_pem(ca.cert_pem()).expect("pem").remove(0))
            .expect("root");
        let tls12 = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let err = handshake(tls12, config).expect_err("TLS 1.2 must be refused");
        assert!(
            matches!(err, rustls::Error::PeerIncompatible(_)),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn client_trusting_another_ca_is_refused() {
        let (_, config) = server();
        let other = CertificateAuthority::generate("other").expect("ca");
        let client = client_config_trusting(other.cert_pem()).expect("client");
        assert!(handshake(client, config).is_err());
    }

    #[test]
    fn garbage_pem_is_refused() {
        assert!(certs_from_pem("not a pem").is_err());
        assert!(key_from_pem("not a pem").is_err());
    }
}
