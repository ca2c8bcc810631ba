use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::Fingerprint;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A stored PEM could not be parsed.
    #[error("stored certificate material is unreadable: {0}")]
    BadPem(String),
    /// The stored key does not belong to the stored certificate.
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    /// A certificate signing request that does not parse or whose signature is wrong.
    #[error("the certificate signing request is malformed or its signature is invalid")]
    BadCsr,
}

/// A certificate and its private key, both PEM, as issued by the CA.
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// The serial number, lowercase hex.
    pub serial_hex: String,
    /// PEM of the private key. Callers encrypt it before it goes anywhere.
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// The control plane's certificate authority.
///
/// The CA certificate is kept as the exact DER first generated (operators pin its
/// fingerprint); `signer` is an equivalent rcgen object rebuilt from it to sign with.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    signer: rcgen::Certificate,
    key: KeyPair,
}

/// How long the CA itself is valid. Rotating a CA means re-enrolling every agent, so it is
/// long-lived; its key never leaves the database unencrypted.
const CA_LIFETIME: Duration = Duration::days(3650);

impl CertificateAuthority {
    /// Creates a new CA with a fresh ECDSA P-256 key.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Sensei");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            signer: cert,
            key,
        })
    }

    /// Loads a CA from the PEM it was stored as, checking that key and certificate match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::BadPem(e.to_string()))?;
        let cert_der = pem_to_der(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| CertError::BadPem(e.to_string()))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(CertError::KeyMismatch);
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| CertError::BadPem(e.to_string()))?;
        let signer = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            signer,
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// PEM of the CA's private key, for encrypted storage.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA's private key, PKCS#8 DER (for signing an endorsement).
    pub(crate) fn key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    /// Issues a TLS server certificate for `names` (DNS names or IP addresses).
    pub fn issue_server_certificate(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedCertificate, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("sensei"),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        let not_after = now + lifetime;
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key, &self.signer, &self.key)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            serial_hex: hex::encode(serial),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }

    /// Signs an agent's certificate signing request. Only the CSR's public key is used (its
    /// signature proves the agent holds the private key); every other field comes from here:
    /// the subject names the server's UUID, the certificate is for client authentication
    /// only, and it is valid from `not_before` to `not_after`.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        server_id: uuid::Uuid,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCertificate, CertError> {
        let csr = rcgen::CertificateSigningRequestParams::from_der(
            &rustls::pki_types::CertificateSigningRequestDer::from(csr_der),
        )
        .map_err(|_| CertError::BadCsr)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, server_id.to_string());
        dn.push(DnType::OrganizationName, "Sensei agent");
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&csr.public_key, &self.signer, &self.key)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            serial_hex: hex::encode(serial),
            key_pem: String::new(),
            not_after,
        })
    }
}

/// Why a renewal CSR is refused. The checks add to [`CertificateAuthority::sign_agent_csr`]'s:
/// a renewal comes from an agent that already holds a certificate, so its CSR must say exactly
/// what that certificate says (nothing else is ever copied into the new one, but a CSR naming
/// more is a sign of a confused or hostile client) and must certify a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalCsrError {
    #[error("the certificate signing request is malformed or its signature is invalid")]
    Malformed,
    #[error("the certificate signing request must name this server and nothing else")]
    WrongSubject,
    #[error("the certificate signing request reuses the current key")]
    KeyReused,
}

/// Checks a renewal CSR against the certificate it renews: its signature is valid (the agent
/// holds the new key), its subject is the server's UUID as the only attribute, it asks for no
/// extension (no alternative names), and its public key is not the current certificate's.
pub fn check_renewal_csr(
    csr_der: &[u8],
    server_id: uuid::Uuid,
    current_cert_der: &[u8],
) -> Result<(), RenewalCsrError> {
    // rcgen verifies the CSR's signature while parsing it.
    rcgen::CertificateSigningRequestParams::from_der(
        &rustls::pki_types::CertificateSigningRequestDer::from(csr_der),
    )
    .map_err(|_| RenewalCsrError::Malformed)?;
    use x509_parser::prelude::FromDer;
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|_| RenewalCsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(RenewalCsrError::Malformed);
    }
    let info = &csr.certification_request_info;
    let expected = server_id.to_string();
    let attributes: Vec<_> = info.subject.iter_attributes().collect();
    let names_server = matches!(
        attributes.as_slice(),
        [only] if *only.attr_type() == x509_parser::oid_registry::OID_X509_COMMON_NAME
            && only.as_str().ok() == Some(expected.as_str())
    );
    let asks_for_more = csr
        .requested_extensions()
        .is_some_and(|mut extensions| extensions.next().is_some());
    if !names_server || asks_for_more {
        return Err(RenewalCsrError::WrongSubject);
    }
    let (_, current) = x509_parser::parse_x509_certificate(current_cert_der)
        .map_err(|_| RenewalCsrError::Malformed)?;
    if current.public_key().raw == info.subject_pki.raw {
        return Err(RenewalCsrError::KeyReused);
    }
    Ok(())
}

/// A positive 128-bit serial number.
fn random_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

/// A fresh agent key pair and a CSR for it. The key stays on the agent's server.
pub struct AgentKeyRequest {
    /// The private key, PEM (PKCS#8). Written 0600 by the agent; never sent anywhere.
    pub key_pem: String,
    pub csr_der: Vec<u8>,
}

impl AgentKeyRequest {
    pub fn generate(hostname: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, hostname);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_der: csr.der().to_vec(),
        })
    }
}

/// The first certificate of a PEM document, as DER.
pub(crate) fn pem_to_der(pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::pem::PemObject;
    let first = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next();
    match first {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(CertError::BadPem(e.to_string())),
        None => Err(CertError::BadPem("no certificate in PEM".into())),
    }
}

