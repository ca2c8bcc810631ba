//! Following a CA rotation on the agent's side ([`AgentTrust`]): one stream of its own,
//! opened after the hello like a job stream, and held open for as long as the session lasts.
//! The control plane's side is a [`super::ControlJob`] whose first message is `WatchTrust`.
//!
//! ```text
//! trust stream   agent: WatchTrust { pinned } ──▶ wait until a rotation this agent has not
//!                                                 followed exists (at once, or later)
//!                       ◀──────────── CaEndorsed { new CA, endorser, signature, renew }
//!                       (checks the endorsement against its pinned CAs, stores the new CA)
//!                       end of stream ──▶ the agent pins the new CA
//!                       (renew: the agent renews its certificate now, under the new CA)
//!                       ◀──────────── CaRetired { retired, current }   (after `ca retire`)
//!                       (unpins the retired CAs, never the current one)
//!                       end of stream ──▶ unpinned
//! ```
//!
//!
//! An agent that follows job-key rotations too opens the stream with `WatchTrustAndJobKeys`
//! ([`AgentTrust::with_job_keys`]), naming its pinned job-signing keys as well, and may be
//! answered with `JobKeyEndorsed` (a new key endorsed by a pinned one: [`crate::job_key`]) or
//! `JobKeyRetired`, handled the same way. Only such a watch accepts those answers.
//!
//! The stream has no deadline: the answer may come days later, when an operator rotates the
//! CA. An endorsement the agent refuses resets the stream, and the agent watches no more on
//! that connection: a control plane that sends a forgery is not asked again until the next
//! one.

use std::collections::VecDeque;

use super::HelloSent;
use crate::protocol::{
    AgentMessage, ControlMessage, MAX_CERTIFICATE_PEM_LEN, MAX_PINNED_CAS, MAX_PINNED_JOB_KEYS,
    MAX_SIGNATURE_LEN,
};

/// The agent's side of one trust stream.
#[derive(Debug)]
pub struct AgentTrust {
    state: TrustState,
    /// The watch named the job keys: job-key news may come.
    job_keys: bool,
    actions: VecDeque<AgentTrustAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustState {
    /// `WatchTrust` is queued or sent; an answer may come at any time.
    Watching,
    /// An endorsement came; the driver checks and stores it.
    Storing,
    Done,
}

/// What the agent's trust driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentTrustAction {
    /// Write this message on the trust stream.
    Send(AgentMessage),
    /// Check the endorsement against the pinned CAs; if it holds, add `ca_pem` to them
    /// (atomically) and call [`AgentTrust::stored`], else [`AgentTrust::refused`]. With
    /// `renew`, renew the certificate once the CA is stored.
    Check {
        ca_pem: String,
        endorser: [u8; 32],
        signature: Vec<u8>,
        renew: bool,
    },
    /// Unpin the CAs in `retired` if `current` is pinned (keeping `current` whatever
    /// `retired` says), then call [`AgentTrust::stored`], or [`AgentTrust::refused`].
    Unpin {
        retired: Vec<[u8; 32]>,
        current: [u8; 32],
    },
    /// Check the endorsement against the pinned job keys; if it holds, add `new_key` to them
    /// (atomically) and call [`AgentTrust::stored`], else [`AgentTrust::refused`].
    CheckJobKey {
        new_key: [u8; 32],
        endorser: [u8; 32],
        signature: Vec<u8>,
    },
    /// Unpin the job keys in `retired` if `current` is pinned (keeping `current` whatever
    /// `retired` says), then call [`AgentTrust::stored`], or [`AgentTrust::refused`].
    UnpinJobKeys {
        retired: Vec<[u8; 32]>,
        current: [u8; 32],
    },
    /// End the stream: this tells the control plane the new CA is pinned (or the retired
    /// ones unpinned).
    Finish,
    /// Reset the stream: the endorsement was refused, nothing was stored.
    Reset,
}

/// Why a trust stream ended without a new CA. None of these ends the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentTrustError {
    /// The stream ended or was reset without an answer: a control plane that predates CA
    /// rotation (it cannot read `WatchTrust`), or one that went away.
    #[error("the control plane does not announce CA rotations on this connection")]
    Unanswered,
    /// Something other than an endorsement, or one too large to read.
    #[error("unexpected {0} on the trust stream")]
    Unexpected(&'static str),
    /// Asked to pin more CAs than a watch may name: the driver's bug, or a state directory
    /// that pins too many.
    #[error("too many pinned CAs to name ({0})")]
    TooManyPinned(usize),
    /// Asked to name more job keys than a watch may.
    #[error("too many pinned job-signing keys to name ({0})")]
    TooManyJobKeys(usize),
}

