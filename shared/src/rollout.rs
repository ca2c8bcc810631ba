//! Fleet-wide rollouts as a pure state machine: how targets are cut into batches, what to do
//! next given where every target stands, and which operator commands each state allows. The
//! control plane's scheduler and API persist the state in PostgreSQL and apply the decisions;
//! nothing here reads a clock or a database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What to do when the failure budget is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnHalt {
    /// Stop starting batches; switched servers stay on the new release.
    #[default]
    Stop,
    /// Switch the servers already switched back to their previous good release.
    Rollback,
}

/// How a rollout proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Strategy {
    /// Servers that go first, alone (0: no canary).
    pub canary: u32,
    /// Servers per batch after the canary. Wins over `batch_percent`.
    pub batch_size: Option<u32>,
    /// Batch size as a percentage of all targets (rounded up, at least one server).
    pub batch_percent: Option<u32>,
    /// Failed or unreachable targets tolerated; one more halts the rollout.
    pub max_failures: u32,
    /// Wait between batches.
    pub pause_seconds: u32,
    /// Wait for `approve` after the canary batch.
    pub manual_approval: bool,
    pub on_halt: OnHalt,
    /// A target whose server does not collect its job within this long is `unreachable`.
    pub unreachable_after_seconds: u32,
    /// Agent servers whose agent is older (or has never said its version) are `skipped`
    /// with the reason, and take no part; SSH servers run no agent and are not affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<String>,
    /// Agent upgrade rollouts: how long a target's agent has to come back reporting the
    /// version asked for before the target fails (default
    /// [`crate::upgrade::DEFAULT_UPGRADE_DEADLINE_SECS`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_deadline_seconds: Option<u32>,
}

/// The safe default: one canary, then 10% of the fleet at a time, halting at the first
/// failure. Never everything at once.
impl Default for Strategy {
    fn default() -> Self {
        Self {
            canary: 1,
            batch_size: None,
            batch_percent: Some(10),
            max_failures: 0,
            pause_seconds: 0,
            manual_approval: false,
            on_halt: OnHalt::Stop,
            unreachable_after_seconds: 120,
            min_agent_version: None,
            upgrade_deadline_seconds: None,
        }
    }
}

impl Strategy {
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_size == Some(0) {
            return Err("batch_size must be at least 1".into());
        }
        if let Some(p) = self.batch_percent {
            if !(1..=100).contains(&p) {
                return Err("batch_percent must be between 1 and 100".into());
            }
        }
        if self.pause_seconds > 86_400 {
            return Err("pause_seconds must be at most 86400".into());
        }
        if !(1..=86_400).contains(&self.unreachable_after_seconds) {
            return Err("unreachable_after_seconds must be between 1 and 86400".into());
        }
        if let Some(s) = self.upgrade_deadline_seconds {
            let max = crate::upgrade::MAX_UPGRADE_DEADLINE_SECS;
            if !(1..=max).contains(&s) {
                return Err(format!(
                    "upgrade_deadline_seconds must be between 1 and {max}"
                ));
            }
        }
        if let Some(v) = &self.min_agent_version {
            if v.len() > 64 || semver::Version::parse(v).is_err() {
                return Err(format!(
                    "min_agent_version must be a version such as 1.4.0, not {:?}",
                    v.chars().take(64).collect::<String>()
                ));
            }
        }
        Ok(())
    }

    /// Why an agent of `version` (None: never reported) may not take part, if it may not.
    pub fn agent_refusal(&self, version: Option<&str>) -> Option<String> {
        let min = self.min_agent_version.as_deref()?;
        let wanted = semver::Version::parse(min).ok()?;
        match version.map(semver::Version::parse) {
            None => Some(format!(
                "the agent has not reported its version; this rollout needs {min} or newer"
            )),
            Some(Err(_)) => Some(format!(
                "the agent's version is unreadable; this rollout needs {min} or newer"
            )),
            Some(Ok(v)) if v < wanted => Some(format!(
                "agent {v} is older than this rollout's minimum {min}"
            )),
            Some(Ok(_)) => None,
        }
    }

    /// How long an agent upgrade target waits for its agent to come back on the new version.
    pub fn upgrade_deadline(&self) -> u32 {
        self.upgrade_deadline_seconds
            .unwrap_or(crate::upgrade::DEFAULT_UPGRADE_DEADLINE_SECS)
    }

    /// The sizes of the batches for `targets` servers, canary first.
    pub fn batches(&self, targets: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut left = targets;
        let canary = (self.canary as usize).min(left);
        if canary > 0 {
            sizes.push(canary);
            left -= canary;
        }
        let size = match (self.batch_size, self.batch_percent) {
            (Some(n), _) => n as usize,
            (None, Some(p)) => (targets * p as usize).div_ceil(100),
            (None, None) => targets.div_ceil(10),
        }
        .max(1);
        while left > 0 {
            let b = size.min(left);
            sizes.push(b);
            left -= b;
        }
        sizes
    }
}

