//! The messages agents and the control plane exchange over QUIC, and what a connection close
//! means. Encoded with [`crate::codec`].
//!
//! Two kinds of connection share one endpoint and one ALPN:
//! - **enrollment**: the agent has no certificate yet. It opens one bidirectional stream,
//!   sends [`EnrollRequest`], reads [`EnrollResponse`], and the connection ends.
//! - **session**: the agent presents its certificate. Its first bidirectional stream is the
//!   control stream: [`AgentMessage::Hello`], answered with [`ControlMessage::Welcome`], then
//!   heartbeats, each answered with [`ControlMessage::HeartbeatAck`]. Jobs travel on further
//!   streams the agent opens to long-poll, after the hello; a certificate renewal
//!   ([`AgentMessage::Renew`]) is one more such stream. The order of messages, the timers and
//!   what breaks the protocol are the state machines of [`crate::session`].
//!
//! Compatibility: variants are only ever appended at the end of [`AgentMessage`] and
//! [`ControlMessage`] (the codec numbers them in order), so an older peer still reads every
//! message it knows. A control plane older than renewal cannot decode `Renew`: it drops that
//! one stream, and the agent backs off ([`crate::session::AgentRenewal`]). The same holds for
//! `WatchTrust` (CA rotation): an older control plane drops that stream and the agent stops
//! watching for the rest of the session; an older agent never asks, so it is never sent
//! `CaEndorsed`.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::release::{Outcome, ScriptExit};

/// ALPN of every Sensei agent connection.
pub const ALPN: &[u8] = b"sensei/1";

/// The heartbeat interval a control plane offers in its welcome unless its operator chose
/// another (`--agent-heartbeat-secs`). A heartbeat and its answer are an idle agent's only
/// traffic: the agent's QUIC keep-alive is set above this so that it never fires while they
/// flow.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 30;

/// The QUIC idle timeout agents ask for. QUIC uses the lower of both sides' values, so a
/// control plane may shorten it (`--agent-idle-timeout-secs`), never lengthen it.
pub const AGENT_IDLE_TIMEOUT_SECS: u16 = 60;

/// The agent's QUIC keep-alive: a PING after this long without a packet from the control
/// plane. It only fills in for a heartbeat chosen longer than this (quinn restarts it on every
/// packet received, so answered heartbeats keep it quiet). Agents before this constant used
/// 15 s.
pub const AGENT_KEEP_ALIVE_SECS: u16 = 40;

/// What an idle timeout must leave after an agent's last liveness signal, for that signal to
/// be lost once and sent again (QUIC's probe timer doubles from about a second).
pub const LIVENESS_SPARE_SECS: u16 = 15;

/// Why a heartbeat interval and an idle timeout do not go together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an idle timeout of {idle_timeout_secs} s needs agents heard from every {max_signal_secs} s \
     at most ({LIVENESS_SPARE_SECS} s to spare for a lost packet), but they send a heartbeat \
     every {heartbeat_secs} s: lower the heartbeat or raise the idle timeout"
)]
pub struct LivenessError {
    pub heartbeat_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_signal_secs: u64,
}

/// Checks that agents sending a heartbeat every `heartbeat` (or, when that is longer, their
/// keep-alive) are heard from often enough for an `idle_timeout` not to end a healthy
/// connection, with one lost packet to spare.
pub fn check_liveness(
    heartbeat: std::time::Duration,
    idle_timeout: std::time::Duration,
) -> Result<(), LivenessError> {
    let signal = heartbeat.as_secs().min(AGENT_KEEP_ALIVE_SECS.into());
    let max_signal_secs = idle_timeout
        .as_secs()
        .saturating_sub(LIVENESS_SPARE_SECS.into());
    if signal > max_signal_secs {
        return Err(LivenessError {
            heartbeat_secs: heartbeat.as_secs(),
            idle_timeout_secs: idle_timeout.as_secs(),
            max_signal_secs,
        });
    }
    Ok(())
}

