//! The agent's side: its control stream ([`AgentSession`]) and its job streams ([`AgentJob`]).

use std::collections::VecDeque;
use std::time::Duration;

use uuid::Uuid;

use super::{silence_limit, Instant, OutOfOrder};
use crate::job::SignedJob;
use crate::protocol::{close, AgentMessage, ControlMessage, JobResult, LogLine};

/// The heartbeat intervals an agent accepts from a welcome, in seconds: a control plane cannot
/// make an agent spin, nor keep it silent for longer than five minutes.
const HEARTBEAT_SECS: (u32, u32) = (1, 300);

/// The agent's control stream: hello, welcome, then heartbeats and their acks.
#[derive(Debug)]
pub struct AgentSession<I> {
    server_id: Uuid,
    agent_version: String,
    step: Duration,
    hello_sent: bool,
    state: AgentState<I>,
    actions: VecDeque<AgentAction>,
}

#[derive(Debug)]
enum AgentState<I> {
    /// The hello is queued or sent; the welcome is due by `deadline`.
    AwaitingWelcome { deadline: I },
    Established {
        heartbeat: Duration,
        next_heartbeat: I,
        /// The session is taken as lost if no heartbeat ack comes by then.
        ack_deadline: I,
    },
    /// Ended by an error; the driver closes the connection.
    Closed,
}

/// What the agent's control-stream driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// Write this message on the control stream.
    Send(AgentMessage),
    /// The control plane welcomed the session: it is up, and heartbeats go out this often.
    Established { heartbeat: Duration },
}

