//! Sensei's public-key infrastructure.
//!
//! - [`CertificateAuthority`]: the control plane's CA (creates itself once, then is loaded
//!   from its PEM), issuing server certificates.
//! - [`Fingerprint`]: the `SHA256:<hex>` form operators pin on the command line.
//! - [`tls`]: the only place in the workspace that builds rustls configs; every config it
//!   returns speaks TLS 1.3 and nothing older.

mod authority;
mod fingerprint;
pub mod tls;

pub use authority::{not_after, CertError, CertificateAuthority, IssuedCertificate};
pub use fingerprint::{Fingerprint, FingerprintParseError};