/// Whether the certificate in `cert_pem` certifies the private key in `key_pem`: an agent
/// checks a renewed certificate before it replaces its identity with it.
pub fn certifies(cert_pem: &str, key_pem: &str) -> bool {
    let (Ok(der), Ok(key)) = (pem_to_der(cert_pem), KeyPair::from_pem(key_pem)) else {
        return false;
    };
    x509_parser::parse_x509_certificate(&der)
        .is_ok_and(|(_, cert)| cert.public_key().raw == key.public_key_der().as_slice())
}

/// When the certificate in `cert_pem` starts and stops being valid.
pub fn validity(cert_pem: &str) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let der = pem_to_der(cert_pem)?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadPem(e.to_string()))?;
    Ok((
        parsed.validity().not_before.to_datetime(),
        parsed.validity().not_after.to_datetime(),
    ))
}

/// When the certificate in `cert_pem` stops being valid.
pub fn not_after(cert_pem: &str) -> Result<OffsetDateTime, CertError> {
    let der = pem_to_der(cert_pem)?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::BadPem(e.to_string()))?;
    Ok(parsed.validity().not_after.to_datetime())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloaded_ca_keeps_its_fingerprint_and_signs() {
        let ca = CertificateAuthority::generate("test CA").expect("ca");
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let issued = again
            .issue_server_certificate(&["localhost".into()], Duration::days(1))
            .expect("issue");
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(not_after(&issued.cert_pem).expect("parse") > OffsetDateTime::now_utc());
    }

    #[test]
    fn agent_csr_is_signed_with_our_fields_only() {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let request = AgentKeyRequest::generate("web-1").expect("csr");
        let id = uuid::Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        let issued = ca
            .sign_agent_csr(&request.csr_der, id, now, now + Duration::days(1))
            .expect("sign");
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).expect("parse");
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .expect("cn");
        assert_eq!(cn, id.to_string());
        assert_eq!(hex::encode(cert.raw_serial()), issued.serial_hex);
        assert!(!cert.is_ca());
    }

    #[test]
    fn garbage_or_tampered_csr_is_refused() {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let now = OffsetDateTime::now_utc();
        let id = uuid::Uuid::new_v4();
        assert!(matches!(
            ca.sign_agent_csr(b"garbage", id, now, now + Duration::days(1)),
            Err(CertError::BadCsr)
        ));
        let mut csr = AgentKeyRequest::generate("web-1").expect("csr").csr_der;
        let mid = csr.len() / 2;
        csr[mid] ^= 0x01;
        assert!(ca
            .sign_agent_csr(&csr, id, now, now + Duration::days(1))
            .is_err());
    }

    #[test]
    fn a_renewal_csr_must_name_only_the_server_and_bring_a_new_key() {
        let ca = CertificateAuthority::generate("ca").expect("ca");
        let id = uuid::Uuid::new_v4();
        let now = OffsetDateTime::now_utc();
        let current_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let csr_for = |key: &KeyPair, names: Vec<String>, dn: &[(DnType, &str)]| {
            let mut params = CertificateParams::new(names).expect("params");
            let mut subject = DistinguishedName::new();
            for (kind, value) in dn {
                subject.push(kind.clone(), *value);
            }
            params.distinguished_name = subject;
            params.serialize_request(key).expect("csr").der().to_vec()
        };
        let id_text = id.to_string();
        let current = ca
            .sign_agent_csr(
                &csr_for(&current_key, vec![], &[(DnType::CommonName, "web-1")]),
                id,
                now,
                now + Duration::days(1),
            )
            .expect("current");
        let fresh = AgentKeyRequest::generate(&id_text).expect("fresh");
        assert_eq!(
            check_renewal_csr(&fresh.csr_der, id, &current.cert_der),
            Ok(())
        );
        assert_eq!(
            check_renewal_csr(
                &csr_for(&current_key, vec![], &[(DnType::CommonName, &id_text)]),
                id,
                &current.cert_der
            ),
            Err(RenewalCsrError::KeyReused)
        );
        let other = uuid::Uuid::new_v4().to_string();
        let new_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        for wrong in [
            csr_for(&new_key, vec![], &[(DnType::CommonName, &other)]),
            csr_for(
                &new_key,
                vec![],
                &[
                    (DnType::CommonName, &id_text),
                    (DnType::OrganizationName, "Sensei agent"),
                ],
            ),
            csr_for(
                &new_key,
                vec!["evil.example".into()],
                &[(DnType::CommonName, &id_text)],
            ),
            csr_for(&new_key, vec![], &[]),
        ] {
            assert_eq!(
                check_renewal_csr(&wrong, id, &current.cert_der),
                Err(RenewalCsrError::WrongSubject)
            );
        }
        let mut tampered = fresh.csr_der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        for malformed in [b"garbage".to_vec(), tampered, Vec::new()] {
            assert_eq!(
                check_renewal_csr(&malformed, id, &current.cert_der),
                Err(RenewalCsrError::Malformed)
            );
        }
        let (from, to) = validity(&current.cert_pem).expect("validity");
        assert!(from < to);
        assert!(certifies(&current.cert_pem, &current_key.serialize_pem()));
        assert!(!certifies(&current.cert_pem, &fresh.key_pem));
        assert!(!certifies("not a certificate", &fresh.key_pem));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let a = CertificateAuthority::generate("a").expect("ca");
        let b = CertificateAuthority::generate("b").expect("ca");
        assert!(matches!(
            CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem()),
            Err(CertError::KeyMismatch)
        ));
    }
}