/// Where one target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unreachable,
    Skipped,
}

impl TargetStatus {
    /// The text stored in `rollout_targets.status` and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetStatus::Pending => "pending",
            TargetStatus::Running => "running",
            TargetStatus::Succeeded => "succeeded",
            TargetStatus::Failed => "failed",
            TargetStatus::Unreachable => "unreachable",
            TargetStatus::Skipped => "skipped",
        }
    }

    pub fn is_final(self) -> bool {
        !matches!(self, TargetStatus::Pending | TargetStatus::Running)
    }

    pub fn is_failure(self) -> bool {
        matches!(self, TargetStatus::Failed | TargetStatus::Unreachable)
    }
}

impl FromStr for TargetStatus {
    type Err = Error;

    /// Reads a stored status. A text this version does not know is refused rather than taken
    /// for `pending`: that would start a deploy the row never asked for.
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "pending" => TargetStatus::Pending,
            "running" => TargetStatus::Running,
            "succeeded" => TargetStatus::Succeeded,
            "failed" => TargetStatus::Failed,
            "unreachable" => TargetStatus::Unreachable,
            "skipped" => TargetStatus::Skipped,
            _ => return Err(Error::UnknownTargetStatus(s.to_owned())),
        })
    }
}

/// One server of a rollout, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub server: Uuid,
    /// The batch it belongs to, 0 being the first (the canary's when there is one).
    pub batch: usize,
    pub status: TargetStatus,
    /// Its deploy job, once its batch started.
    pub deployment: Option<Uuid>,
}

/// What the scheduler needs to know of a rollout's targets to decide. The database answers it
/// from two indexes (targets by batch and status; failed targets), so that a tick costs about
/// the same for ten targets as for 100,000: reading every target on every tick was a fifth of
/// the database's work in a rollout of 10,000 (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// How many batches the rollout has (none without targets).
    pub batches: usize,
    /// Targets failed or unreachable, in every batch.
    pub failures: usize,
    /// Some target of the current batch is still pending or running.
    pub current_open: bool,
    /// Some target of the current batch has no job yet: a large batch is queued a chunk at a
    /// time (each chunk its own transaction), so that its first servers run while the rest
    /// is queued.
    pub current_unqueued: bool,
}

impl Tally {
    /// The tally of targets held in memory, `statuses[batch]` being every status of a batch:
    /// what the database's count must agree with.
    pub fn of(statuses: &[Vec<TargetStatus>], current_batch: Option<usize>) -> Self {
        let current = current_batch.and_then(|b| statuses.get(b));
        Tally {
            batches: statuses.len(),
            failures: statuses.iter().flatten().filter(|s| s.is_failure()).count(),
            current_open: current.is_some_and(|b| b.iter().any(|s| !s.is_final())),
            current_unqueued: current.is_some_and(|b| b.contains(&TargetStatus::Pending)),
        }
    }
}

/// The targets to roll back when the rollout halts: with [`OnHalt::Rollback`], every target
/// whose deploy succeeded (its server switched to the new release); with [`OnHalt::Stop`],
/// none. Targets still running are left alone: their outcome is not known yet.
pub fn to_roll_back<'t>(strategy: &Strategy, targets: &'t [Target]) -> Vec<&'t Target> {
    match strategy.on_halt {
        OnHalt::Stop => Vec::new(),
        OnHalt::Rollback => targets
            .iter()
            .filter(|t| t.status == TargetStatus::Succeeded)
            .collect(),
    }
}