/// Why the agent gives up on a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentSessionError {
    /// The control plane answered the hello with something other than a welcome.
    #[error("expected welcome, got {0}")]
    ExpectedWelcome(&'static str),
    /// No welcome came within the step timeout after the hello.
    #[error("no welcome within {0:?}")]
    NoWelcome(Duration),
    /// A message that does not belong on an established control stream.
    #[error("unexpected {0} on the control stream")]
    Unexpected(&'static str),
    /// No heartbeat ack for this long: the connection is taken as lost, even though QUIC may
    /// still hold it.
    #[error("no heartbeat ack for {0:?}")]
    Silent(Duration),
}

impl AgentSessionError {
    /// The application close code the agent ends the connection with.
    pub fn close_code(&self) -> u32 {
        match self {
            Self::ExpectedWelcome(_) | Self::Unexpected(_) => close::PROTOCOL_ERROR,
            Self::NoWelcome(_) | Self::Silent(_) => close::LEAVING,
        }
    }
}

/// Proof that the hello has been handed to the driver, so that the control stream (the
/// connection's first stream) carries it before any job stream opens. Without it the control
/// plane reads a poll where it expects the hello and closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloSent(());

impl<I: Instant> AgentSession<I> {
    /// A session on a connection just established at `now`, with the agent's step timeout
    /// (how long the welcome may take). Once welcomed, a control plane that acks no heartbeat
    /// for [`super::SILENT_INTERVALS`] × the heartbeat interval + `step` is given up on: 105 s
    /// with the defaults (30 s heartbeat, the agent's 15 s step).
    pub fn new(server_id: Uuid, agent_version: String, step: Duration, now: I) -> Self {
        Self {
            server_id,
            agent_version,
            step,
            hello_sent: false,
            state: AgentState::AwaitingWelcome {
                deadline: now + step,
            },
            actions: VecDeque::new(),
        }
    }

    /// The next thing to do. The first is always sending the hello.
    pub fn poll(&mut self) -> Option<AgentAction> {
        if !self.hello_sent {
            self.hello_sent = true;
            return Some(AgentAction::Send(AgentMessage::Hello {
                server_id: self.server_id,
                agent_version: self.agent_version.clone(),
            }));
        }
        self.actions.pop_front()
    }

    /// Whether job streams may open: once the hello has been taken from [`Self::poll`] (and
    /// the driver writes what it takes before opening anything else).
    pub fn hello_sent(&self) -> Option<HelloSent> {
        self.hello_sent.then_some(HelloSent(()))
    }

    /// A message arrived on the control stream at `now`.
    pub fn handle(&mut self, message: ControlMessage, now: I) -> Result<(), AgentSessionError> {
        let result = match (&mut self.state, message) {
            (AgentState::AwaitingWelcome { .. }, ControlMessage::Welcome { heartbeat_secs }) => {
                let secs = heartbeat_secs.clamp(HEARTBEAT_SECS.0, HEARTBEAT_SECS.1);
                let heartbeat = Duration::from_secs(u64::from(secs));
                self.state = AgentState::Established {
                    heartbeat,
                    next_heartbeat: now + heartbeat,
                    ack_deadline: now + silence_limit(heartbeat, self.step),
                };
                self.actions
                    .push_back(AgentAction::Established { heartbeat });
                Ok(())
            }
            (AgentState::AwaitingWelcome { .. }, other) => {
                Err(AgentSessionError::ExpectedWelcome(other.name()))
            }
            (
                AgentState::Established {
                    heartbeat,
                    ack_deadline,
                    ..
                },
                ControlMessage::HeartbeatAck,
            ) => {
                // Any ack proves the control plane alive; acks are not matched to heartbeats.
                *ack_deadline = now + silence_limit(*heartbeat, self.step);
                Ok(())
            }
            (AgentState::Established { .. }, other) => {
                Err(AgentSessionError::Unexpected(other.name()))
            }
            (AgentState::Closed, _) => Ok(()),
        };
        if result.is_err() {
            self.state = AgentState::Closed;
        }
        result
    }

    /// The timer from [`Self::poll_timeout`] fired (or any time passed): sends a heartbeat
    /// when one is due, and gives up when the control plane has been silent too long.
    pub fn handle_timeout(&mut self, now: I) -> Result<(), AgentSessionError> {
        match &mut self.state {
            AgentState::AwaitingWelcome { deadline } if now >= *deadline => {
                self.state = AgentState::Closed;
                Err(AgentSessionError::NoWelcome(self.step))
            }
            AgentState::Established {
                heartbeat,
                ack_deadline,
                ..
            } if now >= *ack_deadline => {
                let silent = silence_limit(*heartbeat, self.step);
                self.state = AgentState::Closed;
                Err(AgentSessionError::Silent(silent))
            }
            AgentState::Established {
                heartbeat,
                next_heartbeat,
                ..
            } if now >= *next_heartbeat => {
                self.actions
                    .push_back(AgentAction::Send(AgentMessage::Heartbeat));
                // One heartbeat however late the timer fired: a burst would only say the same.
                *next_heartbeat = *next_heartbeat + *heartbeat;
                if *next_heartbeat <= now {
                    *next_heartbeat = now + *heartbeat;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// When [`Self::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<I> {
        match &self.state {
            AgentState::AwaitingWelcome { deadline } => Some(*deadline),
            AgentState::Established {
                next_heartbeat,
                ack_deadline,
                ..
            } => Some((*next_heartbeat).min(*ack_deadline)),
            AgentState::Closed => None,
        }
    }

    /// Whether the control plane has welcomed the session.
    pub fn is_established(&self) -> bool {
        matches!(self.state, AgentState::Established { .. })
    }
}

/// One job stream of the agent: a poll answered with a job, its log and end, acknowledged
/// with `JobRecorded`; or the report of a result an earlier connection could not deliver.
#[derive(Debug)]
pub struct AgentJob {
    state: JobState,
    actions: VecDeque<AgentJobAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    AwaitingJob,
    Running,
    /// The stream's last message is sent; `kept` is the job whose result waits for the ack.
    AwaitingRecord {
        kept: Option<Uuid>,
    },
    Done,
}

/// What the agent's job-stream driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentJobAction {
    /// Write this message on the job stream.
    Send(AgentMessage),
    /// Verify this job and, if it passes, run it; then answer with [`AgentJob::log`] and
    /// [`AgentJob::finish`], or [`AgentJob::refuse`].
    Run(SignedJob),
    /// Keep this result where it survives a lost connection and a restart, until
    /// [`AgentJobAction::Forget`]. Comes before the `Send` that carries the result.
    Keep { job_id: Uuid, result: JobResult },
    /// The control plane recorded the kept result of this job: the copy can go.
    Forget { job_id: Uuid },
    /// The exchange is over: finish the stream and open the next one.
    Finish,
}

/// How the control plane broke the protocol on a job stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentJobError {
    /// A poll was answered with something other than a job.
    #[error("expected a job, got {0}")]
    ExpectedJob(&'static str),
    /// A message came while the agent runs a job: nothing is expected then.
    #[error("unexpected {0} while a job runs")]
    WhileRunning(&'static str),
    /// The job's end was answered with something other than `JobRecorded`.
    #[error("expected JobRecorded, got {0}")]
    ExpectedRecorded(&'static str),
    /// A message after the exchange was over.
    #[error("unexpected {0} after the exchange")]
    AfterEnd(&'static str),
}

impl AgentJobError {
    /// The application close code the agent ends the connection with.
    pub fn close_code(&self) -> u32 {
        close::PROTOCOL_ERROR
    }
}

impl AgentJob {
    /// The next job stream of a connection. A result that an earlier connection could not
    /// deliver (`unreported`, kept on disk) is reported first, before any poll; otherwise the
    /// stream polls, sending the highest sequence number the agent has accepted.
    pub fn next(
        _hello: HelloSent,
        unreported: Option<(Uuid, JobResult)>,
        highest_sequence: u64,
    ) -> Self {
        let (first, state) = match unreported {
            Some((job_id, result)) => (
                AgentMessage::JobReport { job_id, result },
                JobState::AwaitingRecord { kept: Some(job_id) },
            ),
            None => (
                AgentMessage::Poll { highest_sequence },
                JobState::AwaitingJob,
            ),
        };
        Self {
            state,
            actions: VecDeque::from([AgentJobAction::Send(first)]),
        }
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<AgentJobAction> {
        self.actions.pop_front()
    }

    /// A message arrived on the job stream.
    pub fn handle(&mut self, message: ControlMessage) -> Result<(), AgentJobError> {
        match (self.state, message) {
            (JobState::AwaitingJob, ControlMessage::Job(job)) => {
                self.state = JobState::Running;
                self.actions.push_back(AgentJobAction::Run(job));
                Ok(())
            }
            (JobState::AwaitingJob, other) => Err(AgentJobError::ExpectedJob(other.name())),
            (JobState::Running, other) => Err(AgentJobError::WhileRunning(other.name())),
            (JobState::AwaitingRecord { kept }, ControlMessage::JobRecorded) => {
                if let Some(job_id) = kept {
                    self.actions.push_back(AgentJobAction::Forget { job_id });
                }
                self.actions.push_back(AgentJobAction::Finish);
                self.state = JobState::Done;
                Ok(())
            }
            (JobState::AwaitingRecord { .. }, other) => {
                Err(AgentJobError::ExpectedRecorded(other.name()))
            }
            (JobState::Done, other) => Err(AgentJobError::AfterEnd(other.name())),
        }
    }

    /// Lines of the running job's log.
    pub fn log(&mut self, job_id: Uuid, lines: Vec<LogLine>) -> Result<(), OutOfOrder> {
        if self.state != JobState::Running {
            return Err(OutOfOrder("log"));
        }
        if !lines.is_empty() {
            self.actions
                .push_back(AgentJobAction::Send(AgentMessage::JobLog { job_id, lines }));
        }
        Ok(())
    }

    /// The job ran (or was stopped by this server's policy) and ended with `result`.
    pub fn finish(&mut self, job_id: Uuid, result: JobResult) -> Result<(), OutOfOrder> {
        if self.state != JobState::Running {
            return Err(OutOfOrder("finish"));
        }
        self.actions.push_back(AgentJobAction::Keep {
            job_id,
            result: result.clone(),
        });
        self.actions
            .push_back(AgentJobAction::Send(AgentMessage::JobFinished {
                job_id,
                result,
            }));
        self.state = JobState::AwaitingRecord { kept: Some(job_id) };
        Ok(())
    }

    /// The job failed verification and was not run; its id, if readable, is only a hint.
    pub fn refuse(&mut self, job_id: Option<Uuid>, reason: String) -> Result<(), OutOfOrder> {
        if self.state != JobState::Running {
            return Err(OutOfOrder("refuse"));
        }
        self.actions
            .push_back(AgentJobAction::Send(AgentMessage::JobRefused {
                job_id,
                reason,
            }));
        self.state = JobState::AwaitingRecord { kept: None };
        Ok(())
    }

    /// Whether the exchange is over.
    pub fn is_done(&self) -> bool {
        self.state == JobState::Done
    }
}
