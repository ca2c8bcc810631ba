//! Protocol logic shared by the control plane and the agent.
//!
//! Nothing in this crate opens a socket, touches a database or reads the clock: callers feed it
//! bytes and times, so every rule can be tested with plain values.

pub mod codec;

pub use codec::{decode, encode, CodecError, MAX_MESSAGE_LEN};
