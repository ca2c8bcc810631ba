//! The rollout scheduler. Every replica runs it; each tick takes every active rollout with
//! `FOR UPDATE SKIP LOCKED`, so exactly one replica advances a rollout at a time, and a
//! rollout whose replica died is simply picked up by the next tick elsewhere. The decisions
//! come from the pure state machine in `sensei_shared::rollout`; this module only reads and
//! writes rows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sensei_shared::rollout::{decide, Decision, OnHalt, Progress, Strategy, TargetStatus};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use crate::agents::AgentHub;
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::jobs::queue::{enqueue, enqueue_many, NewJob};
use crate::jobs::JobKind;

const TICK: Duration = Duration::from_millis(250);

pub fn parse_status(s: &str) -> TargetStatus {
    match s {
        "running" => TargetStatus::Running,
        "succeeded" => TargetStatus::Succeeded,
        "failed" => TargetStatus::Failed,
        "unreachable" => TargetStatus::Unreachable,
        "skipped" => TargetStatus::Skipped,
        _ => TargetStatus::Pending,
    }
}

/// Advances rollouts until `shutdown`.
pub async fn run(
    pool: Pool,
    hub: std::sync::Arc<AgentHub>,
    keys: std::sync::Arc<crate::field_crypto::FieldKeys>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if let Err(e) = tick(&pool, &hub, &keys).await {
            tracing::warn!(error = %e, "rollout scheduler");
        }
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn tick(
    pool: &Pool,
    hub: &AgentHub,
    keys: &crate::field_crypto::FieldKeys,
) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| e.to_string())?;
    let ids: Vec<Uuid> = client
        .query(
            "SELECT id FROM rollouts WHERE state = 'running' OR (state = 'halted' AND rolling_back) \
             ORDER BY created_at LIMIT 200",
            &[],
        )
        .await
        .map_err(|e| crate::db::describe(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    for id in ids {
        if let Err(e) = step(pool, hub, keys, id).await {
            tracing::warn!(rollout = %id, error = %e, "advancing a rollout");
        }
    }
    Ok(())
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

async fn step(
    pool: &Pool,
    hub: &AgentHub,
    keys: &crate::field_crypto::FieldKeys,
    id: Uuid,
) -> Result<(), String> {
    let db = |e: tokio_postgres::Error| crate::db::describe(&e);
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let tx = client.transaction().await.map_err(db)?;
    let Some(r) = tx
        .query_opt(
            "SELECT account_id, project_id, git_ref, strategy, state, current_batch, batch_done_at, \
                    approved, rolling_back, created_by, commit FROM rollouts WHERE id = $1 FOR UPDATE SKIP LOCKED",
            &[&id],
        )
        .await
        .map_err(db)?
    else {
        return Ok(());
    };
    let account: Uuid = r.get(0);
    let project: Uuid = r.get(1);
    let git_ref: String = r.get(2);
    let strategy: Strategy = serde_json::from_value(r.get(3)).map_err(|e| e.to_string())?;
    let state: String = r.get(4);
    let current_batch: Option<i32> = r.get(5);
    let batch_done_at: Option<DateTime<Utc>> = r.get(6);
    let approved: bool = r.get(7);
    let rolling_back: bool = r.get(8);
    let created_by: Option<Uuid> = r.get(9);
    let mut commit: Option<String> = r.get(10);

    // Fold finished deployments into the targets. A job nobody collected is "unreachable".
    tx.execute(
        "UPDATE rollout_targets t SET \
           status = CASE WHEN d.status = 'succeeded' THEN 'succeeded' \
                         WHEN d.error_step = 'dispatch' THEN 'unreachable' ELSE 'failed' END, \
           error = d.error_message \
         FROM deployments d WHERE d.id = t.deployment_id AND t.rollout_id = $1 \
           AND t.status = 'running' AND d.status IN ('succeeded', 'failed')",
        &[&id],
    )
    .await
    .map_err(db)?;
    // The first success fixes the commit the rest of the rollout deploys: a push to the
    // branch after the canary was approved does not reach the fleet.
    if commit.is_none() {
        commit = tx
            .query_opt(
                "UPDATE rollouts SET commit = first.commit FROM ( \
                   SELECT d.commit FROM rollout_targets t JOIN deployments d ON d.id = t.deployment_id \
                   WHERE t.rollout_id = $1 AND t.status = 'succeeded' AND d.commit ~ '^[0-9a-f]{40}$' \
                   ORDER BY d.finished_at, d.id LIMIT 1) first \
                 WHERE rollouts.id = $1 RETURNING rollouts.commit",
                &[&id],
            )
            .await
            .map_err(db)?
            .map(|row| row.get(0));
    }

    if rolling_back {
        let open: i64 = tx
            .query_one(
                "SELECT count(*) FROM rollout_targets t JOIN deployments d ON d.id = t.rollback_deployment_id \
                 WHERE t.rollout_id = $1 AND d.status IN ('queued', 'running')",
                &[&id],
            )
            .await
            .map_err(db)?
            .get(0);
        if open == 0 {
            tx.execute(
                "UPDATE rollouts SET state = 'rolled_back', rolling_back = false, finished_at = now(), \
                 updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db)?;
            audit::append(
                &tx,
                keys.audit_keys(),
                &system_event(account, "rollout.rolled_back", id, json!({})),
            )
            .await
            .map_err(db)?;
        }
        return tx.commit().await.map_err(db);
    }
    if state != "running" {
        return tx.commit().await.map_err(db);
    }

    let targets = tx
        .query(
            "SELECT server_id, batch, status, deployment_id FROM rollout_targets \
             WHERE rollout_id = $1 ORDER BY batch, position",
            &[&id],
        )
        .await
        .map_err(db)?;
    let mut statuses: Vec<Vec<TargetStatus>> = Vec::new();
    for t in &targets {
        let batch = usize::try_from(t.get::<_, i32>(1)).unwrap_or(0);
        while statuses.len() <= batch {
            statuses.push(Vec::new());
        }
        statuses[batch].push(parse_status(t.get(2)));
    }
    let decision = decide(&Progress {
        strategy: &strategy,
        statuses: &statuses,
        current_batch: current_batch.and_then(|b| usize::try_from(b).ok()),
        batch_done_at: batch_done_at.map(|t| t.timestamp()),
        approved,
        now: Utc::now().timestamp(),
    });
    let mut woken = Vec::new();
    match decision {
        Decision::Wait | Decision::WaitUntil(_) => {}
        Decision::BatchDone => {
            tx.execute(
                "UPDATE rollouts SET batch_done_at = now(), updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db)?;
        }
        Decision::StartBatch(batch) => {
            let timeout = Duration::from_secs(u64::from(strategy.unreachable_after_seconds));
            let batch_no = i32::try_from(batch).unwrap_or(i32::MAX);
            // One job per target, each signed later for its own server; the whole batch is
            // queued in one statement and every agent is woken at once.
            let members: Vec<Uuid> = targets
                .iter()
                .filter(|t| t.get::<_, i32>(1) == batch_no)
                .map(|t| t.get(0))
                .collect();
            let queued = enqueue_many(
                &tx,
                &NewJob {
                    account_id: account,
                    created_by,
                    project_id: project,
                    kind: JobKind::Deploy,
                    git_ref: Some(&git_ref),
                    rollback_of: None,
                    rollout_id: Some(id),
                    expected_commit: commit.as_deref(),
                    rollback_to: None,
                    timeout,
                },
                &members,
            )
            .await
            .map_err(db)?;
            let (servers, jobs): (Vec<Uuid>, Vec<Uuid>) = queued.into_iter().unzip();
            tx.execute(
                "UPDATE rollout_targets t SET status = 'running', deployment_id = q.job \
                 FROM unnest($2::uuid[], $3::uuid[]) AS q(server, job) \
                 WHERE t.rollout_id = $1 AND t.server_id = q.server",
                &[&id, &servers, &jobs],
            )
            .await
            .map_err(db)?;
            tx.execute(
                "UPDATE rollout_targets SET status = 'unreachable', \
                 error = 'the server has no valid agent certificate or SSH credentials' \
                 WHERE rollout_id = $1 AND batch = $2 AND status = 'pending'",
                &[&id, &batch_no],
            )
            .await
            .map_err(db)?;
            woken.extend(servers);
            tx.execute(
                "UPDATE rollouts SET current_batch = $2, batch_done_at = NULL, updated_at = now() WHERE id = $1",
                &[&id, &batch_no],
            )
            .await
            .map_err(db)?;
        }
        Decision::AwaitApproval => {
            tx.execute(
                "UPDATE rollouts SET state = 'paused', paused_reason = 'awaiting approval after the canary', \
                 updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db)?;
            audit::append(
                &tx,
                keys.audit_keys(),
                &system_event(account, "rollout.awaiting_approval", id, json!({})),
            )
            .await
            .map_err(db)?;
        }
        Decision::Halt(reason) => {
            tx.execute(
                "UPDATE rollout_targets SET status = 'skipped' WHERE rollout_id = $1 AND status = 'pending'",
                &[&id],
            )
            .await
            .map_err(db)?;
            let mut rolling = false;
            if strategy.on_halt == OnHalt::Rollback {
                let switched = tx
                    .query(
                        "SELECT server_id, deployment_id FROM rollout_targets \
                         WHERE rollout_id = $1 AND status = 'succeeded'",
                        &[&id],
                    )
                    .await
                    .map_err(db)?;
                for t in switched {
                    let server: Uuid = t.get(0);
                    let of: Option<Uuid> = t.get(1);
                    let timeout =
                        Duration::from_secs(u64::from(strategy.unreachable_after_seconds));
                    let rollback = NewJob {
                        account_id: account,
                        created_by,
                        project_id: project,
                        kind: JobKind::Rollback,
                        git_ref: None,
                        rollback_of: of,
                        rollout_id: Some(id),
                        expected_commit: None,
                        rollback_to: None,
                        timeout,
                    };
                    if let Ok(rb) = enqueue(&tx, &rollback, server).await {
                        tx.execute(
                            "UPDATE rollout_targets SET rollback_deployment_id = $3 WHERE rollout_id = $1 AND server_id = $2",
                            &[&id, &server, &rb],
                        )
                        .await
                        .map_err(db)?;
                        woken.push(server);
                        rolling = true;
                    }
                }
            }
            tx.execute(
                "UPDATE rollouts SET state = 'halted', halted_reason = $2, rolling_back = $3, updated_at = now(), \
                 finished_at = CASE WHEN $3 THEN NULL ELSE now() END WHERE id = $1",
                &[&id, &reason, &rolling],
            )
            .await
            .map_err(db)?;
            audit::append(
                &tx,
                keys.audit_keys(),
                &system_event(
                    account,
                    "rollout.halted",
                    id,
                    json!({"reason": reason, "rolling_back": rolling}),
                ),
            )
            .await
            .map_err(db)?;
        }
        Decision::Complete => {
            tx.execute(
                "UPDATE rollouts SET state = 'succeeded', finished_at = now(), updated_at = now() WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(db)?;
            audit::append(
                &tx,
                keys.audit_keys(),
                &system_event(account, "rollout.succeeded", id, json!({})),
            )
            .await
            .map_err(db)?;
        }
    }
    tx.commit().await.map_err(db)?;
    for server in woken {
        hub.wakes.wake(server);
    }
    Ok(())
}
