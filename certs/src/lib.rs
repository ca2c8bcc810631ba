//! Sensei's public-key infrastructure.
//!
//! - [`CertificateAuthority`]: the control plane's CA (creates itself once, then is loaded
//!   from its PEM), issuing server certificates.
//! - [`Fingerprint`]: the `SHA256:<hex>` form operators pin on the command line.
//! - [`AgentCertificateSet`]: which agent certificates are valid right now; its verifier
//!   refuses revoked ones at the handshake.
//! - [`PinnedCaVerifier`]: an agent enrolling trusts the control plane by the CA fingerprint
//!   given on its command line, never on first use.
//! - [`rotation`]: a CA endorsing its successor, which agents then add to their pinned trust.
//! - [`tls`]: the only place in the workspace that builds rustls configs; every config it
//!   returns speaks TLS 1.3 and nothing older.

mod agent_set;
mod authority;
mod fingerprint;
pub mod handshake_cost;
mod pinned;
pub mod rotation;
pub mod tls;

pub use agent_set::{AgentCertStatus, AgentCertificateSet, AgentClientVerifier};
pub use authority::{
    certifies, check_renewal_csr, not_after, validity, AgentKeyRequest, CertError,
    CertificateAuthority, IssuedCertificate, RenewalCsrError,
};
pub use fingerprint::{Fingerprint, FingerprintParseError};
pub use pinned::PinnedCaVerifier;
pub use rotation::{check_endorsement, issued_by, CaEndorsement, EndorsementError};