/// The agent asks to be enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The enrollment token from `POST /v1/servers`.
    pub token: String,
    /// The server the operator meant to enroll (`--server-id`), if given: a token pasted on the
    /// wrong machine is refused instead of silently enrolling it as another server.
    pub expected_server_id: Option<Uuid>,
    /// PKCS#10 certificate signing request (DER). The key never leaves the agent.
    pub csr_der: Vec<u8>,
    pub agent_version: String,
    pub hostname: String,
}

/// The control plane's answer to [`EnrollRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled {
        server_id: Uuid,
        /// The agent's certificate, PEM.
        certificate_pem: String,
        /// The control plane's CA, PEM (its fingerprint is the one the agent pinned).
        ca_pem: String,
        /// Ed25519 public key that signs deploy jobs; the agent pins it.
        job_signing_public_key: [u8; 32],
    },
    Refused {
        reason: String,
    },
}

/// One line of a job's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// 0: Sensei's own account of the steps; 1: standard output; 2: standard error.
    pub stream: u8,
    pub text: String,
}

/// The longest release id, commit or failed step of a job's result kept (the rest is cut).
pub const MAX_RESULT_FIELD_CHARS: usize = 128;
/// The longest failure message of a job's result kept (the rest is cut).
pub const MAX_RESULT_MESSAGE_CHARS: usize = 16 * 1024;

/// Text from a server, as the control plane stores it: without NUL characters (PostgreSQL
/// text cannot hold them) and at most `max` characters.
pub fn storable_text(text: &str, max: usize) -> String {
    text.chars().filter(|&c| c != '\0').take(max).collect()
}

/// How a job ended on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub succeeded: bool,
    pub release_id: Option<String>,
    pub commit: Option<String>,
    /// On failure: the step and why.
    pub error: Option<(String, String)>,
}

impl JobResult {
    /// A job that failed at `step` before producing a release.
    pub fn failed(step: &str, message: impl Into<String>) -> Self {
        Self {
            succeeded: false,
            release_id: None,
            commit: None,
            error: Some((step.into(), message.into())),
        }
    }

    /// The result as the control plane stores it. Every field is text from the server
    /// (reported by its agent, or printed by its script over SSH), so untrusted: NUL
    /// characters, which PostgreSQL text cannot hold, are dropped (one would fail the write
    /// of every result in its batch, other tenants' included), and each field is cut to its
    /// bound.
    pub fn storable(&self) -> Self {
        Self {
            succeeded: self.succeeded,
            release_id: self
                .release_id
                .as_deref()
                .map(|r| storable_text(r, MAX_RESULT_FIELD_CHARS)),
            commit: self
                .commit
                .as_deref()
                .map(|c| storable_text(c, MAX_RESULT_FIELD_CHARS)),
            error: self.error.as_ref().map(|(step, message)| {
                (
                    storable_text(step, MAX_RESULT_FIELD_CHARS),
                    storable_text(message, MAX_RESULT_MESSAGE_CHARS),
                )
            }),
        }
    }

    /// How a run of the release engine's script ended: what its output said (`outcome`) and
    /// how its process ended (`exit`). Both runners report exactly this.
    pub fn from_run(outcome: &Outcome, exit: ScriptExit) -> Self {
        let verdict = outcome.verdict(exit);
        Self {
            succeeded: verdict.is_ok(),
            release_id: outcome.release.clone(),
            commit: outcome.commit.clone(),
            error: verdict.err(),
        }
    }
}

