use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use uuid::Uuid;

use crate::tls::{certs_from_pem, provider, TlsConfigError};
use crate::Fingerprint;

/// What the control plane knows of an agent certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCertStatus {
    /// Issued to this server, not revoked, not expired.
    Valid(Uuid),
    /// Revoked: refused with the `certificate_revoked` alert.
    Revoked,
    /// Past its `not_after`: refused like a revoked one (the agent must enroll again).
    Expired,
    /// Replaced by a renewed certificate its agent has connected with: refused as no longer
    /// valid (the `certificate_expired` alert), never as revoked, so an agent that still
    /// presents it is not told to stop for good.
    Retired,
    /// Not known here (yet): refused, the agent retries.
    Unknown,
}

/// The live set of agent certificates, by fingerprint. Held in memory so that the handshake
/// can consult it without a database round trip; PostgreSQL is the truth, and every replica
/// keeps its copy current through LISTEN/NOTIFY.
#[derive(Debug, Default)]
pub struct AgentCertificateSet {
    inner: RwLock<Sets>,
}

#[derive(Debug, Default)]
struct Sets {
    /// Server and `not_after` (Unix seconds) of each valid certificate.
    valid: HashMap<Fingerprint, (Uuid, i64)>,
    revoked: HashSet<Fingerprint>,
    retired: HashSet<Fingerprint>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl AgentCertificateSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks a certificate valid for `server_id` until `not_after` (Unix seconds).
    pub fn allow(&self, fingerprint: Fingerprint, server_id: Uuid, not_after: i64) {
        if let Ok(mut sets) = self.inner.write() {
            // A revocation is final: an allow that arrives after it (a renewal's local update
            // racing the revocation's notification) must not bring the certificate back.
            if sets.revoked.contains(&fingerprint) {
                return;
            }
            sets.retired.remove(&fingerprint);
            sets.valid.insert(fingerprint, (server_id, not_after));
        }
    }

    /// Revokes a certificate. Returns the server it belonged to, if it was valid.
    pub fn revoke(&self, fingerprint: Fingerprint) -> Option<Uuid> {
        let mut sets = self.inner.write().ok()?;
        sets.revoked.insert(fingerprint);
        sets.valid.remove(&fingerprint).map(|(id, _)| id)
    }

    /// Retires a certificate (renewed, and its successor in use). Returns the server it
    /// belonged to, if it was valid. A revoked certificate stays revoked.
    pub fn retire(&self, fingerprint: Fingerprint) -> Option<Uuid> {
        let mut sets = self.inner.write().ok()?;
        if !sets.revoked.contains(&fingerprint) {
            sets.retired.insert(fingerprint);
        }
        sets.valid.remove(&fingerprint).map(|(id, _)| id)
    }

    /// The certificate's status now.
    pub fn status(&self, fingerprint: &Fingerprint) -> AgentCertStatus {
        self.status_at(fingerprint, unix_now())
    }

    /// The certificate's status at `now` (Unix seconds).
    pub fn status_at(&self, fingerprint: &Fingerprint, now: i64) -> AgentCertStatus {
        let Ok(sets) = self.inner.read() else {
            return AgentCertStatus::Unknown;
        };
        match sets.valid.get(fingerprint) {
            Some((id, not_after)) if now < *not_after => AgentCertStatus::Valid(*id),
            Some(_) => AgentCertStatus::Expired,
            None if sets.revoked.contains(fingerprint) => AgentCertStatus::Revoked,
            None if sets.retired.contains(fingerprint) => AgentCertStatus::Retired,
            None => AgentCertStatus::Unknown,
        }
    }

    pub fn valid_count(&self) -> usize {
        self.inner.read().map(|s| s.valid.len()).unwrap_or(0)
    }
}

/// Client-certificate verifier of the agent gateway: the chain must lead to one of the CAs
/// it trusts (webpki checks signature, validity period and key usage), and the certificate
/// must be in the [`AgentCertificateSet`]. A connection without a certificate is let through:
/// that is an enrollment, and the gateway accepts nothing else on it.
///
/// The trusted CAs change while the gateway runs ([`Self::trust`]): during a CA rotation both
/// the old and the new CA, after it only the new one.
#[derive(Debug)]
pub struct AgentClientVerifier {
    webpki: RwLock<Arc<dyn ClientCertVerifier>>,
    set: Arc<AgentCertificateSet>,
}

