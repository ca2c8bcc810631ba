//! What carries a job to its server. [`agent`]: the QUIC gateway agents keep a connection to
//! (enrollment, sessions, job polls, the live certificate set). [`ssh`]: the fallback runner
//! for servers without an agent, running the same signed job over SSH. Both take their jobs
//! from, and give their results to, [`crate::jobs`].

pub mod agent;
pub mod ssh;