/// Agent → control plane.
///
/// On the control stream: `Hello`, then `Heartbeat`s. On each job stream (a bidirectional
/// stream the agent opens to long-poll): `Poll`, then for the job received `JobLog`s and one
/// `JobFinished`, or `JobRefused` when the job failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// First message of a session.
    Hello {
        server_id: Uuid,
        agent_version: String,
    },
    Heartbeat,
    /// "Send my next job when there is one." Answered with `Job` on the same stream, at once
    /// if a job is queued, or as soon as one is.
    Poll {
        highest_sequence: u64,
    },
    JobLog {
        job_id: Uuid,
        lines: Vec<LogLine>,
    },
    JobFinished {
        job_id: Uuid,
        result: JobResult,
    },
    /// The job failed verification and was not run.
    JobRefused {
        job_id: Option<Uuid>,
        reason: String,
    },
    /// The result of a job that ended while the connection it came on was lost: sent first on
    /// a new stream after reconnecting (to any replica), until the control plane records it.
    JobReport {
        job_id: Uuid,
        result: JobResult,
    },
    /// "Sign a new certificate for a key I just made": the first and only message of a
    /// renewal stream. The CSR names this server (its UUID as the common name) and nothing
    /// else; the key is new. At most [`MAX_CSR_LEN`] bytes.
    Renew {
        csr_der: Vec<u8>,
    },
    /// "Tell me when there is a CA I should pin": the first and only message of a trust
    /// stream, naming the SHA-256 fingerprints of the CAs this agent pins (at most
    /// [`MAX_PINNED_CAS`]). Answered with `CaEndorsed` when the control plane has started a CA
    /// rotation that this agent has not followed yet, at once or whenever that happens; the
    /// agent ends the stream once it has stored the new CA.
    WatchTrust {
        pinned_cas: Vec<[u8; 32]>,
    },
    /// `WatchTrust` that also names the job-signing keys this agent pins (at most
    /// [`MAX_PINNED_JOB_KEYS`]), sent instead of it by agents that follow job-key rotations.
    /// Answered like `WatchTrust`, or with `JobKeyEndorsed` / `JobKeyRetired`. Naming a key is
    /// also how the agent acknowledges it: the control plane signs this server's jobs with a
    /// new key only once a watch named it. A control plane older than this message drops the
    /// stream; the agent then watches with `WatchTrust` for the rest of the session.
    WatchTrustAndJobKeys {
        pinned_cas: Vec<[u8; 32]>,
        job_keys: Vec<[u8; 32]>,
    },
    /// "This is the host I run on": the first and only message of a stream the agent opens
    /// once per session, after the hello. The OS (os-release's `PRETTY_NAME`) and the
    /// architecture, bounded by [`crate::upgrade::check_host_facts`]; no answer. An older
    /// control plane cannot decode it and drops that one stream; an older agent never sends
    /// it, and its server shows no OS or architecture.
    HostFacts {
        os: String,
        arch: String,
    },
}

/// The most CA fingerprints a `WatchTrust` may name (an agent pins one, two during a
/// rotation).
pub const MAX_PINNED_CAS: usize = 8;

/// The most job-signing keys an agent pins, and a watch may name (one, two during a
/// rotation).
pub const MAX_PINNED_JOB_KEYS: usize = 4;

impl AgentMessage {
    /// The message's name, for errors and logs (its content can be large or secret).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "Hello",
            Self::Heartbeat => "Heartbeat",
            Self::Poll { .. } => "Poll",
            Self::JobLog { .. } => "JobLog",
            Self::JobFinished { .. } => "JobFinished",
            Self::JobRefused { .. } => "JobRefused",
            Self::JobReport { .. } => "JobReport",
            Self::Renew { .. } => "Renew",
            Self::WatchTrust { .. } => "WatchTrust",
            Self::WatchTrustAndJobKeys { .. } => "WatchTrustAndJobKeys",
            Self::HostFacts { .. } => "HostFacts",
        }
    }
}