/// What the scheduler knows when it decides.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub strategy: &'a Strategy,
    pub tally: Tally,
    /// The last batch started, if any.
    pub current_batch: Option<usize>,
    /// When the current batch was seen complete (unix seconds), if it is.
    pub batch_done_at: Option<i64>,
    pub approved: bool,
    pub now: i64,
}

/// The next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Queue jobs for the batch's targets still pending (at most a chunk of them: the same
    /// decision comes again until none is left).
    StartBatch(usize),
    /// The current batch is still running.
    Wait,
    /// The current batch has ended; note when (the pause counts from then).
    BatchDone,
    /// Pause between batches until this time.
    WaitUntil(i64),
    AwaitApproval,
    Halt(String),
    Complete,
}

pub fn decide(p: &Progress<'_>) -> Decision {
    let failures = p.tally.failures;
    if failures > p.strategy.max_failures as usize {
        return Decision::Halt(format!(
            "{failures} target(s) failed or were unreachable; max_failures is {}",
            p.strategy.max_failures
        ));
    }
    let Some(current) = p.current_batch else {
        return if p.tally.batches == 0 {
            Decision::Complete
        } else {
            Decision::StartBatch(0)
        };
    };
    if p.tally.current_unqueued {
        return Decision::StartBatch(current);
    }
    if p.tally.current_open {
        return Decision::Wait;
    }
    if current + 1 >= p.tally.batches {
        return Decision::Complete;
    }
    let Some(done_at) = p.batch_done_at else {
        return Decision::BatchDone;
    };
    if current == 0 && p.strategy.canary > 0 && p.strategy.manual_approval && !p.approved {
        return Decision::AwaitApproval;
    }
    let resume_at = done_at + i64::from(p.strategy.pause_seconds);
    if p.now < resume_at {
        return Decision::WaitUntil(resume_at);
    }
    Decision::StartBatch(current + 1)
}

/// Why a rollout is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// `POST /v1/rollouts/{id}/pause`; `resume` lets it go on.
    Operator,
    /// The canary batch ended and the strategy wants `approve` before the next batch.
    AwaitingApproval,
}

impl PauseReason {
    /// The text stored in `rollouts.paused_reason` and shown by the API. Stored rows carry
    /// these exact texts, so they never change.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::Operator => "paused by an operator",
            PauseReason::AwaitingApproval => "awaiting approval after the canary",
        }
    }
}

impl FromStr for PauseReason {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        [PauseReason::Operator, PauseReason::AwaitingApproval]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::UnknownPauseReason(s.to_owned()))
    }
}

/// Where a rollout stands: the `state` column with the columns that qualify it
/// (`paused_reason`, `rolling_back`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    /// Batches start as the strategy allows.
    Running,
    /// No batch starts; deploys already running finish.
    Paused(PauseReason),
    /// The failure budget was exceeded. While `rolling_back`, the rollback jobs of the
    /// switched servers are still queued or running; the rollout then ends `RolledBack`.
    Halted { rolling_back: bool },
    /// Every batch ran within the failure budget.
    Succeeded,
    /// Ended by an operator, or by the deletion of its project. `paused` is why it was paused
    /// when that happened: the row keeps `paused_reason`, and a refused command mentions it.
    Aborted { paused: Option<PauseReason> },
    /// Halted, then every rollback job ended.
    RolledBack,
}

impl RolloutState {
    /// Reads the stored columns. Texts this version does not know are refused, never guessed:
    /// acting on a misread state would start or stop deploys nobody asked for.
    ///
    /// `paused_reason` is kept only where it qualifies the state (paused, aborted) and
    /// `rolling_back` only for a halted rollout; a project's deletion, for one, aborts a
    /// rollout mid-rollback without clearing `rolling_back`.
    pub fn from_stored(
        state: &str,
        paused_reason: Option<&str>,
        rolling_back: bool,
    ) -> Result<Self, Error> {
        let paused = paused_reason.map(str::parse).transpose()?;
        Ok(match state {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused(paused.ok_or(Error::PausedWithoutReason)?),
            "halted" => RolloutState::Halted { rolling_back },
            "succeeded" => RolloutState::Succeeded,
            "aborted" => RolloutState::Aborted { paused },
            "rolled_back" => RolloutState::RolledBack,
            _ => return Err(Error::UnknownState(state.to_owned())),
        })
    }