fn webpki_for(ca_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))
}

impl AgentClientVerifier {
    /// A verifier trusting the CAs in `ca_pem` (one or more PEM certificates).
    pub fn new(ca_pem: &str, set: Arc<AgentCertificateSet>) -> Result<Arc<Self>, TlsConfigError> {
        Ok(Arc::new(Self {
            webpki: RwLock::new(webpki_for(ca_pem)?),
            set,
        }))
    }

    /// From the next handshake on, trusts exactly the CAs in `ca_pem`.
    pub fn trust(&self, ca_pem: &str) -> Result<(), TlsConfigError> {
        let webpki = webpki_for(ca_pem)?;
        *self.webpki.write().unwrap_or_else(|p| p.into_inner()) = webpki;
        Ok(())
    }

    fn webpki(&self) -> Arc<dyn ClientCertVerifier> {
        self.webpki
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ClientCertVerifier for AgentClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    // No hints: they would have to be borrowed from a verifier that can be replaced, and an
    // agent has exactly one certificate to offer anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki()
            .verify_client_cert(end_entity, intermediates, now)?;
        match self.set.status(&Fingerprint::of_der(end_entity)) {
            AgentCertStatus::Valid(_) => Ok(ClientCertVerified::assertion()),
            AgentCertStatus::Revoked => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            AgentCertStatus::Expired | AgentCertStatus::Retired => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Expired))
            }
            AgentCertStatus::Unknown => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_revoke_and_reallow() {
        let set = AgentCertificateSet::new();
        let fp = Fingerprint::of_der(b"cert");
        let id = Uuid::new_v4();
        assert_eq!(set.status(&fp), AgentCertStatus::Unknown);
        set.allow(fp, id, unix_now() + 60);
        assert_eq!(set.status(&fp), AgentCertStatus::Valid(id));
        assert_eq!(set.revoke(fp), Some(id));
        assert_eq!(set.status(&fp), AgentCertStatus::Revoked);
        assert_eq!(set.revoke(fp), None);
        assert_eq!(set.valid_count(), 0);
        // A late allow (a renewal's local update after the revocation) changes nothing.
        set.allow(fp, id, unix_now() + 60);
        assert_eq!(set.status(&fp), AgentCertStatus::Revoked);
    }

    #[test]
    fn retired_is_not_revoked_and_revoked_stays_revoked() {
        let set = AgentCertificateSet::new();
        let (old, new) = (Fingerprint::of_der(b"old"), Fingerprint::of_der(b"new"));
        let id = Uuid::new_v4();
        set.allow(old, id, unix_now() + 60);
        set.allow(new, id, unix_now() + 60);
        assert_eq!(set.retire(old), Some(id));
        assert_eq!(set.status(&old), AgentCertStatus::Retired);
        assert_eq!(set.status(&new), AgentCertStatus::Valid(id));
        assert_eq!(set.revoke(new), Some(id));
        assert_eq!(set.retire(new), None);
        assert_eq!(set.status(&new), AgentCertStatus::Revoked);
        // Revoking a retired certificate (its server revoked) says revoked from then on.
        set.revoke(old);
        assert_eq!(set.status(&old), AgentCertStatus::Revoked);
    }

    #[test]
    fn a_certificate_expires_at_its_not_after_without_any_event() {
        let set = AgentCertificateSet::new();
        let fp = Fingerprint::of_der(b"cert");
        let id = Uuid::new_v4();
        set.allow(fp, id, 1_000);
        assert_eq!(set.status_at(&fp, 999), AgentCertStatus::Valid(id));
        assert_eq!(set.status_at(&fp, 1_000), AgentCertStatus::Expired);
        assert_eq!(set.status_at(&fp, 5_000), AgentCertStatus::Expired);
    }
}
