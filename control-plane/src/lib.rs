//! The Sensei control plane.
//!
//! One file per concern: [`server`] wires a running control plane from the [`db`], the
//! [`pki`] and the [`api`]; secrets go through [`field_crypto`], credentials through
//! [`tokens`] and [`passwords`], and every state change through the [`audit`] writer.

pub mod admission;
pub mod agents;
pub mod api;
pub mod audit;
pub mod audit_keys;
pub mod auth;
pub mod cli;
pub mod db;
pub mod field_crypto;
pub mod https;
pub mod job_signing;
pub mod jobs;
pub mod login_throttle;
pub mod mailer;
pub mod maintenance;
pub mod metrics;
pub mod passwords;
pub mod pki;
pub mod postgres_cluster;
pub mod quickstart;
pub mod rollouts;
pub mod rotate;
pub mod server;
pub mod signup;
pub mod ssh_keys;
pub mod ssh_runner;
pub mod tokens;
pub mod totp;

pub use server::{ControlPlane, DatabaseSource, ServeOptions, StartError};
