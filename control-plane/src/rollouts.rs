//! The rollout scheduler. Every replica runs it; each tick takes every active rollout with
//! `FOR UPDATE SKIP LOCKED`, so exactly one replica advances a rollout at a time, and a
//! rollout whose replica died is simply picked up by the next tick elsewhere. The decisions
//! come from the pure state machine in `sensei_shared::rollout`; this module only reads and
//! writes rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sensei_shared::rollout::{
    self, decide, to_roll_back, Decision, PauseReason, Progress, RolloutState, Strategy, Tally,
    Target, TargetStatus,
};
use sensei_shared::upgrade::{already_current, upgrade_outcome, UpgradeJob, UpgradeTarget};
use serde_json::json;
use tokio::sync::watch;
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::jobs::queue::{enqueue, enqueue_many, NewJob};
use crate::jobs::{history, JobKind, JobStatus};
use crate::runners::agent::AgentHub;
use crate::secrets::field_crypto::FieldKeys;

/// How often the scheduler looks at rollouts in progress.
const TICK: Duration = Duration::from_millis(250);
/// How long the scheduler sleeps when no rollout is in progress, unless a rollout changes
/// first (`activity`: the live-follow notifications, from any replica, wake it at once).
/// A rollout is created with its targets, whose insert notifies; approving, resuming,
/// aborting and rolling back update its row, which notifies too. This is only a safety net: an idle scheduler
/// costs the database one query per interval instead of four a second.
const IDLE_TICK: Duration = Duration::from_secs(10);

/// Targets of one batch queued per transaction. A batch of 10,000 queued in one statement
/// kept every server waiting for the whole insert (about half a second) and its commit; in
/// chunks, the first servers run while the rest is queued (docs/benchmarks.md).
pub const QUEUE_CHUNK: i64 = 1_000;

/// Why a rollout could not be advanced this tick. The next tick tries again.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// No database connection was available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed; the transaction is rolled back.
    #[error("database: {}", crate::store::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// The row holds a value this version cannot read, so nothing is done to it.
    #[error("stored rollout: {0}")]
    Stored(#[from] rollout::Error),
    /// The stored strategy does not parse.
    #[error("stored strategy: {0}")]
    Strategy(#[from] serde_json::Error),
    /// A stored batch number (a target's, or the rollout's current one) is negative.
    #[error("batch {0} out of range")]
    Batch(i32),
}

/// Advances rollouts until `shutdown`.
pub async fn run(
    pool: Pool,
    hub: std::sync::Arc<AgentHub>,
    keys: std::sync::Arc<crate::secrets::field_crypto::FieldKeys>,
    activity: std::sync::Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (in_progress, queueing) = match tick(&pool, &hub, &keys).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "rollout scheduler");
                (1, false)
            }
        };
        if queueing {
            // A batch's next chunk goes in at once: its servers are waiting for it.
            if *shutdown.borrow() {
                return;
            }
        } else if in_progress > 0 {
            // Busy: every target's change notifies, far more often than a tick is useful.
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(IDLE_TICK) => {}
                () = activity.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Advances every rollout in progress once; answers how many there were, and whether one of
/// them is queueing a batch (more chunks to come).
async fn tick(pool: &Pool, hub: &AgentHub, keys: &FieldKeys) -> Result<(usize, bool), StepError> {
    let client = pool.get().await?;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM rollouts WHERE state = 'running' OR (state = 'halted' AND rolling_back) \
             ORDER BY created_at LIMIT 200",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    drop(client);
    let in_progress = ids.len();
    let mut queueing = false;
    for id in ids {
        match step(pool, hub, keys, id).await {
            Ok(started) => queueing |= started,
            Err(e) => tracing::warn!(rollout = %id, error = %e, "advancing a rollout"),
        }
    }
    Ok((in_progress, queueing))
}

fn system_event(
    account: Uuid,
    action: &'static str,
    id: Uuid,
    metadata: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        account_id: Some(account),
        actor: Actor::System,
        client_ip: None,
        user_agent: None,
        action,
        target: Some(("rollout", id)),
        outcome: Outcome::Success,
        metadata,
    }
}

