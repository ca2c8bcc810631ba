use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore};

use crate::tls::provider;
use crate::Fingerprint;

/// Verifies the control plane during enrollment, before the agent has the CA certificate:
/// the chain the server presents must contain a CA whose SHA-256 fingerprint is the one
/// given on the agent's command line, and the server certificate must verify against that
/// CA (signature, validity, host name). No trust on first use.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<String>>,
    presented: Mutex<Vec<Fingerprint>>,
}

impl PinnedCaVerifier {
    pub fn new(pin: Fingerprint) -> Arc<Self> {
        Arc::new(Self {
            pin,
            provider: provider(),
            failure: Mutex::new(None),
            presented: Mutex::new(Vec::new()),
        })
    }

    /// The fingerprints of the certificates the server presented after its own, in the order
    /// sent (its CA among them), from the last handshake: what a client shows a person
    /// before they decide to pin one.
    pub fn presented(&self) -> Vec<Fingerprint> {
        self.presented.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Why the last verification failed, in words for the operator.
    pub fn last_failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn fail(&self, reason: String) -> rustls::Error {
        if let Ok(mut f) = self.failure.lock() {
            *f = Some(reason.clone());
        }
        rustls::Error::General(reason)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut presented) = self.presented.lock() {
            *presented = intermediates
                .iter()
                .map(|c| Fingerprint::of_der(c))
                .collect();
        }
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c) == self.pin)
        else {
            let offered: Vec<String> = intermediates
                .iter()
                .map(|c| Fingerprint::of_der(c).to_string())
                .collect();
            return Err(self.fail(format!(
                "the control plane's CA does not match the pinned fingerprint {} (it presented {})",
                self.pin,
                if offered.is_empty() {
                    "no CA".into()
                } else {
                    offered.join(", ")
                }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| self.fail(format!("the pinned CA certificate is unusable: {e}")))?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| self.fail(e.to_string()))?;
        webpki
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
            .map_err(|e| self.fail(format!("the control plane's certificate is not valid: {e}")))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
