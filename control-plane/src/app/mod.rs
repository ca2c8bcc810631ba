//! The running process: the command line ([`cli`]), start-up and wiring ([`server`]), the
//! zero-configuration [`quickstart`], the HTTPS listener ([`https`]), [`metrics`] and the
//! [`maintenance`] loop (retention and pruning).

pub mod cli;
pub mod https;
pub mod maintenance;
pub mod metrics;
pub mod quickstart;
pub mod server;