impl AgentTrust {
    /// A trust stream opened after the hello, naming the fingerprints of the CAs the agent
    /// pins.
    pub fn new(_hello: HelloSent, pinned_cas: Vec<[u8; 32]>) -> Result<Self, AgentTrustError> {
        if pinned_cas.len() > MAX_PINNED_CAS {
            return Err(AgentTrustError::TooManyPinned(pinned_cas.len()));
        }
        Ok(Self {
            state: TrustState::Watching,
            job_keys: false,
            actions: VecDeque::from([AgentTrustAction::Send(AgentMessage::WatchTrust {
                pinned_cas,
            })]),
        })
    }

    /// A trust stream that follows job-key rotations too, naming the pinned job-signing keys
    /// as well (which acknowledges them).
    pub fn with_job_keys(
        _hello: HelloSent,
        pinned_cas: Vec<[u8; 32]>,
        job_keys: Vec<[u8; 32]>,
    ) -> Result<Self, AgentTrustError> {
        if pinned_cas.len() > MAX_PINNED_CAS {
            return Err(AgentTrustError::TooManyPinned(pinned_cas.len()));
        }
        if job_keys.len() > MAX_PINNED_JOB_KEYS {
            return Err(AgentTrustError::TooManyJobKeys(job_keys.len()));
        }
        Ok(Self {
            state: TrustState::Watching,
            job_keys: true,
            actions: VecDeque::from([AgentTrustAction::Send(AgentMessage::WatchTrustAndJobKeys {
                pinned_cas,
                job_keys,
            })]),
        })
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Option<AgentTrustAction> {
        self.actions.pop_front()
    }

    /// A message arrived on the trust stream.
    pub fn handle(&mut self, message: ControlMessage) -> Result<(), AgentTrustError> {
        match (self.state, message) {
            (
                TrustState::Watching,
                ControlMessage::CaEndorsed {
                    ca_pem,
                    endorser,
                    signature,
                    renew,
                },
            ) if ca_pem.len() <= MAX_CERTIFICATE_PEM_LEN
                && signature.len() <= MAX_SIGNATURE_LEN =>
            {
                self.state = TrustState::Storing;
                self.actions.push_back(AgentTrustAction::Check {
                    ca_pem,
                    endorser,
                    signature,
                    renew,
                });
                Ok(())
            }
            (TrustState::Watching, ControlMessage::CaRetired { retired, current })
                if retired.len() <= MAX_PINNED_CAS =>
            {
                self.state = TrustState::Storing;
                self.actions
                    .push_back(AgentTrustAction::Unpin { retired, current });
                Ok(())
            }
            (
                TrustState::Watching,
                ControlMessage::JobKeyEndorsed {
                    new_key,
                    endorser,
                    signature,
                },
            ) if self.job_keys && signature.len() <= MAX_SIGNATURE_LEN => {
                self.state = TrustState::Storing;
                self.actions.push_back(AgentTrustAction::CheckJobKey {
                    new_key,
                    endorser,
                    signature,
                });
                Ok(())
            }
            (TrustState::Watching, ControlMessage::JobKeyRetired { retired, current })
                if self.job_keys && retired.len() <= MAX_PINNED_JOB_KEYS =>
            {
                self.state = TrustState::Storing;
                self.actions
                    .push_back(AgentTrustAction::UnpinJobKeys { retired, current });
                Ok(())
            }
            (_, other) => {
                self.state = TrustState::Done;
                self.actions.push_back(AgentTrustAction::Reset);
                Err(AgentTrustError::Unexpected(other.name()))
            }
        }
    }

    /// The endorsement held and the new CA is pinned: end the stream.
    pub fn stored(&mut self) -> Result<(), super::OutOfOrder> {
        if self.state != TrustState::Storing {
            return Err(super::OutOfOrder("stored"));
        }
        self.state = TrustState::Done;
        self.actions.push_back(AgentTrustAction::Finish);
        Ok(())
    }

    /// The endorsement did not hold (or the CA could not be stored): reset the stream.
    pub fn refused(&mut self) -> Result<(), super::OutOfOrder> {
        if self.state != TrustState::Storing {
            return Err(super::OutOfOrder("refused"));
        }
        self.state = TrustState::Done;
        self.actions.push_back(AgentTrustAction::Reset);
        Ok(())
    }

    /// The stream ended (or was reset, or the connection failed) before an answer.
    pub fn handle_end(&mut self) -> Result<(), AgentTrustError> {
        match std::mem::replace(&mut self.state, TrustState::Done) {
            TrustState::Done => Ok(()),
            TrustState::Watching | TrustState::Storing => Err(AgentTrustError::Unanswered),
        }
    }

    /// Whether the exchange is over.
    pub fn is_done(&self) -> bool {
        self.state == TrustState::Done
    }
}
