//! What must never leave in clear: [`field_crypto`] seals credentials at rest with keys that
//! [`key_provider`] gives (from the environment, or unwrapped by an HSM), and [`rotate`]
//! moves them to a new key; [`pki`] keeps the CA that signs agent and API certificates;
//! [`job_signing`] holds the key agents pin to check jobs; [`ssh_keys`] makes and reads the
//! platform's SSH keys.

pub mod field_crypto;
pub mod job_signing;
pub mod key_provider;
pub mod pki;
pub mod rotate;
pub mod ssh_keys;