/// Control plane → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// The session is accepted; send a heartbeat this often.
    Welcome {
        heartbeat_secs: u32,
    },
    HeartbeatAck,
    /// A signed job, in answer to `Poll`.
    Job(crate::job::SignedJob),
    /// The job's outcome is stored; poll again.
    JobRecorded,
    /// The renewed certificate, PEM, in answer to `Renew`. The agent stores it with its new
    /// key, then ends the stream; the control plane then closes the session with
    /// [`close::RENEWED`] once no job is under way on it.
    Renewed {
        certificate_pem: String,
    },
    /// `Renew` was refused, and why.
    RenewalRefused {
        reason: RenewalRefusal,
    },
    /// A new CA, endorsed by one the agent pins (`sensei_certs::rotation`), in answer to
    /// `WatchTrust`. The agent pins it only if the endorsement verifies; then it ends the
    /// stream. With `renew`, the session's certificate comes from the CA being replaced: the
    /// agent renews it now, and the renewal is issued by the new CA.
    CaEndorsed {
        /// The new CA's certificate, PEM (at most [`MAX_CERTIFICATE_PEM_LEN`]).
        ca_pem: String,
        /// SHA-256 fingerprint of the endorsing CA, one the agent named as pinned.
        endorser: [u8; 32],
        /// The endorser's signature over the new CA (at most [`MAX_SIGNATURE_LEN`] bytes).
        signature: Vec<u8>,
        renew: bool,
    },
    /// The CA rotation is over, in answer to `WatchTrust` from an agent that pins `current`
    /// and others: the agent unpins the CAs in `retired` (at most [`MAX_PINNED_CAS`]), never
    /// `current`, then ends the stream. Dropping a pin can only narrow what the agent trusts.
    CaRetired {
        retired: Vec<[u8; 32]>,
        current: [u8; 32],
    },
    /// A new job-signing key, endorsed by one the agent pins (`crate::job_key`), in answer to
    /// `WatchTrustAndJobKeys`. The agent pins it only if the endorsement verifies, then ends
    /// the stream and watches again naming it, which acknowledges it.
    JobKeyEndorsed {
        new_key: [u8; 32],
        /// A key the agent named as pinned.
        endorser: [u8; 32],
        /// Ed25519 by the endorser (at most [`MAX_SIGNATURE_LEN`] bytes).
        signature: Vec<u8>,
    },
    /// The job-key rotation is over, in answer to `WatchTrustAndJobKeys` from an agent that
    /// pins `current` and others: the agent unpins the keys in `retired` (at most
    /// [`MAX_PINNED_JOB_KEYS`]), never `current`, then ends the stream.
    JobKeyRetired {
        retired: Vec<[u8; 32]>,
        current: [u8; 32],
    },
}

/// The largest endorsement signature an agent reads (an ECDSA P-256 signature is at most 72
/// bytes).
pub const MAX_SIGNATURE_LEN: usize = 128;

/// The largest CSR a renewal may carry. A P-256 CSR naming one UUID is about 300 bytes.
pub const MAX_CSR_LEN: usize = 4096;

/// The largest certificate an agent accepts in `Renewed` (a P-256 certificate is under 1 KiB
/// of PEM).
pub const MAX_CERTIFICATE_PEM_LEN: usize = 16 * 1024;

/// Why the control plane refused to renew a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RenewalRefusal {
    /// The certificate the session uses is revoked: the agent is cut off.
    #[error("the certificate is revoked")]
    Revoked,
    /// The certificate the session uses has expired (or was retired): enroll again.
    #[error("the certificate has expired; enroll again")]
    Expired,
    /// The CSR does not parse, its signature is wrong, or it is too large.
    #[error("the certificate signing request is malformed")]
    MalformedCsr,
    /// The CSR names something other than this server alone.
    #[error("the certificate signing request must name this server and nothing else")]
    WrongSubject,
    /// The CSR's key is the one the current certificate certifies.
    #[error("the certificate signing request reuses the current key")]
    KeyReused,
    /// Another renewal of this server is pending or was just made: try later.
    #[error("a renewal is already pending; try later")]
    TooSoon,
    /// The control plane could not complete it (its database): try later.
    #[error("the control plane could not renew the certificate; try later")]
    Unavailable,
}

impl RenewalRefusal {
    /// Whether trying again later can succeed: a revoked or expired certificate never renews.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Revoked | Self::Expired)
    }
}

impl ControlMessage {
    /// The message's name, for errors and logs (a job is large).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "Welcome",
            Self::HeartbeatAck => "HeartbeatAck",
            Self::Job(_) => "Job",
            Self::JobRecorded => "JobRecorded",
            Self::Renewed { .. } => "Renewed",
            Self::RenewalRefused { .. } => "RenewalRefused",
            Self::CaEndorsed { .. } => "CaEndorsed",
            Self::CaRetired { .. } => "CaRetired",
            Self::JobKeyEndorsed { .. } => "JobKeyEndorsed",
            Self::JobKeyRetired { .. } => "JobKeyRetired",
        }
    }
}

