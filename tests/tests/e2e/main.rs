//! One test binary for every end-to-end test (one link, one shared PostgreSQL cluster).
//! One module per feature.

mod abuse;
mod access;
mod accounts;
mod admission;
mod agents;
mod api_keys;
mod audit_log;
mod audit_sinks;
mod backup;
mod cli;
mod cross_site;
mod dashboard;
mod database_tls;
mod deploys;
mod dns;
mod field_keys;
mod job_key;
mod live_follow;
mod operations;
mod renewal;
mod replicas;
mod rollouts;
mod rotation;
mod runners;
mod sensei_cli;
mod ssh;
mod sso;
mod system;
mod trust;
mod upgrades;
mod webauthn;