    /// The text stored in `rollouts.state` and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused(_) => "paused",
            RolloutState::Halted { .. } => "halted",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Aborted { .. } => "aborted",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    /// The value of `rollouts.paused_reason` in this state.
    pub fn paused_reason(self) -> Option<PauseReason> {
        match self {
            RolloutState::Paused(reason) => Some(reason),
            RolloutState::Aborted { paused } => paused,
            _ => None,
        }
    }

    /// Whether nothing will change the rollout any more (`finished_at` is set).
    pub fn is_final(self) -> bool {
        match self {
            RolloutState::Running | RolloutState::Paused(_) => false,
            RolloutState::Halted { rolling_back } => !rolling_back,
            RolloutState::Succeeded | RolloutState::Aborted { .. } | RolloutState::RolledBack => {
                true
            }
        }
    }
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Approve,
    Abort,
}

impl Command {
    /// The audit action recorded when the command is applied.
    pub fn audit_action(self) -> &'static str {
        match self {
            Command::Pause => "rollout.paused",
            Command::Resume => "rollout.resumed",
            Command::Approve => "rollout.approved",
            Command::Abort => "rollout.aborted",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Approve => "approve",
            Command::Abort => "abort",
        }
    }
}

/// An allowed command, and the state it leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub command: Command,
    pub from: RolloutState,
    pub to: RolloutState,
}

impl Transition {
    /// Whether the canary's approval is recorded, letting the scheduler go past it.
    pub fn approves(&self) -> bool {
        self.command == Command::Approve
    }
}

/// A command the rollout's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub command: Command,
    pub state: RolloutState,
}