/// Application close codes on agent connections.
pub mod close {
    /// The agent ends the connection: it is stopping, or it gave up on a control plane that
    /// stopped answering (no welcome, no heartbeat acks). Carries no advice.
    pub const LEAVING: u32 = 0;
    /// The agent's certificate was revoked: do not reconnect.
    pub const REVOKED: u32 = 0x5e01;
    /// The control plane is shutting down or shedding load; the reason holds the suggested
    /// delay before reconnecting, in milliseconds, as decimal text.
    pub const RETRY_LATER: u32 = 0x5e02;
    /// A peer broke the protocol (a message out of place, a wrong server id, a log for another
    /// job, a silent control stream). Also the error code of a job stream reset for such a
    /// message.
    pub const PROTOCOL_ERROR: u32 = 0x5e03;
    /// A newer connection for the same server replaced this one.
    pub const REPLACED: u32 = 0x5e04;
    /// Enrollment finished (or was refused); the connection has no further use.
    pub const DONE: u32 = 0x5e05;
    /// The agent's certificate was renewed on this connection and the agent stored it:
    /// reconnect at once, with the new certificate. Only sent to agents that asked for a
    /// renewal, so older agents never see it.
    pub const RENEWED: u32 = 0x5e06;
}

/// TLS alert `certificate_revoked` (RFC 8446): what a handshake with a revoked certificate is
/// refused with, so that an agent that was offline when it was revoked also learns it.
pub const TLS_ALERT_CERTIFICATE_REVOKED: u8 = 44;

/// What an agent should do after its connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseVerdict {
    /// Revoked: stop and tell the operator.
    Stop,
    /// Reconnect after the control plane's suggested delay.
    RetryAfter(std::time::Duration),
    /// Reconnect with the usual backoff.
    Retry,
    /// Reconnect at once: the certificate was renewed.
    Reconnect,
}

