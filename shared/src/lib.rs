//! Protocol logic shared by the control plane and the agent.
//!
//! Nothing in this crate opens a socket, touches a database or reads the clock: callers feed it
//! bytes, times and random numbers, so every rule can be tested with plain values.

pub mod admission;
pub mod backoff;
pub mod codec;
pub mod job;
pub mod job_key;
pub mod lines;
#[cfg(feature = "logging")]
pub mod logging;
pub mod protocol;
pub mod release;
pub mod renewal;
pub mod rollout;
pub mod session;
pub mod upgrade;

pub use codec::{decode, encode, CodecError, MAX_MESSAGE_LEN};