/// A rollout row as the scheduler needs it.
struct Rollout {
    id: Uuid,
    account: Uuid,
    /// The project and ref deployed; none for an agent upgrade.
    project: Option<Uuid>,
    git_ref: Option<String>,
    /// An agent upgrade's package version; none for a deploy.
    upgrade_version: Option<String>,
    strategy: Strategy,
    state: RolloutState,
    batch_count: usize,
    current_batch: Option<usize>,
    batch_done_at: Option<DateTime<Utc>>,
    approved: bool,
    created_by: Option<Uuid>,
    /// The commit every job deploys, once known.
    commit: Option<String>,
}

impl Rollout {
    /// Locks and reads the rollout; `None` when another replica holds it, or it is gone.
    async fn lock(tx: &Transaction<'_>, id: Uuid) -> Result<Option<Self>, StepError> {
        let Some(r) = tx
            .query_opt(
                "SELECT account_id, project_id, git_ref, strategy, state, paused_reason, batch_count, current_batch, \
                        batch_done_at, approved, rolling_back, created_by, commit, upgrade_agent_version \
                 FROM rollouts WHERE id = $1 FOR UPDATE SKIP LOCKED",
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let current_batch = match r.get::<_, Option<i32>>("current_batch") {
            Some(b) => Some(usize::try_from(b).map_err(|_| StepError::Batch(b))?),
            None => None,
        };
        let batch_count: i32 = r.get("batch_count");
        Ok(Some(Self {
            id,
            account: r.get("account_id"),
            project: r.get("project_id"),
            git_ref: r.get("git_ref"),
            upgrade_version: r.get("upgrade_agent_version"),
            strategy: serde_json::from_value(r.get("strategy"))?,
            state: RolloutState::from_stored(
                r.get("state"),
                r.get("paused_reason"),
                r.get("rolling_back"),
            )?,
            batch_count: usize::try_from(batch_count).map_err(|_| StepError::Batch(batch_count))?,
            current_batch,
            batch_done_at: r.get("batch_done_at"),
            approved: r.get("approved"),
            created_by: r.get("created_by"),
            commit: r.get("commit"),
        }))
    }

    /// How long a server has to collect a job of this rollout.
    fn job_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.strategy.unreachable_after_seconds))
    }

    /// The current batch's number as stored.
    fn current_batch_no(&self) -> Option<i32> {
        // Read from an i32 column, so it fits.
        self.current_batch
            .map(|b| i32::try_from(b).unwrap_or(i32::MAX))
    }

    /// What [`decide`] needs of the targets, looked up through the indexes of migration V26
    /// rather than read target by target.
    async fn tally(&self, tx: &Transaction<'_>) -> Result<Tally, StepError> {
        let row = tx
            .query_one(
                "SELECT (SELECT count(*) FROM rollout_targets \
                         WHERE rollout_id = $1 AND status IN ('failed', 'unreachable')), \
                        EXISTS (SELECT 1 FROM rollout_targets \
                         WHERE rollout_id = $1 AND batch = $2 AND status IN ('pending', 'running')), \
                        EXISTS (SELECT 1 FROM rollout_targets \
                         WHERE rollout_id = $1 AND batch = $2 AND status = 'pending')",
                &[&self.id, &self.current_batch_no().unwrap_or(-1)],
            )
            .await?;
        Ok(Tally {
            batches: self.batch_count,
            failures: usize::try_from(row.get::<_, i64>(0)).unwrap_or(usize::MAX),
            current_open: row.get(1),
            current_unqueued: row.get(2),
        })
    }
}

/// Every target of the rollout in rollout order (by batch, then position): only when it
/// halts, to find the servers to roll back.
async fn load_targets(tx: &Transaction<'_>, id: Uuid) -> Result<Vec<Target>, StepError> {
    tx.query(
        "SELECT server_id, batch, status, deployment_id FROM rollout_targets \
         WHERE rollout_id = $1 ORDER BY batch, position",
        &[&id],
    )
    .await?
    .iter()
    .map(|t| {
        let batch: i32 = t.get("batch");
        Ok(Target {
            server: t.get("server_id"),
            batch: usize::try_from(batch).map_err(|_| StepError::Batch(batch))?,
            status: t.get::<_, &str>("status").parse()?,
            deployment: t.get("deployment_id"),
        })
    })
    .collect()
}