/// The API's answer, e.g. "cannot resume a rollout that is paused (awaiting approval)":
/// awaiting approval is named because it is the one pause `resume` does not end.
impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} a rollout that is {}",
            self.command.verb(),
            self.state.as_str()
        )?;
        if self.state.paused_reason() == Some(PauseReason::AwaitingApproval) {
            f.write_str(" (awaiting approval)")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// Applies an operator's command to a rollout in `state`.
///
/// Pause only while running; resume only what an operator paused, and approve only what
/// awaits approval, so that `resume` never lets a rollout past its canary unapproved; abort
/// while running or paused. Everything else has ended or is ending on its own.
pub fn transition(state: RolloutState, command: Command) -> Result<Transition, Refused> {
    use RolloutState::{Aborted, Paused, Running};
    let to = match (state, command) {
        (Running, Command::Pause) => Paused(PauseReason::Operator),
        (Paused(PauseReason::Operator), Command::Resume)
        | (Paused(PauseReason::AwaitingApproval), Command::Approve) => Running,
        // The row keeps why it was paused, as it always has.
        (Running | Paused(_), Command::Abort) => Aborted {
            paused: state.paused_reason(),
        },
        _ => return Err(Refused { command, state }),
    };
    Ok(Transition {
        command,
        from: state,
        to,
    })
}

/// A stored rollout value this version cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `rollouts.state` holds a text that names no [`RolloutState`].
    #[error("unknown rollout state {0:?}")]
    UnknownState(String),
    /// `rollouts.paused_reason` holds a text that names no [`PauseReason`].
    #[error("unknown pause reason {0:?}")]
    UnknownPauseReason(String),
    /// A paused rollout has no `paused_reason`, so neither resume nor approve would apply.
    #[error("paused rollout without a pause reason")]
    PausedWithoutReason,
    /// `rollout_targets.status` holds a text that names no [`TargetStatus`].
    #[error("unknown target status {0:?}")]
    UnknownTargetStatus(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetStatus::*;

    #[test]
    fn default_is_a_canary_then_tenths() {
        assert_eq!(
            Strategy::default().batches(100),
            [&[1usize][..], &[10; 9][..], &[9][..]].concat()
        );
        assert_eq!(Strategy::default().batches(3), vec![1, 1, 1]);
        assert_eq!(Strategy::default().batches(0), Vec::<usize>::new());
    }

    #[test]
    fn batch_size_wins_over_percent_and_canary_is_capped() {
        let s = Strategy {
            canary: 5,
            batch_size: Some(2),
            batch_percent: Some(50),
            ..Strategy::default()
        };
        assert_eq!(s.batches(3), vec![3]);
        assert_eq!(s.batches(8), vec![5, 2, 1]);
        let all = Strategy {
            canary: 0,
            batch_size: None,
            batch_percent: Some(100),
            ..Strategy::default()
        };
        assert_eq!(all.batches(7), vec![7]);
    }

    fn progress<'a>(
        s: &'a Strategy,
        statuses: &'a [Vec<TargetStatus>],
        current: Option<usize>,
        done_at: Option<i64>,
    ) -> Progress<'a> {
        Progress {
            strategy: s,
            tally: Tally::of(statuses, current),
            current_batch: current,
            batch_done_at: done_at,
            approved: false,
            now: 1000,
        }
    }

    #[test]
    fn walks_batches_with_pauses_and_approval() {
        let s = Strategy {
            pause_seconds: 30,
            manual_approval: true,
            ..Strategy::default()
        };
        let b = vec![vec![Pending], vec![Pending, Pending]];
        assert_eq!(
            decide(&progress(&s, &b, None, None)),
            Decision::StartBatch(0)
        );
        let b = vec![vec![Running], vec![Pending, Pending]];
        assert_eq!(decide(&progress(&s, &b, Some(0), None)), Decision::Wait);
        let b = vec![vec![Succeeded], vec![Pending, Pending]];
        assert_eq!(
            decide(&progress(&s, &b, Some(0), None)),
            Decision::BatchDone
        );
        assert_eq!(
            decide(&progress(&s, &b, Some(0), Some(990))),
            Decision::AwaitApproval
        );
        let mut p = progress(&s, &b, Some(0), Some(990));
        p.approved = true;
        assert_eq!(decide(&p), Decision::WaitUntil(1020));
        p.now = 1020;
        assert_eq!(decide(&p), Decision::StartBatch(1));
        let b = vec![vec![Succeeded], vec![Succeeded, Succeeded]];
        assert_eq!(decide(&progress(&s, &b, Some(1), None)), Decision::Complete);
    }

    /// A batch queued in part (a chunk committed, the rest still pending) goes on being
    /// queued before anything else, unless the failures already halt the rollout.
    #[test]
    fn a_batch_queued_in_part_is_queued_to_its_end_first() {
        let s = Strategy {
            max_failures: 1,
            manual_approval: true,
            ..Strategy::default()
        };
        let b = vec![vec![Running, Succeeded, Pending, Pending], vec![Pending]];
        assert_eq!(
            decide(&progress(&s, &b, Some(0), None)),
            Decision::StartBatch(0)
        );
        let b = vec![vec![Running, Succeeded, Running, Running], vec![Pending]];
        assert_eq!(decide(&progress(&s, &b, Some(0), None)), Decision::Wait);
        let b = vec![vec![Failed, Unreachable, Pending], vec![Pending]];
        assert!(matches!(
            decide(&progress(&s, &b, Some(0), None)),
            Decision::Halt(_)
        ));
    }

    #[test]
    fn failures_beyond_the_budget_halt() {
        let s = Strategy {
            max_failures: 1,
            ..Strategy::default()
        };
        let b = vec![vec![Failed], vec![Pending]];
        assert_eq!(
            decide(&progress(&s, &b, Some(0), Some(1))),
            Decision::StartBatch(1)
        );
        let b = vec![vec![Failed], vec![Unreachable]];
        assert!(matches!(
            decide(&progress(&s, &b, Some(1), None)),
            Decision::Halt(_)
        ));
    }

    #[test]
    fn bad_strategies_are_refused() {
        assert!(Strategy {
            batch_size: Some(0),
            ..Strategy::default()
        }
        .validate()
        .is_err());
        assert!(Strategy {
            batch_percent: Some(0),
            ..Strategy::default()
        }
        .validate()
        .is_err());
        assert!(Strategy {
            batch_percent: Some(101),
            ..Strategy::default()
        }
        .validate()
        .is_err());
        assert!(Strategy::default().validate().is_ok());
        for bad in ["", "1.2", "v1.2.3", "latest"] {
            assert!(
                Strategy {
                    min_agent_version: Some(bad.into()),
                    ..Strategy::default()
                }
                .validate()
                .is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_minimum_agent_version_refuses_older_and_unknown_agents() {
        let s = Strategy {
            min_agent_version: Some("1.4.0".into()),
            ..Strategy::default()
        };
        assert!(s.validate().is_ok());
        assert_eq!(s.agent_refusal(Some("1.4.0")), None);
        assert_eq!(
            s.agent_refusal(Some("1.10.2")),
            None,
            "compared as versions, not text"
        );
        assert!(s
            .agent_refusal(Some("1.3.9"))
            .expect("older")
            .contains("older"));
        assert!(
            s.agent_refusal(Some("1.4.0-rc.1")).is_some(),
            "a pre-release is older"
        );
        assert!(s
            .agent_refusal(None)
            .expect("unknown")
            .contains("not reported"));
        assert!(s.agent_refusal(Some("garbage")).is_some());
        assert_eq!(Strategy::default().agent_refusal(None), None);
    }

    /// Every state the table can hold, each once.
    fn every_state() -> Vec<RolloutState> {
        use PauseReason::{AwaitingApproval, Operator};
        let all = vec![
            RolloutState::Running,
            RolloutState::Paused(Operator),
            RolloutState::Paused(AwaitingApproval),
            RolloutState::Halted {
                rolling_back: false,
            },
            RolloutState::Halted { rolling_back: true },
            RolloutState::Succeeded,
            RolloutState::Aborted { paused: None },
            RolloutState::Aborted {
                paused: Some(Operator),
            },
            RolloutState::Aborted {
                paused: Some(AwaitingApproval),
            },
            RolloutState::RolledBack,
        ];
        // A new state stops this match from compiling, as a reminder to list it above.
        for s in &all {
            match s {
                RolloutState::Running
                | RolloutState::Paused(_)
                | RolloutState::Halted { .. }
                | RolloutState::Succeeded
                | RolloutState::Aborted { .. }
                | RolloutState::RolledBack => {}
            }
        }
        all
    }

    #[test]
    fn every_command_in_every_state() {
        use Command::{Abort, Approve, Pause, Resume};
        use PauseReason::{AwaitingApproval, Operator};
        use RolloutState as S;
        let halted = S::Halted {
            rolling_back: false,
        };
        let rolling_back = S::Halted { rolling_back: true };
        let aborted = |paused| S::Aborted { paused };
        let table: Vec<(RolloutState, Command, Result<RolloutState, &str>)> = vec![
            (S::Running, Pause, Ok(S::Paused(Operator))),
            (
                S::Running,
                Resume,
                Err("cannot resume a rollout that is running"),
            ),
            (
                S::Running,
                Approve,
                Err("cannot approve a rollout that is running"),
            ),
            (S::Running, Abort, Ok(aborted(None))),
            (
                S::Paused(Operator),
                Pause,
                Err("cannot pause a rollout that is paused"),
            ),
            (S::Paused(Operator), Resume, Ok(S::Running)),
            (
                S::Paused(Operator),
                Approve,
                Err("cannot approve a rollout that is paused"),
            ),
            (S::Paused(Operator), Abort, Ok(aborted(Some(Operator)))),
            (
                S::Paused(AwaitingApproval),
                Pause,
                Err("cannot pause a rollout that is paused (awaiting approval)"),
            ),
            (
                S::Paused(AwaitingApproval),
                Resume,
                Err("cannot resume a rollout that is paused (awaiting approval)"),
            ),
            (S::Paused(AwaitingApproval), Approve, Ok(S::Running)),
            (
                S::Paused(AwaitingApproval),
                Abort,
                Ok(aborted(Some(AwaitingApproval))),
            ),
            (halted, Pause, Err("cannot pause a rollout that is halted")),
            (
                halted,
                Resume,
                Err("cannot resume a rollout that is halted"),
            ),
            (
                halted,
                Approve,
                Err("cannot approve a rollout that is halted"),
            ),
            (halted, Abort, Err("cannot abort a rollout that is halted")),
            (
                rolling_back,
                Pause,
                Err("cannot pause a rollout that is halted"),
            ),
            (
                rolling_back,
                Resume,
                Err("cannot resume a rollout that is halted"),
            ),
            (
                rolling_back,
                Approve,
                Err("cannot approve a rollout that is halted"),
            ),
            (
                rolling_back,
                Abort,
                Err("cannot abort a rollout that is halted"),
            ),
            (
                S::Succeeded,
                Pause,
                Err("cannot pause a rollout that is succeeded"),
            ),
            (
                S::Succeeded,
                Resume,
                Err("cannot resume a rollout that is succeeded"),
            ),
            (
                S::Succeeded,
                Approve,
                Err("cannot approve a rollout that is succeeded"),
            ),
            (
                S::Succeeded,
                Abort,
                Err("cannot abort a rollout that is succeeded"),
            ),
            (
                aborted(None),
                Pause,
                Err("cannot pause a rollout that is aborted"),
            ),
            (
                aborted(None),
                Resume,
                Err("cannot resume a rollout that is aborted"),
            ),
            (
                aborted(None),
                Approve,
                Err("cannot approve a rollout that is aborted"),
            ),
            (
                aborted(None),
                Abort,
                Err("cannot abort a rollout that is aborted"),
            ),
            (
                aborted(Some(Operator)),
                Pause,
                Err("cannot pause a rollout that is aborted"),
            ),
            (
                aborted(Some(Operator)),
                Resume,
                Err("cannot resume a rollout that is aborted"),
            ),
            (
                aborted(Some(Operator)),
                Approve,
                Err("cannot approve a rollout that is aborted"),
            ),
            (
                aborted(Some(Operator)),
                Abort,
                Err("cannot abort a rollout that is aborted"),
            ),
            // The row of a rollout aborted while awaiting approval still says so.
            (
                aborted(Some(AwaitingApproval)),
                Pause,
                Err("cannot pause a rollout that is aborted (awaiting approval)"),
            ),
            (
                aborted(Some(AwaitingApproval)),
                Resume,
                Err("cannot resume a rollout that is aborted (awaiting approval)"),
            ),
            (
                aborted(Some(AwaitingApproval)),
                Approve,
                Err("cannot approve a rollout that is aborted (awaiting approval)"),
            ),
            (
                aborted(Some(AwaitingApproval)),
                Abort,
                Err("cannot abort a rollout that is aborted (awaiting approval)"),
            ),
            (
                S::RolledBack,
                Pause,
                Err("cannot pause a rollout that is rolled_back"),
            ),
            (
                S::RolledBack,
                Resume,
                Err("cannot resume a rollout that is rolled_back"),
            ),
            (
                S::RolledBack,
                Approve,
                Err("cannot approve a rollout that is rolled_back"),
            ),
            (
                S::RolledBack,
                Abort,
                Err("cannot abort a rollout that is rolled_back"),
            ),
        ];
        let states = every_state();
        let commands = [Pause, Resume, Approve, Abort];
        assert_eq!(table.len(), states.len() * commands.len());
        for state in &states {
            for command in commands {
                let rows = table
                    .iter()
                    .filter(|(s, c, _)| s == state && *c == command)
                    .count();
                assert_eq!(
                    rows, 1,
                    "{command:?} in {state:?} must be in the table once"
                );
            }
        }
        for (state, command, expected) in table {
            let answer = match transition(state, command) {
                Ok(t) => {
                    assert_eq!((t.command, t.from), (command, state));
                    assert_eq!(t.approves(), command == Approve);
                    Ok(t.to)
                }
                Err(refused) => {
                    assert_eq!(refused, Refused { command, state });
                    Err(refused.to_string())
                }
            };
            assert_eq!(
                answer,
                expected.map_err(str::to_owned),
                "{command:?} in {state:?}"
            );
        }
    }

    #[test]
    fn audit_actions_are_stable() {
        assert_eq!(Command::Pause.audit_action(), "rollout.paused");
        assert_eq!(Command::Resume.audit_action(), "rollout.resumed");
        assert_eq!(Command::Approve.audit_action(), "rollout.approved");
        assert_eq!(Command::Abort.audit_action(), "rollout.aborted");
    }

    #[test]
    fn stored_states_read_back_and_garbage_is_refused() {
        // Rows written by earlier versions carry these texts.
        assert_eq!(PauseReason::Operator.as_str(), "paused by an operator");
        assert_eq!(
            PauseReason::AwaitingApproval.as_str(),
            "awaiting approval after the canary"
        );
        for state in every_state() {
            let rolling_back = state == RolloutState::Halted { rolling_back: true };
            assert_eq!(
                RolloutState::from_stored(
                    state.as_str(),
                    state.paused_reason().map(PauseReason::as_str),
                    rolling_back
                ),
                Ok(state)
            );
        }
        assert_eq!(
            RolloutState::from_stored("finished", None, false),
            Err(Error::UnknownState("finished".into()))
        );
        assert_eq!(
            RolloutState::from_stored("paused", Some("awaiting approval"), false),
            Err(Error::UnknownPauseReason("awaiting approval".into()))
        );
        assert_eq!(
            RolloutState::from_stored("paused", None, false),
            Err(Error::PausedWithoutReason)
        );
        // A deleted project aborts a rollout mid-rollback and leaves `rolling_back` set.
        assert_eq!(
            RolloutState::from_stored("aborted", None, true),
            Ok(RolloutState::Aborted { paused: None })
        );
        for status in [Pending, Running, Succeeded, Failed, Unreachable, Skipped] {
            assert_eq!(status.as_str().parse(), Ok(status));
        }
        assert_eq!(
            "Pending".parse::<TargetStatus>(),
            Err(Error::UnknownTargetStatus("Pending".into()))
        );
    }

    #[test]
    fn final_states_are_those_with_nothing_left_to_do() {
        let finals: Vec<&str> = every_state()
            .into_iter()
            .filter(|s| s.is_final())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            finals,
            [
                "halted",
                "succeeded",
                "aborted",
                "aborted",
                "aborted",
                "rolled_back"
            ]
        );
        assert!(!RolloutState::Halted { rolling_back: true }.is_final());
    }

    fn target(n: u128, batch: usize, status: TargetStatus) -> Target {
        Target {
            server: Uuid::from_u128(n),
            batch,
            status,
            deployment: (status != Pending).then(|| Uuid::from_u128(1000 + n)),
        }
    }

    #[test]
    fn halting_rolls_back_exactly_the_switched_targets() {
        let targets = [
            target(1, 0, Succeeded),
            target(2, 1, Failed),
            target(3, 1, Succeeded),
            target(4, 1, Running),
            target(5, 2, Unreachable),
            target(6, 2, Pending),
            target(7, 2, Skipped),
        ];
        let rollback = Strategy {
            on_halt: OnHalt::Rollback,
            ..Strategy::default()
        };
        assert_eq!(
            to_roll_back(&rollback, &targets),
            vec![&targets[0], &targets[2]]
        );
        assert_eq!(
            to_roll_back(&Strategy::default(), &targets),
            Vec::<&Target>::new()
        );
        assert_eq!(to_roll_back(&rollback, &[]), Vec::<&Target>::new());
    }

    #[test]
    fn a_tally_counts_failures_everywhere_and_open_targets_in_the_current_batch() {
        let b = vec![
            vec![Succeeded, Failed],
            vec![Running, Unreachable, Skipped],
            vec![Pending],
        ];
        assert_eq!(
            Tally::of(&b, Some(1)),
            Tally {
                batches: 3,
                failures: 2,
                current_open: true,
                current_unqueued: false,
            }
        );
        // The last batch is open and has a target without a job.
        assert!(Tally::of(&b, Some(2)).current_unqueued);
        // The first batch is over whatever the second holds.
        assert!(!Tally::of(&b, Some(0)).current_open);
        // Nothing started yet, or a batch number past the end: nothing is open.
        assert!(!Tally::of(&b, None).current_open);
        assert!(!Tally::of(&b, Some(7)).current_open);
        assert_eq!(Tally::of(&[], None), Tally::default());
    }
}
