//! Handing agents a new CA. The CA being replaced **endorses** its successor: its key signs
//! the successor's exact certificate (DER) behind a domain prefix, and an agent adds the
//! successor to its pinned trust only if that signature verifies under a CA it already pins.
//!
//! Why an endorsement rather than an X.509 cross-certificate: a cross-certificate is one more
//! CA certificate issued by the old key, which every X.509 verifier would accept as a path
//! from the old root (so it would keep the old CA in every chain the new one builds, and is a
//! thing the old key can be tricked into issuing through any certificate-signing path). The
//! endorsement is a signature no certificate can be mistaken for (the domain prefix), over
//! the successor's self-signed certificate, which the agent then pins *as is*: once the old CA
//! is retired nothing the agent trusts depends on it. It also needs no path building with a CA
//! certificate in the leaf position, which webpki refuses.

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};

use crate::tls::certs_from_pem;
use crate::{CertError, CertificateAuthority, Fingerprint};

/// Signatures cover this prefix and the successor's DER, so that an endorsement can never be
/// made from, or pass as, any other signature of a CA key (a certificate, a CRL).
const DOMAIN: &[u8] = b"sensei-ca-endorsement-v1\0";

/// The largest CA certificate an agent considers, PEM (a P-256 CA is under 1 KiB).
pub const MAX_CA_PEM_LEN: usize = 16 * 1024;

/// The largest endorsement signature accepted (an ASN.1 P-256 signature is at most 72 bytes).
pub const MAX_ENDORSEMENT_SIGNATURE_LEN: usize = 128;

/// A new CA, endorsed by the CA it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaEndorsement {
    /// The successor's self-signed certificate, PEM.
    pub ca_pem: String,
    /// Fingerprint of the endorsing (old) CA's certificate.
    pub endorser: Fingerprint,
    /// ECDSA P-256 SHA-256 (ASN.1) by the endorser's key over the domain prefix and the
    /// successor's DER.
    pub signature: Vec<u8>,
}

/// Why an endorsement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndorsementError {
    /// The endorser is not a CA this agent pins: only a pinned CA can introduce another.
    #[error("the endorsing CA {0} is not one this agent pins")]
    UnknownEndorser(Fingerprint),
    /// The signature does not verify under the endorser's key (forged, or altered).
    #[error("the endorsement's signature does not verify under the pinned CA")]
    BadSignature,
    /// What was endorsed is not one CA certificate.
    #[error("the endorsed certificate is not a CA certificate: {0}")]
    NotACa(String),
}

fn endorsed_message(successor_der: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + successor_der.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(successor_der);
    message
}

impl CertificateAuthority {
    /// Endorses `successor`: signs its certificate with this CA's key.
    pub fn endorse(&self, successor: &CertificateAuthority) -> Result<CaEndorsement, CertError> {
        let rng = SystemRandom::new();
        let signer =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &self.key_der(), &rng)
                .map_err(|e| CertError::BadPem(format!("CA key is not ECDSA P-256: {e}")))?;
        let signature = signer
            .sign(&rng, &endorsed_message(successor.cert_der()))
            .map_err(|e| CertError::BadPem(format!("cannot sign: {e}")))?;
        Ok(CaEndorsement {
            ca_pem: successor.cert_pem().to_owned(),
            endorser: self.fingerprint(),
            signature: signature.as_ref().to_vec(),
        })
    }
}