/// Advances one rollout: load it, fold in what its jobs did, decide, apply, all in one
/// transaction holding the row. Answers whether it queued (part of) a batch: the next chunk,
/// if any, is then queued without waiting for the next tick.
async fn step(pool: &Pool, hub: &AgentHub, keys: &FieldKeys, id: Uuid) -> Result<bool, StepError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let Some(mut rollout) = Rollout::lock(&tx, id).await? else {
        return Ok(false);
    };

    // A deploy target takes its job's outcome as the job ends (the `deployments` trigger of
    // migration V26). An upgrade target ends when its agent comes back on the version, or at
    // its deadline: that is folded here.
    if rollout.upgrade_version.is_some() {
        fold_upgrades(&tx, &rollout).await?;
    }
    // The first success fixes the commit the rest of the rollout deploys: a push to the
    // branch after the canary was approved does not reach the fleet.
    if rollout.commit.is_none() && rollout.upgrade_version.is_none() {
        rollout.commit = history::first_deployed_commit(&tx, id).await?;
        if let Some(commit) = &rollout.commit {
            tx.execute(
                "UPDATE rollouts SET commit = $2 WHERE id = $1",
                &[&id, commit],
            )
            .await?;
        }
    }

    let mut queued = false;
    let woken = match rollout.state {
        RolloutState::Running => {
            let decision = decide(&Progress {
                strategy: &rollout.strategy,
                tally: rollout.tally(&tx).await?,
                current_batch: rollout.current_batch,
                batch_done_at: rollout.batch_done_at.map(|t| t.timestamp()),
                approved: rollout.approved,
                now: Utc::now().timestamp(),
            });
            queued = matches!(decision, Decision::StartBatch(_));
            apply(&tx, keys, &rollout, decision).await?
        }
        RolloutState::Halted { rolling_back: true } => {
            finish_rollback(&tx, keys, &rollout).await?;
            Vec::new()
        }
        // Paused or ended since the tick listed it: only an operator's command moves it on.
        RolloutState::Paused(_)
        | RolloutState::Halted {
            rolling_back: false,
        }
        | RolloutState::Succeeded
        | RolloutState::Aborted { .. }
        | RolloutState::RolledBack => Vec::new(),
    };
    tx.commit().await?;
    // Only once committed: a woken agent must find its job.
    for server in woken {
        hub.wakes.wake(server);
    }
    Ok(queued)
}