impl CloseVerdict {
    /// Interprets an application close from the control plane.
    pub fn from_application_close(code: u64, reason: &[u8]) -> Self {
        match u32::try_from(code) {
            Ok(close::REVOKED) => CloseVerdict::Stop,
            Ok(close::RENEWED) => CloseVerdict::Reconnect,
            Ok(close::RETRY_LATER) => std::str::from_utf8(reason)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                // A control plane cannot park an agent for more than ten minutes.
                .map(|ms| {
                    CloseVerdict::RetryAfter(std::time::Duration::from_millis(ms.min(600_000)))
                })
                .unwrap_or(CloseVerdict::Retry),
            _ => CloseVerdict::Retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_result_is_stored_without_nul_characters_and_within_bounds() {
        let hostile = JobResult {
            succeeded: false,
            release_id: Some("2026\0".into()),
            commit: Some("\0".repeat(3)),
            error: Some(("run\0".into(), format!("it\0 broke{}", "x".repeat(20_000)))),
        };
        let stored = hostile.storable();
        assert_eq!(stored.release_id.as_deref(), Some("2026"));
        assert_eq!(stored.commit.as_deref(), Some(""));
        let (step, message) = stored.error.expect("error");
        assert_eq!(step, "run");
        assert!(message.starts_with("it broke"));
        assert_eq!(message.chars().count(), MAX_RESULT_MESSAGE_CHARS);
        assert_eq!(storable_text(&"é".repeat(200), 128).chars().count(), 128);
        // A well-formed result is kept as it is.
        let fine = JobResult {
            succeeded: true,
            release_id: Some("20261205T001500Z".into()),
            commit: Some("a".repeat(40)),
            error: None,
        };
        assert_eq!(fine.storable(), fine);
    }

    /// The defaults go together; a shorter idle timeout needs a heartbeat that leaves time
    /// for a lost packet; a heartbeat longer than the keep-alive is covered by the keep-alive.
    #[test]
    fn an_idle_timeout_must_leave_time_after_the_liveness_signal() {
        let secs = Duration::from_secs;
        let default_idle = secs(AGENT_IDLE_TIMEOUT_SECS.into());
        assert_eq!(
            check_liveness(secs(DEFAULT_HEARTBEAT_SECS.into()), default_idle),
            Ok(())
        );
        assert_eq!(check_liveness(secs(15), secs(30)), Ok(()));
        let refused = check_liveness(secs(30), secs(30)).expect_err("no time to spare");
        assert_eq!(
            refused,
            LivenessError {
                heartbeat_secs: 30,
                idle_timeout_secs: 30,
                max_signal_secs: 15
            }
        );
        assert!(
            refused.to_string().contains("every 15 s at most"),
            "{refused}"
        );
        assert!(check_liveness(secs(16), secs(30)).is_err());
        // Heartbeats every 300 s: the keep-alive (40 s) is what the idle timeout hears.
        assert_eq!(check_liveness(secs(300), default_idle), Ok(()));
        assert!(check_liveness(secs(300), secs(50)).is_err());
        assert!(
            check_liveness(secs(1), secs(10)).is_err(),
            "too short to spare 15 s"
        );
    }

    #[test]
    fn close_codes_are_interpreted() {
        assert_eq!(
            CloseVerdict::from_application_close(close::REVOKED.into(), b"revoked"),
            CloseVerdict::Stop
        );
        assert_eq!(
            CloseVerdict::from_application_close(close::RETRY_LATER.into(), b"2500"),
            CloseVerdict::RetryAfter(Duration::from_millis(2500))
        );
        assert_eq!(
            CloseVerdict::from_application_close(close::RETRY_LATER.into(), b"99999999"),
            CloseVerdict::RetryAfter(Duration::from_secs(600))
        );
        assert_eq!(
            CloseVerdict::from_application_close(close::RETRY_LATER.into(), b"soon"),
            CloseVerdict::Retry
        );
        assert_eq!(
            CloseVerdict::from_application_close(close::RENEWED.into(), b"renewed"),
            CloseVerdict::Reconnect
        );
        assert_eq!(
            CloseVerdict::from_application_close(0, b""),
            CloseVerdict::Retry
        );
        assert_eq!(
            CloseVerdict::from_application_close(u64::MAX, b""),
            CloseVerdict::Retry
        );
    }

    #[test]
    fn messages_round_trip_through_the_codec() {
        let hello = AgentMessage::Hello {
            server_id: Uuid::new_v4(),
            agent_version: "1.2.3".into(),
        };
        let back: AgentMessage = crate::decode(&crate::encode(&hello).expect("enc")).expect("dec");
        assert_eq!(back, hello);
        let refused = EnrollResponse::Refused {
            reason: "token expired".into(),
        };
        let back: EnrollResponse =
            crate::decode(&crate::encode(&refused).expect("enc")).expect("dec");
        assert_eq!(back, refused);
    }

    /// The renewal variants are appended: every variant an older peer knows keeps its
    /// encoding (its index comes first in the body, and these stay what they were).
    #[test]
    fn older_variants_keep_their_encoding() {
        assert_eq!(crate::encode(&AgentMessage::Heartbeat).expect("enc"), [1]);
        assert_eq!(
            crate::encode(&ControlMessage::JobRecorded).expect("enc"),
            [3]
        );
        let renew = crate::encode(&AgentMessage::Renew { csr_der: vec![7] }).expect("enc");
        assert_eq!(renew[0], 7);
        let refused = crate::encode(&ControlMessage::RenewalRefused {
            reason: RenewalRefusal::KeyReused,
        })
        .expect("enc");
        assert_eq!(refused[0], 5);
        let facts = crate::encode(&AgentMessage::HostFacts {
            os: "Linux".into(),
            arch: "x86_64".into(),
        })
        .expect("enc");
        assert_eq!(facts[0], 10, "appended after WatchTrustAndJobKeys");
        let back: ControlMessage = crate::decode(&refused).expect("dec");
        assert_eq!(
            back,
            ControlMessage::RenewalRefused {
                reason: RenewalRefusal::KeyReused
            }
        );
    }
}
