//! A certificate renewal on the agent's side ([`AgentRenewal`]): one stream of its own, opened
//! after the hello like a job stream. The control plane's side is a [`super::ControlJob`]
//! whose first message is `Renew`.
//!
//! ```text
//! renewal stream   agent: Renew { csr } ─────▶ check the CSR, sign it, record the new certificate
//!                         ◀───────────── Renewed { certificate } | RenewalRefused { reason }
//!                         (stores key and certificate) end of stream ──▶ drain the session,
//!                         then close it with `RENEWED`: the agent reconnects with the new one
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use super::{HelloSent, Instant, OutOfOrder};
use crate::protocol::{AgentMessage, ControlMessage, RenewalRefusal, MAX_CERTIFICATE_PEM_LEN};

/// The agent's side of one renewal stream.
#[derive(Debug)]
pub struct AgentRenewal<I> {
    step: Duration,
    state: RenewalState<I>,
    actions: VecDeque<AgentRenewalAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewalState<I> {
    /// The CSR is queued or sent; the answer is due by `deadline`.
    AwaitingAnswer {
        deadline: I,
    },
    /// The certificate came; the driver stores it with its new key.
    Storing,
    Done,
}

/// What the agent's renewal driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentRenewalAction {
    /// Write this message on the renewal stream.
    Send(AgentMessage),
    /// Store this certificate together with the key the CSR was made for (atomically), then
    /// call [`AgentRenewal::stored`]. If it cannot be stored, reset the stream instead: the
    /// control plane then keeps the session, and the old certificate stays valid.
    Store { certificate_pem: String },
    /// End the stream: this tells the control plane the new certificate is stored.
    Finish,
}

/// Why a renewal did not happen. None of these ends the session: the old certificate keeps
/// working, and the agent tries again later ([`crate::renewal::RenewalSchedule`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentRenewalError {
    /// The control plane said no.
    #[error("renewal refused: {0}")]
    Refused(RenewalRefusal),
    /// The stream ended or was reset without an answer: a control plane that predates
    /// renewal (it cannot read `Renew`), or one that went away.
    #[error("the control plane did not answer the renewal")]
    Unanswered,
    /// No answer within the step timeout.
    #[error("no answer to the renewal within {0:?}")]
    NoAnswer(Duration),
    /// Something other than an answer to `Renew`, or a certificate too large to be one.
    #[error("unexpected {0} on the renewal stream")]
    Unexpected(&'static str),
}

impl AgentRenewalError {
    /// Whether trying again later is pointless: the certificate is revoked or expired.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Refused(reason) if reason.is_final())
    }
}

impl<I: Instant> AgentRenewal<I> {
    /// A renewal stream opened at `now` to send `csr_der` (made for a key that has just been
    /// generated and is not stored yet). The answer is awaited for `step`.
    pub fn new(_hello: HelloSent, csr_der: Vec<u8>, step: Duration, now: I) -> Self {
        Self {
            step,
            state: RenewalState::AwaitingAnswer {
                deadline: now + step,
            },
            actions: VecDeque::from([AgentRenewalAction::Send(AgentMessage::Renew { csr_der })]),
        }
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<AgentRenewalAction> {
        self.actions.pop_front()
    }

    /// A message arrived on the renewal stream.
    pub fn handle(&mut self, message: ControlMessage) -> Result<(), AgentRenewalError> {
        let result = match (self.state, message) {
            (RenewalState::AwaitingAnswer { .. }, ControlMessage::Renewed { certificate_pem })
                if certificate_pem.len() <= MAX_CERTIFICATE_PEM_LEN =>
            {
                self.state = RenewalState::Storing;
                self.actions
                    .push_back(AgentRenewalAction::Store { certificate_pem });
                return Ok(());
            }
            (RenewalState::AwaitingAnswer { .. }, ControlMessage::RenewalRefused { reason }) => {
                Err(AgentRenewalError::Refused(reason))
            }
            (_, other) => Err(AgentRenewalError::Unexpected(other.name())),
        };
        self.state = RenewalState::Done;
        result
    }

    /// The stream ended (or was reset, or the connection failed) before the exchange was over.
    pub fn handle_end(&mut self) -> Result<(), AgentRenewalError> {
        match std::mem::replace(&mut self.state, RenewalState::Done) {
            RenewalState::Done => Ok(()),
            RenewalState::AwaitingAnswer { .. } | RenewalState::Storing => {
                Err(AgentRenewalError::Unanswered)
            }
        }
    }

    /// The certificate and its key are stored: end the stream.
    pub fn stored(&mut self) -> Result<(), OutOfOrder> {
        if self.state != RenewalState::Storing {
            return Err(OutOfOrder("stored"));
        }
        self.state = RenewalState::Done;
        self.actions.push_back(AgentRenewalAction::Finish);
        Ok(())
    }

    /// The timer from [`Self::poll_timeout`] fired (or any time passed).
    pub fn handle_timeout(&mut self, now: I) -> Result<(), AgentRenewalError> {
        match self.state {
            RenewalState::AwaitingAnswer { deadline } if now >= deadline => {
                self.state = RenewalState::Done;
                Err(AgentRenewalError::NoAnswer(self.step))
            }
            _ => Ok(()),
        }
    }

    /// When [`Self::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<I> {
        match self.state {
            RenewalState::AwaitingAnswer { deadline } => Some(deadline),
            RenewalState::Storing | RenewalState::Done => None,
        }
    }

    /// Whether the exchange is over.
    pub fn is_done(&self) -> bool {
        self.state == RenewalState::Done
    }
}