/// Carries out the scheduler's decision for a running rollout. Returns the servers that got
/// a job, to wake once the transaction is committed.
async fn apply(
    tx: &Transaction<'_>,
    keys: &FieldKeys,
    rollout: &Rollout,
    decision: Decision,
) -> Result<Vec<Uuid>, StepError> {
    let id = rollout.id;
    match decision {
        Decision::Wait | Decision::WaitUntil(_) => {}
        Decision::BatchDone => {
            tx.execute(
                "UPDATE rollouts SET batch_done_at = now(), updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await?;
        }
        Decision::StartBatch(batch) => return start_batch(tx, rollout, batch).await,
        Decision::AwaitApproval => {
            tx.execute(
                "UPDATE rollouts SET state = 'paused', paused_reason = $2, updated_at = now() \
                 WHERE id = $1",
                &[&id, &PauseReason::AwaitingApproval.as_str()],
            )
            .await?;
            audit::append(
                tx,
                keys.audit_keys(),
                &system_event(rollout.account, "rollout.awaiting_approval", id, json!({})),
            )
            .await?;
        }
        Decision::Halt(reason) => return halt(tx, keys, rollout, &reason).await,
        Decision::Complete => {
            tx.execute(
                "UPDATE rollouts SET state = 'succeeded', finished_at = now(), updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await?;
            audit::append(
                tx,
                keys.audit_keys(),
                &system_event(rollout.account, "rollout.succeeded", id, json!({})),
            )
            .await?;
        }
    }
    Ok(Vec::new())
}

/// Folds what the agents of an upgrade rollout's running targets did into the targets: each
/// ends as [`upgrade_outcome`] says, given the version its agent reports now.
async fn fold_upgrades(tx: &Transaction<'_>, rollout: &Rollout) -> Result<(), StepError> {
    let Some(wanted) = rollout.upgrade_version.as_deref() else {
        return Ok(());
    };
    let running = history::upgrade_targets(tx, rollout.id).await?;
    let deadline_secs = rollout.strategy.upgrade_deadline();
    let mut ended: (Vec<Uuid>, Vec<&str>, Vec<Option<String>>) = Default::default();
    for r in &running {
        let job = match (r.job_status, r.undelivered) {
            (Some(JobStatus::Succeeded), _) => UpgradeJob::Triggered,
            (Some(JobStatus::Failed), true) => UpgradeJob::Undelivered,
            (Some(JobStatus::Failed), false) => {
                UpgradeJob::Failed(r.message.as_deref().unwrap_or("the upgrade job failed"))
            }
            (Some(JobStatus::Queued | JobStatus::Running) | None, _) => UpgradeJob::Open,
        };
        let outcome = upgrade_outcome(&UpgradeTarget {
            wanted,
            reported: r.agent_version.as_deref(),
            job,
            started_at: r.started_at,
            deadline_secs,
            now: r.now,
        });
        if let Some((status, reason)) = outcome {
            ended.0.push(r.server);
            ended.1.push(status.as_str());
            ended
                .2
                .push((status != TargetStatus::Succeeded).then_some(reason));
        }
    }
    if !ended.0.is_empty() {
        tx.execute(
            "UPDATE rollout_targets t SET status = e.status, error = e.error \
             FROM unnest($2::uuid[], $3::text[], $4::text[]) AS e(server, status, error) \
             WHERE t.rollout_id = $1 AND t.server_id = e.server",
            &[&rollout.id, &ended.0, &ended.1, &ended.2],
        )
        .await?;
    }
    Ok(())
}

/// Queues one job per pending target of `batch`, at most [`QUEUE_CHUNK`] of them (the rest
/// in the next steps, as [`decide`] asks), each signed later for its own server: a deploy, or
/// an agent upgrade (a server already on the version succeeds at once, without one).
async fn start_batch(
    tx: &Transaction<'_>,
    rollout: &Rollout,
    batch: usize,
) -> Result<Vec<Uuid>, StepError> {
    let id = rollout.id;
    // `batch` indexes batches numbered from an i32 column, so it fits.
    let batch_no = i32::try_from(batch).unwrap_or(i32::MAX);
    // Only targets still pending: one skipped when the rollout was made (an agent below its
    // minimum version) takes no part.
    let mut members: Vec<Uuid> = tx
        .query(
            "SELECT server_id FROM rollout_targets \
             WHERE rollout_id = $1 AND batch = $2 AND status = 'pending' ORDER BY position LIMIT $3",
            &[&id, &batch_no, &QUEUE_CHUNK],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(wanted) = rollout.upgrade_version.as_deref() {
        let (current, reasons): (Vec<Uuid>, Vec<String>) = tx
            .query(
                "SELECT id, agent_version FROM servers WHERE id = ANY($1)",
                &[&members],
            )
            .await?
            .iter()
            .filter_map(|r| Some((r.get::<_, Uuid>(0), already_current(wanted, r.get(1))?)))
            .unzip();
        tx.execute(
            "UPDATE rollout_targets t SET status = 'succeeded', error = c.reason \
             FROM unnest($2::uuid[], $3::text[]) AS c(server, reason) \
             WHERE t.rollout_id = $1 AND t.server_id = c.server",
            &[&id, &current, &reasons],
        )
        .await?;
        members.retain(|m| !current.contains(m));
    }
    let kind = if rollout.upgrade_version.is_some() {
        JobKind::UpgradeAgent
    } else {
        JobKind::Deploy
    };
    // The chunk is queued in one statement and its agents are woken at once.
    let queued = enqueue_many(
        tx,
        &NewJob {
            account_id: rollout.account,
            created_by: rollout.created_by,
            project_id: rollout.project,
            kind,
            git_ref: rollout.git_ref.as_deref(),
            rollback_of: None,
            rollout_id: Some(id),
            expected_commit: rollout.commit.as_deref(),
            rollback_to: None,
            timeout: rollout.job_timeout(),
            upgrade_version: rollout.upgrade_version.as_deref(),
        },
        &members,
    )
    .await?;
    let (servers, jobs): (Vec<Uuid>, Vec<Uuid>) = queued.into_iter().unzip();
    tx.execute(
        "UPDATE rollout_targets t SET status = 'running', deployment_id = q.job, started_at = now() \
         FROM unnest($2::uuid[], $3::uuid[]) AS q(server, job) \
         WHERE t.rollout_id = $1 AND t.server_id = q.server",
        &[&id, &servers, &jobs],
    )
    .await?;
    // A member of this chunk that got no job has nothing to collect it with.
    tx.execute(
        "UPDATE rollout_targets SET status = 'unreachable', \
         error = 'the server has no valid agent certificate or SSH credentials' \
         WHERE rollout_id = $1 AND server_id = ANY($2) AND status = 'pending'",
        &[&id, &members],
    )
    .await?;
    tx.execute(
        "UPDATE rollouts SET current_batch = $2, batch_done_at = NULL, updated_at = now() WHERE id = $1",
        &[&id, &batch_no],
    )
    .await?;
    Ok(servers)
}

/// Halts the rollout: targets not started are skipped and, when the strategy says so, every
/// switched server gets a rollback job. Returns the servers that got one.
async fn halt(
    tx: &Transaction<'_>,
    keys: &FieldKeys,
    rollout: &Rollout,
    reason: &str,
) -> Result<Vec<Uuid>, StepError> {
    let id = rollout.id;
    let targets = load_targets(tx, id).await?;
    tx.execute(
        "UPDATE rollout_targets SET status = 'skipped' WHERE rollout_id = $1 AND status = 'pending'",
        &[&id],
    )
    .await?;
    let mut woken = Vec::new();
    // Projects roll back; an upgrade rolls back with another upgrade rollout (the API
    // refuses on_halt "rollback" for one).
    let switched = match rollout.project {
        Some(_) => to_roll_back(&rollout.strategy, &targets),
        None => Vec::new(),
    };
    for target in switched {
        let rollback = NewJob {
            account_id: rollout.account,
            created_by: rollout.created_by,
            project_id: rollout.project,
            kind: JobKind::Rollback,
            git_ref: None,
            rollback_of: target.deployment,
            rollout_id: Some(id),
            expected_commit: None,
            rollback_to: None,
            timeout: rollout.job_timeout(),
            upgrade_version: None,
        };
        // A server that can take no job any more (deleted, no credentials) stays on the new
        // release; that must not keep the others from rolling back.
        if let Ok(job) = enqueue(tx, &rollback, target.server).await {
            tx.execute(
                "UPDATE rollout_targets SET rollback_deployment_id = $3 WHERE rollout_id = $1 AND server_id = $2",
                &[&id, &target.server, &job],
            )
            .await?;
            woken.push(target.server);
        }
    }
    // With no rollback job under way the halt is final at once.
    let rolling_back = !woken.is_empty();
    tx.execute(
        "UPDATE rollouts SET state = 'halted', halted_reason = $2, rolling_back = $3, updated_at = now(), \
         finished_at = CASE WHEN $3 THEN NULL ELSE now() END WHERE id = $1",
        &[&id, &reason, &rolling_back],
    )
    .await?;
    audit::append(
        tx,
        keys.audit_keys(),
        &system_event(
            rollout.account,
            "rollout.halted",
            id,
            json!({"reason": reason, "rolling_back": rolling_back}),
        ),
    )
    .await?;
    Ok(woken)
}

/// Ends a halted rollout as `rolled_back` once none of its rollback jobs is queued or running.
async fn finish_rollback(
    tx: &Transaction<'_>,
    keys: &FieldKeys,
    rollout: &Rollout,
) -> Result<(), StepError> {
    let id = rollout.id;
    let open = history::open_rollbacks(tx, id).await?;
    if open > 0 {
        return Ok(());
    }
    tx.execute(
        "UPDATE rollouts SET state = 'rolled_back', rolling_back = false, finished_at = now(), \
         updated_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    audit::append(
        tx,
        keys.audit_keys(),
        &system_event(rollout.account, "rollout.rolled_back", id, json!({})),
    )
    .await?;
    Ok(())
}
