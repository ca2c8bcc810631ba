//! The control plane's side: a session's control stream ([`ControlSession`]) and each job
//! stream ([`ControlJob`]).

use std::collections::VecDeque;
use std::time::Duration;

use uuid::Uuid;

use super::{silence_limit, Instant, OutOfOrder};
use crate::job::SignedJob;
use crate::protocol::{
    close, AgentMessage, ControlMessage, JobResult, LogLine, RenewalRefusal, MAX_CSR_LEN,
    MAX_PINNED_CAS, MAX_PINNED_JOB_KEYS,
};

/// The longest agent version kept (the rest is cut): it is shown, never interpreted.
const MAX_AGENT_VERSION_CHARS: usize = 64;
/// The longest reason for refusing a job kept (the rest is cut).
const MAX_REFUSAL_REASON_CHARS: usize = 4096;

/// The control plane's side of a control stream: the hello (checked against the server the
/// certificate was issued to), the welcome, then heartbeats and acks.
#[derive(Debug)]
pub struct ControlSession<I> {
    server_id: Uuid,
    /// The interval announced in the welcome, whole seconds.
    heartbeat_secs: u32,
    step: Duration,
    state: ControlState<I>,
    actions: VecDeque<ControlAction>,
}

#[derive(Debug)]
enum ControlState<I> {
    AwaitingStream {
        deadline: I,
    },
    AwaitingHello {
        deadline: I,
    },
    /// The hello was valid; the driver registers the session and calls `registered`.
    Registering,
    Established {
        silence_deadline: I,
    },
    /// Ended, by the agent or by an error.
    Closed,
}

/// What the control plane's control-stream driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAction {
    /// The hello named the certificate's server: register the session (checking the
    /// certificate once more), then call [`ControlSession::registered`], or close.
    Register { agent_version: String },
    /// Write this message on the control stream.
    Send(ControlMessage),
}

/// How an agent broke the protocol on its control stream. Every variant closes the
/// connection with [`close::PROTOCOL_ERROR`] and its text as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlSessionError {
    /// The agent opened no stream within the step timeout.
    #[error("expected the control stream")]
    NoControlStream,
    /// The control stream did not start with a hello within the step timeout: something else
    /// came first (a poll, most likely), or the stream ended or was unreadable.
    #[error("expected hello")]
    ExpectedHello,
    /// The hello names another server than the one the certificate was issued to.
    #[error("this certificate was issued to server {certified}, not {claimed}")]
    WrongServer { certified: Uuid, claimed: Uuid },
    /// After the hello, something other than a heartbeat.
    #[error("only hello and heartbeats belong on the control stream")]
    Unexpected(&'static str),
    /// Bytes on an established control stream that are no message.
    #[error("unreadable message: {0}")]
    Unreadable(String),
    /// No heartbeat for this long, while QUIC kept the connection alive.
    #[error("no heartbeat for {0:?}")]
    Silent(Duration),
}

impl ControlSessionError {
    /// The application close code the control plane ends the connection with.
    pub fn close_code(&self) -> u32 {
        close::PROTOCOL_ERROR
    }
}

