//! Fleet-wide rollouts as a pure state machine: how targets are cut into batches, and what to
//! do next given where every target stands. The control plane's scheduler persists the state
//! in PostgreSQL and applies the decisions; nothing here reads a clock or a database.

use serde::{Deserialize, Serialize};

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
        Ok(())
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
    pub fn is_final(self) -> bool {
        !matches!(self, TargetStatus::Pending | TargetStatus::Running)
    }

    pub fn is_failure(self) -> bool {
        matches!(self, TargetStatus::Failed | TargetStatus::Unreachable)
    }
}

/// What the scheduler knows when it decides.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub strategy: &'a Strategy,
    /// `statuses[batch]`: the status of every target of that batch.
    pub statuses: &'a [Vec<TargetStatus>],
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
    let failures = p
        .statuses
        .iter()
        .flatten()
        .filter(|s| s.is_failure())
        .count();
    if failures > p.strategy.max_failures as usize {
        return Decision::Halt(format!(
            "{failures} target(s) failed or were unreachable; max_failures is {}",
            p.strategy.max_failures
        ));
    }
    let Some(current) = p.current_batch else {
        return if p.statuses.is_empty() {
            Decision::Complete
        } else {
            Decision::StartBatch(0)
        };
    };
    let batch_over = p
        .statuses
        .get(current)
        .is_none_or(|b| b.iter().all(|s| s.is_final()));
    if !batch_over {
        return Decision::Wait;
    }
    if current + 1 >= p.statuses.len() {
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
            statuses,
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
    }
}
