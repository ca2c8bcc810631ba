//! The Sensei agent, one module per step: [`identity`] is what it keeps on disk,
//! [`enroll`] obtains that identity, [`session`] keeps the connection to the control plane,
//! [`renew`] renews the certificate over it, [`trust`] follows a CA rotation, [`cli`] is the
//! command line.

pub mod cli;
pub mod config;
pub mod enroll;
pub mod execute;
pub mod identity;
pub mod jobs;
pub mod policy;
pub mod renew;
pub mod session;
pub mod status;
pub mod transport;
pub mod trust;
pub mod upgrade;
pub mod version;

/// This agent's version, as reported to the control plane: the binary's stamp, if the
/// packaging stamped one, else the version it was compiled as ([`version`]).
pub fn version() -> &'static str {
    version::current()
}
