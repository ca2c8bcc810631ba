//! The session protocol without I/O: one state machine per side and per kind of stream, in the
//! manner of quinn-proto under quinn.
//!
//! A session is one mTLS QUIC connection of an enrolled agent. Its first bidirectional stream
//! is the **control stream**: [`AgentSession`] on the agent, [`ControlSession`] on the control
//! plane. Every further bidirectional stream, opened by the agent, is a **job stream**:
//! [`AgentJob`] and [`ControlJob`].
//!
//! ```text
//! control stream   agent: Hello ─────────────▶ control plane: checks the server id, registers
//!                         ◀───────────── Welcome { heartbeat_secs }
//!                         Heartbeat ─────────▶ (every heartbeat interval)
//!                         ◀───────────── HeartbeatAck
//! job stream       agent: Poll | JobReport ──▶ claim the next job | record the report
//!                         ◀───────────── Job (signed)
//!                         JobLog* then JobFinished | JobRefused ──▶ store lines, record
//!                         ◀───────────── JobRecorded
//! renewal stream   agent: Renew { csr } ─────▶ check, sign, record (a `ControlJob` too)
//!                         ◀───────────── Renewed { certificate } | RenewalRefused { reason }
//!                         end of stream (stored) ──▶ drain, then close with `RENEWED`
//! trust stream     agent: WatchTrust { pinned } ─▶ held open until a CA rotation
//!                         ◀───────────── CaEndorsed { new CA signed by a pinned one }
//!                         end of stream (pinned) ──▶ recorded
//! ```
//!
//! The machines read no clock and touch no socket. A driver feeds them what arrived (a
//! message, the end of a stream, a timer that fired) with the time it arrived at, then drains
//! their actions (send this, register, claim, record…) with `poll` and performs them, and
//! sleeps until `poll_timeout`. Time is any [`Instant`]: `tokio::time::Instant` in the
//! drivers, a plain [`Duration`] since an arbitrary start in the tests.
//!
//! A protocol violation is an error value whose `close_code` says how the connection (or, for a
//! job stream, the stream) ends; nothing here panics on what a peer sends.
//!
//! Timers, where `heartbeat` is the interval the control plane's welcome announces and `step`
//! is the side's step timeout (10 s on the control plane, 15 s on the agent):
//! - the control plane expects the control stream, then the hello, each within `step`;
//! - the agent expects the welcome within `step` of its hello;
//! - the agent sends a heartbeat every `heartbeat` once welcomed, the first one `heartbeat`
//!   after the welcome;
//! - a peer that is silent for [`SILENT_INTERVALS`] × `heartbeat` + `step` is given up on: the
//!   control plane closes a control stream without heartbeats, and the agent takes a
//!   connection without heartbeat acks as lost (at the default 30 s heartbeat: 100 s on the
//!   control plane, 105 s on the agent). This is a safety net on top of QUIC's 60 s idle
//!   timeout, for a peer whose connection stays alive (QUIC keep-alives) while its session
//!   logic is stuck.

use std::ops::Add;
use std::time::Duration;

mod agent;
mod control;
mod renewal;
#[cfg(test)]
mod tests;
mod trust;

pub use agent::{
    AgentAction, AgentJob, AgentJobAction, AgentJobError, AgentSession, AgentSessionError,
    HelloSent,
};
pub use control::{
    ControlAction, ControlJob, ControlJobAction, ControlJobError, ControlSession,
    ControlSessionError,
};
pub use renewal::{AgentRenewal, AgentRenewalAction, AgentRenewalError};
pub use trust::{AgentTrust, AgentTrustAction, AgentTrustError};

/// A point in time on the driver's monotonic clock.
///
/// Implemented for every type that can be compared and moved forward by a [`Duration`]:
/// `std::time::Instant`, `tokio::time::Instant`, and `Duration` itself (time since an
/// arbitrary start, which is what the tests use).
pub trait Instant: Copy + Ord + Add<Duration, Output = Self> {}

impl<T: Copy + Ord + Add<Duration, Output = T>> Instant for T {}

/// How many heartbeat intervals without a sign of the peer (plus one step timeout, for a slow
/// network or a busy peer) end a session. Three rather than one: a single heartbeat delayed
/// by a busy control plane must not cost a whole fleet its connections.
pub const SILENT_INTERVALS: u32 = 3;

/// How long a peer may stay silent on an established control stream.
fn silence_limit(heartbeat: Duration, step: Duration) -> Duration {
    heartbeat
        .saturating_mul(SILENT_INTERVALS)
        .saturating_add(step)
}

/// A driver called a machine's method in a state where it means nothing: a bug in the driver,
/// never something a peer can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} called out of order")]
pub struct OutOfOrder(pub &'static str);