impl<I: Instant> ControlSession<I> {
    /// A session for a connection whose certificate was issued to `server_id`, accepted at
    /// `now`. `heartbeat` is announced in the welcome (whole seconds, at least one); `step`
    /// bounds the wait for the control stream and then for the hello. Once welcomed, an agent
    /// silent for [`super::SILENT_INTERVALS`] × `heartbeat` + `step` is closed: 100 s with the
    /// control plane's defaults (30 s, 10 s), 13 s with the tests' 1 s heartbeat.
    pub fn new(server_id: Uuid, heartbeat: Duration, step: Duration, now: I) -> Self {
        let heartbeat_secs = u32::try_from(heartbeat.as_secs().max(1)).unwrap_or(u32::MAX);
        Self {
            server_id,
            heartbeat_secs,
            step,
            state: ControlState::AwaitingStream {
                deadline: now + step,
            },
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<ControlAction> {
        self.actions.pop_front()
    }

    /// The agent opened its first stream, the control stream, at `now`.
    pub fn stream_opened(&mut self, now: I) -> Result<(), OutOfOrder> {
        match self.state {
            ControlState::AwaitingStream { .. } => {
                self.state = ControlState::AwaitingHello {
                    deadline: now + self.step,
                };
                Ok(())
            }
            _ => Err(OutOfOrder("stream_opened")),
        }
    }

    /// A message arrived on the control stream at `now`.
    pub fn handle(&mut self, message: AgentMessage, now: I) -> Result<(), ControlSessionError> {
        let result = match (&self.state, message) {
            (
                ControlState::AwaitingHello { .. },
                AgentMessage::Hello {
                    server_id,
                    agent_version,
                },
            ) => {
                if server_id == self.server_id {
                    self.state = ControlState::Registering;
                    self.actions.push_back(ControlAction::Register {
                        agent_version: crate::protocol::storable_text(
                            &agent_version,
                            MAX_AGENT_VERSION_CHARS,
                        ),
                    });
                    Ok(())
                } else {
                    Err(ControlSessionError::WrongServer {
                        certified: self.server_id,
                        claimed: server_id,
                    })
                }
            }
            (ControlState::AwaitingStream { .. } | ControlState::AwaitingHello { .. }, _) => {
                Err(ControlSessionError::ExpectedHello)
            }
            (ControlState::Established { .. }, AgentMessage::Heartbeat) => {
                self.state = ControlState::Established {
                    silence_deadline: now + self.silence(),
                };
                self.actions
                    .push_back(ControlAction::Send(ControlMessage::HeartbeatAck));
                Ok(())
            }
            // Nothing may come while the session registers: the agent waits for the welcome.
            (ControlState::Established { .. } | ControlState::Registering, other) => {
                Err(ControlSessionError::Unexpected(other.name()))
            }
            (ControlState::Closed, _) => Ok(()),
        };
        if result.is_err() {
            self.state = ControlState::Closed;
        }
        result
    }

    /// The control stream carried bytes that do not decode.
    pub fn handle_unreadable(&mut self, error: String) -> ControlSessionError {
        let before_hello = matches!(
            self.state,
            ControlState::AwaitingStream { .. } | ControlState::AwaitingHello { .. }
        );
        self.state = ControlState::Closed;
        if before_hello {
            ControlSessionError::ExpectedHello
        } else {
            ControlSessionError::Unreadable(error)
        }
    }

    /// The agent ended the control stream. Before the hello that is a protocol error; after
    /// it, the agent is leaving.
    pub fn handle_end(&mut self) -> Result<(), ControlSessionError> {
        let before_hello = matches!(
            self.state,
            ControlState::AwaitingStream { .. } | ControlState::AwaitingHello { .. }
        );
        self.state = ControlState::Closed;
        if before_hello {
            Err(ControlSessionError::ExpectedHello)
        } else {
            Ok(())
        }
    }

    /// The session is registered at `now`: welcome the agent.
    pub fn registered(&mut self, now: I) -> Result<(), OutOfOrder> {
        if !matches!(self.state, ControlState::Registering) {
            return Err(OutOfOrder("registered"));
        }
        self.state = ControlState::Established {
            silence_deadline: now + self.silence(),
        };
        self.actions
            .push_back(ControlAction::Send(ControlMessage::Welcome {
                heartbeat_secs: self.heartbeat_secs,
            }));
        Ok(())
    }

    /// The timer from [`Self::poll_timeout`] fired (or any time passed).
    pub fn handle_timeout(&mut self, now: I) -> Result<(), ControlSessionError> {
        let error = match self.state {
            ControlState::AwaitingStream { deadline } if now >= deadline => {
                ControlSessionError::NoControlStream
            }
            ControlState::AwaitingHello { deadline } if now >= deadline => {
                ControlSessionError::ExpectedHello
            }
            ControlState::Established { silence_deadline } if now >= silence_deadline => {
                ControlSessionError::Silent(self.silence())
            }
            _ => return Ok(()),
        };
        self.state = ControlState::Closed;
        Err(error)
    }

    /// When [`Self::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<I> {
        match self.state {
            ControlState::AwaitingStream { deadline }
            | ControlState::AwaitingHello { deadline } => Some(deadline),
            ControlState::Established { silence_deadline } => Some(silence_deadline),
            ControlState::Registering | ControlState::Closed => None,
        }
    }

    /// Whether the agent has been welcomed (its job streams are served from then on).
    pub fn is_established(&self) -> bool {
        matches!(self.state, ControlState::Established { .. })
    }

    fn silence(&self) -> Duration {
        silence_limit(Duration::from_secs(self.heartbeat_secs.into()), self.step)
    }
}

/// The control plane's side of one job stream: the agent's poll, the job claimed for it,
/// the job's log and end, recorded and acknowledged; or the report of a result from an
/// earlier connection, recorded and acknowledged.
#[derive(Debug)]
pub struct ControlJob {
    state: ControlJobState,
    actions: VecDeque<ControlJobAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlJobState {
    AwaitingFirst,
    Claiming,
    Running {
        job_id: Uuid,
    },
    Recording,
    /// A renewal: the driver checks and signs the CSR.
    Renewing,
    /// A trust watch: the driver answers once a CA rotation the agent has not followed
    /// exists.
    Watching,
    /// The endorsement is sent; the agent ends the stream once it has pinned the new CA.
    AwaitingTrustStored,
    /// The renewed certificate is sent; the agent ends the stream once it has stored it.
    AwaitingStored,
    Done,
}

/// What the control plane's job-stream driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlJobAction {
    /// The agent polls: claim its next job (waiting until there is one), then call
    /// [`ControlJob::claimed`]. `highest_sequence` is the agent's replay floor, for the log:
    /// the sequence a job gets comes from the queue.
    Claim { highest_sequence: u64 },
    /// Write this message on the job stream.
    Send(ControlMessage),
    /// Append these lines to the job's log.
    StoreLines { job_id: Uuid, lines: Vec<LogLine> },
    /// The agent refused the job because it failed verification; a `Record` follows.
    Refused { job_id: Uuid, reason: String },
    /// Record how the job ended, then call [`ControlJob::recorded`].
    Record { job_id: Uuid, result: JobResult },
    /// Record a result the agent kept from an earlier connection, if the job belongs to the
    /// agent's server and is still running; then call [`ControlJob::recorded`].
    RecordReport { job_id: Uuid, result: JobResult },
    /// The agent asks for its certificate to be renewed: check the CSR (at most
    /// [`MAX_CSR_LEN`] bytes, already checked here) against the session's certificate, sign
    /// it, record it, then call [`ControlJob::renewed`] or [`ControlJob::renewal_refused`].
    Renew { csr_der: Vec<u8> },
    /// The agent stored its renewed certificate (it ended the stream after `Renewed`): stop
    /// handing jobs to this session and close it with [`close::RENEWED`] once none runs.
    Drain,
    /// The agent watches for CA rotations, pinning these CAs (at most [`MAX_PINNED_CAS`]):
    /// once one it has not followed exists (or its certificate comes from the CA being
    /// replaced, or a rotation it followed was retired), call [`ControlJob::announce`].
    WatchTrust { pinned_cas: Vec<[u8; 32]> },
    /// The same, from an agent that also follows job-key rotations, pinning these job keys
    /// (at most [`MAX_PINNED_JOB_KEYS`]): record which it names (a new key named is
    /// acknowledged), then, once it has a CA or job-key change to follow, call
    /// [`ControlJob::announce`].
    WatchTrustAndJobKeys {
        pinned_cas: Vec<[u8; 32]>,
        job_keys: Vec<[u8; 32]>,
    },
    /// The agent pinned the CA endorsed on this stream.
    TrustStored,
    /// The agent described its host (already checked by
    /// [`crate::upgrade::check_host_facts`]): store it; a `Finish` follows.
    StoreHostFacts { os: String, arch: String },
    /// The exchange is over: finish the stream.
    Finish,
}

/// How an agent broke the protocol on a job stream. The stream is reset with
/// [`close::PROTOCOL_ERROR`]; the job it carried, if any, fails when the session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ControlJobError {
    /// A job stream must start with a poll or a report.
    #[error("expected a poll or a report, got {0}")]
    ExpectedPollOrReport(&'static str),
    /// A log or an end for another job than the one sent on this stream.
    #[error("message for job {got} on the stream of job {expected}")]
    ForeignJob { expected: Uuid, got: Uuid },
    /// A message the exchange has no place for at this point.
    #[error("unexpected {0} on a job stream")]
    Unexpected(&'static str),
}

impl ControlJobError {
    /// The application error code the control plane resets the stream with.
    pub fn close_code(&self) -> u32 {
        close::PROTOCOL_ERROR
    }
}

impl Default for ControlJob {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlJob {
    /// A job stream the agent just opened.
    pub fn new() -> Self {
        Self {
            state: ControlJobState::AwaitingFirst,
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<ControlJobAction> {
        self.actions.pop_front()
    }

    /// A message arrived on the job stream.
    pub fn handle(&mut self, message: AgentMessage) -> Result<(), ControlJobError> {
        let result = match (self.state, message) {
            (ControlJobState::AwaitingFirst, AgentMessage::Poll { highest_sequence }) => {
                self.state = ControlJobState::Claiming;
                self.actions
                    .push_back(ControlJobAction::Claim { highest_sequence });
                Ok(())
            }
            (ControlJobState::AwaitingFirst, AgentMessage::JobReport { job_id, result }) => {
                self.state = ControlJobState::Recording;
                self.actions
                    .push_back(ControlJobAction::RecordReport { job_id, result });
                Ok(())
            }
            (ControlJobState::AwaitingFirst, AgentMessage::Renew { csr_der }) => {
                if csr_der.len() > MAX_CSR_LEN {
                    // Refused unread: the limit bounds what the CA code ever parses.
                    self.refuse_renewal(RenewalRefusal::MalformedCsr);
                } else {
                    self.state = ControlJobState::Renewing;
                    self.actions.push_back(ControlJobAction::Renew { csr_der });
                }
                Ok(())
            }
            (ControlJobState::AwaitingFirst, AgentMessage::WatchTrust { pinned_cas }) => {
                if pinned_cas.len() > MAX_PINNED_CAS {
                    Err(ControlJobError::Unexpected(
                        "WatchTrust naming too many CAs",
                    ))
                } else {
                    self.state = ControlJobState::Watching;
                    self.actions
                        .push_back(ControlJobAction::WatchTrust { pinned_cas });
                    Ok(())
                }
            }
            (
                ControlJobState::AwaitingFirst,
                AgentMessage::WatchTrustAndJobKeys {
                    pinned_cas,
                    job_keys,
                },
            ) => {
                if pinned_cas.len() > MAX_PINNED_CAS || job_keys.len() > MAX_PINNED_JOB_KEYS {
                    Err(ControlJobError::Unexpected(
                        "WatchTrustAndJobKeys naming too many CAs or keys",
                    ))
                } else {
                    self.state = ControlJobState::Watching;
                    self.actions
                        .push_back(ControlJobAction::WatchTrustAndJobKeys {
                            pinned_cas,
                            job_keys,
                        });
                    Ok(())
                }
            }
            (ControlJobState::AwaitingFirst, AgentMessage::HostFacts { os, arch }) => {
                if crate::upgrade::check_host_facts(&os, &arch).is_err() {
                    Err(ControlJobError::Unexpected("HostFacts out of bounds"))
                } else {
                    self.state = ControlJobState::Done;
                    self.actions
                        .push_back(ControlJobAction::StoreHostFacts { os, arch });
                    self.actions.push_back(ControlJobAction::Finish);
                    Ok(())
                }
            }
            (ControlJobState::AwaitingFirst, other) => {
                Err(ControlJobError::ExpectedPollOrReport(other.name()))
            }
            (ControlJobState::Running { job_id }, AgentMessage::JobLog { job_id: got, lines }) => {
                if got == job_id {
                    self.actions
                        .push_back(ControlJobAction::StoreLines { job_id, lines });
                    Ok(())
                } else {
                    Err(ControlJobError::ForeignJob {
                        expected: job_id,
                        got,
                    })
                }
            }
            (
                ControlJobState::Running { job_id },
                AgentMessage::JobFinished {
                    job_id: got,
                    result,
                },
            ) => {
                if got == job_id {
                    self.state = ControlJobState::Recording;
                    self.actions
                        .push_back(ControlJobAction::Record { job_id, result });
                    Ok(())
                } else {
                    Err(ControlJobError::ForeignJob {
                        expected: job_id,
                        got,
                    })
                }
            }
            // The refusal's job id is not checked: a job that failed verification may not
            // even decode, and the refusal can only be about the job sent on this stream.
            (ControlJobState::Running { job_id }, AgentMessage::JobRefused { reason, .. }) => {
                // Bounded well inside a result's message, so that what the control plane
                // appends to it (how to recover a stranded agent) is never cut off.
                let reason = crate::protocol::storable_text(&reason, MAX_REFUSAL_REASON_CHARS);
                self.state = ControlJobState::Recording;
                let result = JobResult::failed("verify", format!("refused by the agent: {reason}"));
                self.actions
                    .push_back(ControlJobAction::Refused { job_id, reason });
                self.actions
                    .push_back(ControlJobAction::Record { job_id, result });
                Ok(())
            }
            (_, other) => Err(ControlJobError::Unexpected(other.name())),
        };
        if result.is_err() {
            self.state = ControlJobState::Done;
        }
        result
    }

    /// The job `job_id` was claimed for this poll and signed: send it.
    pub fn claimed(&mut self, job_id: Uuid, job: SignedJob) -> Result<(), OutOfOrder> {
        if self.state != ControlJobState::Claiming {
            return Err(OutOfOrder("claimed"));
        }
        self.state = ControlJobState::Running { job_id };
        self.actions
            .push_back(ControlJobAction::Send(ControlMessage::Job(job)));
        Ok(())
    }

    /// The result (or report) is recorded: acknowledge it.
    pub fn recorded(&mut self) -> Result<(), OutOfOrder> {
        if self.state != ControlJobState::Recording {
            return Err(OutOfOrder("recorded"));
        }
        self.state = ControlJobState::Done;
        self.actions
            .push_back(ControlJobAction::Send(ControlMessage::JobRecorded));
        self.actions.push_back(ControlJobAction::Finish);
        Ok(())
    }

    /// The renewal asked for is signed and recorded: send the certificate, then wait for the
    /// agent to end the stream.
    pub fn renewed(&mut self, certificate_pem: String) -> Result<(), OutOfOrder> {
        if self.state != ControlJobState::Renewing {
            return Err(OutOfOrder("renewed"));
        }
        self.state = ControlJobState::AwaitingStored;
        self.actions
            .push_back(ControlJobAction::Send(ControlMessage::Renewed {
                certificate_pem,
            }));
        Ok(())
    }

    /// A CA or job-key change the watching agent has not followed: send `news` (a
    /// [`ControlMessage::CaEndorsed`], [`ControlMessage::CaRetired`],
    /// [`ControlMessage::JobKeyEndorsed`] or [`ControlMessage::JobKeyRetired`]; the last two
    /// only to a watch that named job keys), then wait for the agent to end the stream.
    pub fn announce(&mut self, news: ControlMessage) -> Result<(), OutOfOrder> {
        if self.state != ControlJobState::Watching
            || !matches!(
                news,
                ControlMessage::CaEndorsed { .. }
                    | ControlMessage::CaRetired { .. }
                    | ControlMessage::JobKeyEndorsed { .. }
                    | ControlMessage::JobKeyRetired { .. }
            )
        {
            return Err(OutOfOrder("announce"));
        }
        self.state = ControlJobState::AwaitingTrustStored;
        self.actions.push_back(ControlJobAction::Send(news));
        Ok(())
    }

    /// Whether the stream is a trust watch still waiting for a rotation.
    pub fn is_watching(&self) -> bool {
        self.state == ControlJobState::Watching
    }

    /// The renewal asked for is refused.
    pub fn renewal_refused(&mut self, reason: RenewalRefusal) -> Result<(), OutOfOrder> {
        if self.state != ControlJobState::Renewing {
            return Err(OutOfOrder("renewal_refused"));
        }
        self.refuse_renewal(reason);
        Ok(())
    }

    fn refuse_renewal(&mut self, reason: RenewalRefusal) {
        self.state = ControlJobState::Done;
        self.actions
            .push_back(ControlJobAction::Send(ControlMessage::RenewalRefused {
                reason,
            }));
        self.actions.push_back(ControlJobAction::Finish);
    }

    /// The agent ended its side of the stream. After a renewed certificate that means it is
    /// stored; anywhere else it means nothing more will come (a running job fails when the
    /// session ends, as before).
    pub fn handle_end(&mut self) {
        match self.state {
            ControlJobState::AwaitingStored => {
                self.actions.push_back(ControlJobAction::Drain);
                self.actions.push_back(ControlJobAction::Finish);
            }
            ControlJobState::AwaitingTrustStored => {
                self.actions.push_back(ControlJobAction::TrustStored);
                self.actions.push_back(ControlJobAction::Finish);
            }
            _ => {}
        }
        self.state = ControlJobState::Done;
    }

    /// The job this stream carries, once one was sent and until its end is recorded.
    pub fn running(&self) -> Option<Uuid> {
        match self.state {
            ControlJobState::Running { job_id } => Some(job_id),
            _ => None,
        }
    }

    /// Whether the exchange is over.
    pub fn is_done(&self) -> bool {
        self.state == ControlJobState::Done
    }
}
