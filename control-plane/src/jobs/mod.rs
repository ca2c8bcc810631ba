//! The life of a job, one file per stage, in the order a job travels:
//!
//! 1. [`queue`]: a deploy or rollback someone asked for, a rollout's batch, or a deleted
//!    project's `forget_env` jobs are queued in the caller's transaction, each with its
//!    server's next sequence number.
//! 2. [`wake`]: the queueing transaction notifies every replica; the poll of the server's
//!    agent (or the SSH runner) wakes up.
//! 3. [`claim`]: the job is claimed for whoever runs it, agent or SSH, under one rule: a
//!    server runs one job at a time, oldest first. Agents' claims go through [`batch`], one
//!    statement for every poll waiting at that moment.
//! 4. [`sign`]: the claimed job becomes a signed envelope bound to its server and to the
//!    credential receiving it.
//! 5. [`record`]: log lines and the result come back and are stored; an end is final. Jobs
//!    also end here without a result: agent gone mid-deploy, certificate revoked, project
//!    deleted.
//! 6. [`sweep`]: what nobody will end is ended: queued jobs nobody collected, running jobs
//!    of a replica that died.
//!
//! [`history`] reads jobs back for the API. This module is the only one that touches the
//! `deployments` table; the words it stores
//! (kind, status, step) are the enums of [`model`].

pub mod batch;
pub mod claim;
pub mod history;
mod model;
pub mod queue;
pub mod record;
pub mod sign;
pub mod sweep;
pub mod wake;

pub use model::{JobKind, JobStatus, Step, UnknownValue};