/// The raw public key (an uncompressed P-256 point) of the certificate `der`.
fn public_key(der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// Checks `endorsement` against the CAs in `pinned_pem` (one or more PEM certificates):
/// its endorser must be one of them, and the signature must verify under that CA's key.
/// Returns the endorsed CA's DER.
pub fn check_endorsement(
    pinned_pem: &str,
    endorsement: &CaEndorsement,
) -> Result<Vec<u8>, EndorsementError> {
    let endorser = certs_from_pem(pinned_pem)
        .unwrap_or_default()
        .into_iter()
        .find(|der| Fingerprint::of_der(der) == endorsement.endorser)
        .ok_or(EndorsementError::UnknownEndorser(endorsement.endorser))?;
    if endorsement.ca_pem.len() > MAX_CA_PEM_LEN
        || endorsement.signature.len() > MAX_ENDORSEMENT_SIGNATURE_LEN
    {
        return Err(EndorsementError::NotACa("too large".into()));
    }
    let successor = match certs_from_pem(&endorsement.ca_pem) {
        Ok(certs) if certs.len() == 1 => certs[0].to_vec(),
        Ok(_) => {
            return Err(EndorsementError::NotACa(
                "not exactly one certificate".into(),
            ))
        }
        Err(e) => return Err(EndorsementError::NotACa(e.to_string())),
    };
    let key = public_key(&endorser).ok_or(EndorsementError::BadSignature)?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
        .verify(&endorsed_message(&successor), &endorsement.signature)
        .map_err(|_| EndorsementError::BadSignature)?;
    // Signed, so it came from the pinned CA's holder; still, only a CA certificate is pinned.
    let (_, parsed) = x509_parser::parse_x509_certificate(&successor)
        .map_err(|e| EndorsementError::NotACa(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(EndorsementError::NotACa(
            "basicConstraints says no CA".into(),
        ));
    }
    Ok(successor)
}

/// Whether the certificate `cert_der` was signed by the CA `ca_der` (its issuer names the CA
/// and the CA's key verifies its signature). Both are P-256 here; anything else is `false`.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert_der),
        x509_parser::parse_x509_certificate(ca_der),
    ) else {
        return false;
    };
    if cert.issuer().as_raw() != ca.subject().as_raw() {
        return false;
    }
    UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        ca.public_key().subject_public_key.data.as_ref(),
    )
    .verify(
        cert.tbs_certificate.as_ref(),
        cert.signature_value.data.as_ref(),
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (CertificateAuthority, CertificateAuthority) {
        (
            CertificateAuthority::generate("old").expect("old"),
            CertificateAuthority::generate("new").expect("new"),
        )
    }

    #[test]
    fn an_endorsement_by_a_pinned_ca_is_accepted() {
        let (old, new) = pair();
        let endorsement = old.endorse(&new).expect("endorse");
        assert_eq!(
            check_endorsement(old.cert_pem(), &endorsement).expect("accepted"),
            new.cert_der()
        );
        // The pinned trust may hold several CAs; the endorser is found among them.
        let other = CertificateAuthority::generate("other").expect("other");
        let bundle = format!("{}{}", other.cert_pem(), old.cert_pem());
        assert!(check_endorsement(&bundle, &endorsement).is_ok());
    }

    #[test]
    fn a_self_endorsed_or_foreign_or_altered_ca_is_refused() {
        let (old, new) = pair();
        // The attacker's CA endorses itself, naming the pinned CA as the endorser.
        let mut forged = new.endorse(&new).expect("self");
        forged.endorser = old.fingerprint();
        assert_eq!(
            check_endorsement(old.cert_pem(), &forged),
            Err(EndorsementError::BadSignature)
        );
        // Endorsed by a CA the agent does not pin.
        let honest_but_foreign = new.endorse(&old).expect("foreign");
        assert_eq!(
            check_endorsement(old.cert_pem(), &honest_but_foreign),
            Err(EndorsementError::UnknownEndorser(new.fingerprint()))
        );
        // A genuine endorsement with another CA put in its place.
        let mut swapped = old.endorse(&new).expect("endorse");
        let evil = CertificateAuthority::generate("evil").expect("evil");
        swapped.ca_pem = evil.cert_pem().to_owned();
        assert_eq!(
            check_endorsement(old.cert_pem(), &swapped),
            Err(EndorsementError::BadSignature)
        );
        // Two certificates where one belongs.
        let mut doubled = old.endorse(&new).expect("endorse");
        doubled.ca_pem = format!("{}{}", new.cert_pem(), evil.cert_pem());
        assert!(matches!(
            check_endorsement(old.cert_pem(), &doubled),
            Err(EndorsementError::NotACa(_))
        ));
        // A signature of the old key over the bare DER (no domain prefix) is not one.
        let mut truncated = old.endorse(&new).expect("endorse");
        truncated.signature.truncate(10);
        assert_eq!(
            check_endorsement(old.cert_pem(), &truncated),
            Err(EndorsementError::BadSignature)
        );
    }

    #[test]
    fn issued_by_tells_which_ca_signed_a_certificate() {
        let (old, new) = pair();
        let now = time::OffsetDateTime::now_utc();
        let request = crate::AgentKeyRequest::generate("x").expect("key");
        let id = uuid::Uuid::new_v4();
        let by_old = old
            .sign_agent_csr(&request.csr_der, id, now, now + time::Duration::days(1))
            .expect("old");
        let by_new = new
            .sign_agent_csr(&request.csr_der, id, now, now + time::Duration::days(1))
            .expect("new");
        assert!(issued_by(&by_old.cert_der, old.cert_der()));
        assert!(!issued_by(&by_old.cert_der, new.cert_der()));
        assert!(issued_by(&by_new.cert_der, new.cert_der()));
        assert!(!issued_by(&by_new.cert_der, old.cert_der()));
        assert!(!issued_by(b"garbage", old.cert_der()));
        // Same name, other key: the signature decides, not the issuer's name.
        let twin = CertificateAuthority::generate("old").expect("twin");
        assert!(!issued_by(&by_old.cert_der, twin.cert_der()));
    }
}
