//! Fleet-wide rollouts: deploy a ref to many servers (agent and SSH alike), batch by batch,
//! with a canary, a failure budget, pauses, approval, abort, and rollback on halt. The
//! scheduler (`crate::rollouts`) advances them; these routes start, watch and steer them.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use sensei_shared::rollout::{transition, Command, OnHalt, PauseReason, RolloutState, Strategy};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path, QueryParams};
use super::idempotency::{replayed, Claim, IdempotencyKey};
use super::live;
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::auth::Principal;
use crate::identity::reach::Reach;

const MAX_TARGETS: usize = 100_000;
/// The route's name for its idempotency keys.
const CREATE_ROUTE: &str = "POST /v1/rollouts";

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub labels: BTreeMap<String, String>,
}

/// An agent upgrade instead of a deploy.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpgradeAgent {
    /// The exact package version, e.g. `0.1.1-1` (a Debian version, at most 64 characters).
    pub version: String,
}

/// Give `project_id` and `ref` to deploy, or `upgrade_agent` to upgrade the agents.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub project_id: Option<Uuid>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// Upgrade the targets' agent package to this exact version instead of deploying.
    pub upgrade_agent: Option<UpgradeAgent>,
    /// Servers whose labels include all of these. Give this or `server_ids`.
    pub selector: Option<Selector>,
    pub server_ids: Option<Vec<Uuid>>,
    /// Defaults: canary 1, batches of 10%, halt at the first failure, no pause.
    #[schema(value_type = Object)]
    pub strategy: Option<Strategy>,
}

#[derive(Serialize, ToSchema)]
pub struct TargetView {
    pub server_id: Uuid,
    pub batch: i32,
    /// `pending`, `running`, `succeeded`, `failed`, `unreachable` or `skipped`.
    pub status: String,
    pub deployment_id: Option<Uuid>,
    pub rollback_deployment_id: Option<Uuid>,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RolloutView {
    pub id: Uuid,
    /// The project deployed (absent for an agent upgrade).
    pub project_id: Option<Uuid>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The agent upgrade, for an upgrade rollout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_agent: Option<UpgradeAgent>,
    /// `running`, `paused`, `halted`, `succeeded`, `aborted` or `rolled_back`.
    pub state: String,
    pub paused_reason: Option<String>,
    pub halted_reason: Option<String>,
    pub current_batch: Option<i32>,
    pub batch_count: i32,
    #[schema(value_type = Object)]
    pub strategy: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The commit every job of the rollout deploys: the `ref` itself when it is a full commit,
    /// otherwise the one the first successful target reported (until then absent). The
    /// deploy configuration (hooks, shared paths, health check, keep_releases, environment) is
    /// the project's as it was when the rollout started.
    pub commit: Option<String>,
    /// How many targets are in each status, e.g. `{"succeeded": 40, "pending": 60}`.
    pub target_counts: BTreeMap<String, i64>,
    /// Every target, on `GET /v1/rollouts/{id}` and its event stream; lists leave them out
    /// (page through `GET /v1/rollouts/{id}/targets` instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetView>>,
}

#[derive(Serialize, ToSchema)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TargetList {
    /// In rollout order: by batch, then position.
    pub targets: Vec<TargetView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The rollout columns and the per-status target counts, for one rollout or a list.
const ROLLOUT_SQL: &str = "SELECT r.id, r.project_id, r.git_ref, r.state, r.paused_reason, \
       r.halted_reason, r.current_batch, r.batch_count, r.strategy, r.created_at, r.finished_at, r.commit, r.upgrade_agent_version, \
       coalesce(c.counts, '{}'::jsonb) AS target_counts \
     FROM rollouts r LEFT JOIN LATERAL ( \
       SELECT jsonb_object_agg(status, n) AS counts FROM ( \
         SELECT status, count(*) AS n FROM rollout_targets WHERE rollout_id = r.id GROUP BY status \
       ) per_status) c ON true \
     WHERE r.account_id = $1";

/// The condition that keeps a rollout within a member's resource scope: its project among
/// `$p` and every one of its targets carrying the labels `$s` (NULL: no limit).
fn within_reach(p: u8, s: u8) -> String {
    format!(
        " AND (${p}::uuid[] IS NULL OR r.project_id = ANY(${p})) \
         AND (${s}::jsonb IS NULL OR NOT EXISTS (SELECT 1 FROM rollout_targets rt \
              JOIN servers rs ON rs.id = rt.server_id \
              WHERE rt.rollout_id = r.id AND NOT rs.labels @> ${s}))"
    )
}

const TARGET_SQL: &str = "SELECT server_id, batch, position, status, deployment_id, \
       rollback_deployment_id, error FROM rollout_targets WHERE rollout_id = $1";

fn rollout_view(r: &tokio_postgres::Row) -> RolloutView {
    let counts: serde_json::Value = r.get("target_counts");
    RolloutView {
        id: r.get("id"),
        project_id: r.get("project_id"),
        git_ref: r.get("git_ref"),
        upgrade_agent: r
            .get::<_, Option<String>>("upgrade_agent_version")
            .map(|version| UpgradeAgent { version }),
        state: r.get("state"),
        paused_reason: r.get("paused_reason"),
        halted_reason: r.get("halted_reason"),
        current_batch: r.get("current_batch"),
        batch_count: r.get("batch_count"),
        strategy: r.get("strategy"),
        created_at: r.get("created_at"),
        finished_at: r.get("finished_at"),
        commit: r.get("commit"),
        target_counts: serde_json::from_value(counts).unwrap_or_default(),
        targets: None,
    }
}

fn target_view(t: &tokio_postgres::Row) -> TargetView {
    TargetView {
        server_id: t.get("server_id"),
        batch: t.get("batch"),
        status: t.get("status"),
        deployment_id: t.get("deployment_id"),
        rollback_deployment_id: t.get("rollback_deployment_id"),
        error: t.get("error"),
    }
}

/// The rollout `id` with every target, if it is `account`'s and within `reach`.
async fn load(
    state: &AppState,
    account: Uuid,
    reach: &Reach,
    id: Uuid,
) -> Result<RolloutView, ApiError> {
    let client = state.pool.get().await?;
    let r = client
        .query_opt(
            &format!("{ROLLOUT_SQL} AND r.id = $2{}", within_reach(3, 4)),
            &[
                &account,
                &id,
                &reach.project_filter(),
                &reach.server_filter(),
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("rollout"))?;
    let targets = client
        .query(&format!("{TARGET_SQL} ORDER BY batch, position"), &[&id])
        .await?;
    Ok(RolloutView {
        targets: Some(targets.iter().map(target_view).collect()),
        ..rollout_view(&r)
    })
}

/// What a rollout does to each target.
enum RolloutKind {
    Deploy { project: Uuid, git_ref: String },
    UpgradeAgent { version: String },
}

impl RolloutKind {
    fn project(&self) -> Option<Uuid> {
        match self {
            Self::Deploy { project, .. } => Some(*project),
            Self::UpgradeAgent { .. } => None,
        }
    }

    fn git_ref(&self) -> Option<&str> {
        match self {
            Self::Deploy { git_ref, .. } => Some(git_ref),
            Self::UpgradeAgent { .. } => None,
        }
    }

    fn upgrade_version(&self) -> Option<&str> {
        match self {
            Self::Deploy { .. } => None,
            Self::UpgradeAgent { version } => Some(version),
        }
    }
}

/// Starts a rollout: a deploy of a project's ref, or an upgrade of the agents to an exact
/// package version.
#[utoipa::path(post, path = "/v1/rollouts", tag = "rollouts", request_body = CreateRollout,
    responses((status = 201, body = RolloutView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    idempotency: IdempotencyKey,
    JsonBody(req): JsonBody<CreateRollout>,
) -> Result<Response, ApiError> {
    let strategy = req.strategy.unwrap_or_default();
    strategy
        .validate()
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidStrategy, e))?;
    let kind = match (req.project_id, req.git_ref, req.upgrade_agent) {
        (Some(project), Some(git_ref), None) => {
            let git_ref = git_ref.trim().to_owned();
            sensei_shared::release::check_git_ref(&git_ref)
                .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidRef, e.0))?;
            RolloutKind::Deploy { project, git_ref }
        }
        (None, None, Some(upgrade)) => {
            sensei_shared::upgrade::check_package_version(&upgrade.version).map_err(|e| {
                ApiError::unprocessable(
                    ErrorCode::InvalidVersion,
                    format!("upgrade_agent.version: {e}"),
                )
            })?;
            if strategy.on_halt == OnHalt::Rollback {
                return Err(ApiError::unprocessable(
                    ErrorCode::InvalidStrategy,
                    "an agent upgrade cannot roll back on halt: start an upgrade rollout to the \
                     previous version instead (docs/agent.md, Upgrading agents)",
                ));
            }
            RolloutKind::UpgradeAgent {
                version: upgrade.version,
            }
        }
        _ => {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidRollout,
                "give project_id and ref to deploy, or upgrade_agent to upgrade the agents",
            ))
        }
    };
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let request = json!({
        "project_id": kind.project(),
        "ref": kind.git_ref(),
        "upgrade_agent": kind.upgrade_version(),
        "selector": req.selector.as_ref().map(|s| &s.labels),
        "server_ids": req.server_ids,
        "strategy": strategy,
    });
    if let Claim::Replay { status, resource } = idempotency
        .claim(&tx, principal.account_id, CREATE_ROUTE, &request)
        .await?
    {
        drop(tx);
        let view = load(&state, principal.account_id, &principal.reach, resource).await?;
        return Ok(replayed((status, Json(view))));
    }
    if let Some(project) = kind.project() {
        tx.query_opt(
            "SELECT 1 FROM projects WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&project, &principal.account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("project"))?;
    }
    // Four eyes: every rollout waits, after its canary, for someone else's approval. A
    // strategy that would never wait is refused rather than quietly changed.
    let four_eyes: bool = tx
        .query_one(
            "SELECT four_eyes_approval FROM accounts WHERE id = $1",
            &[&principal.account_id],
        )
        .await?
        .get(0);
    if four_eyes && !(strategy.canary > 0 && strategy.manual_approval) {
        return Err(ApiError::unprocessable(
            ErrorCode::FourEyesRequired,
            "this account requires four eyes: a rollout needs a canary (canary of at least 1) \
             and manual_approval, so that someone else approves it",
        ));
    }
    let mut servers: Vec<Uuid> = match (req.selector, req.server_ids) {
        (Some(selector), None) => tx
            .query(
                // Within the caller's reach: a selector never names, nor probes, a server
                // outside their resource scope.
                "SELECT id FROM servers WHERE account_id = $1 AND deleted_at IS NULL AND labels @> $2 \
                 AND ($3::jsonb IS NULL OR labels @> $3) ORDER BY created_at, id",
                &[&principal.account_id, &json!(selector.labels), &principal.reach.server_filter()],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
        (None, Some(ids)) => {
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            let found: Vec<Uuid> = tx
                .query(
                    "SELECT id FROM servers WHERE account_id = $1 AND deleted_at IS NULL AND id = ANY($2)",
                    &[&principal.account_id, &unique],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if found.len() != unique.len() {
                return Err(ApiError::not_found("one of the servers"));
            }
            // The order given, each server once.
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            ids.into_iter().filter(|id| seen.insert(*id)).collect()
        }
        _ => return Err(ApiError::unprocessable(ErrorCode::InvalidTargets, "give either selector or server_ids")),
    };
    match kind.project() {
        Some(project) if !principal.reach.reaches_project(project) => {
            return Err(ApiError::outside_scope(format!("project {project}")));
        }
        // An upgrade belongs to no project: a member limited to some projects may not
        // start one.
        None if principal.reach.project_filter().is_some() => {
            return Err(ApiError::outside_scope(
                "every project (an agent upgrade belongs to no project)",
            ));
        }
        _ => {}
    }
    super::servers::check_in_reach(&tx, &principal, &servers).await?;
    if servers.is_empty() {
        return Err(ApiError::unprocessable(
            ErrorCode::NoTargets,
            "no server matches the selector",
        ));
    }
    if servers.len() > MAX_TARGETS {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidTargets,
            format!("at most {MAX_TARGETS} servers per rollout"),
        ));
    }
    // Agents older than the strategy's minimum take no part: they are recorded as skipped,
    // with the reason, after the last batch, so that no batch (the canary least of all) is
    // made of servers that will not run.
    let mut skipped: Vec<(Uuid, String)> = Vec::new();
    if kind.upgrade_version().is_some() {
        let ssh = tx
            .query(
                "SELECT id FROM servers WHERE id = ANY($1) AND transport = 'ssh'",
                &[&servers],
            )
            .await?;
        for row in &ssh {
            skipped.push((row.get(0), "an SSH server runs no agent to upgrade".into()));
        }
        servers.retain(|s| !skipped.iter().any(|(id, _)| id == s));
        if servers.is_empty() {
            return Err(ApiError::unprocessable(
                ErrorCode::NoTargets,
                "no target runs an agent (SSH servers have none to upgrade)",
            ));
        }
    }
    if strategy.min_agent_version.is_some() {
        let agents = tx
            .query(
                "SELECT id, agent_version FROM servers WHERE id = ANY($1) AND transport = 'agent'",
                &[&servers],
            )
            .await?;
        for row in &agents {
            let version: Option<String> = row.get(1);
            if let Some(reason) = strategy.agent_refusal(version.as_deref()) {
                skipped.push((row.get(0), reason));
            }
        }
        servers.retain(|s| !skipped.iter().any(|(id, _)| id == s));
        if servers.is_empty() {
            return Err(ApiError::unprocessable(
                ErrorCode::NoTargets,
                format!(
                    "no target meets min_agent_version: {}",
                    skipped.first().map(|(_, r)| r.as_str()).unwrap_or_default()
                ),
            ));
        }
    }
    let batches = strategy.batches(servers.len());
    let id = Uuid::new_v4();
    match &kind {
        RolloutKind::Deploy { project, git_ref } => {
            // The project's deploy configuration as it is now is what every job of the
            // rollout will use (a later PATCH does not reach it); a ref that is already a
            // full commit pins it at once, any other is pinned by the first success.
            let pinned = sensei_shared::release::is_commit_id(git_ref).then_some(git_ref.as_str());
            tx.execute(
                "INSERT INTO rollouts (id, account_id, project_id, git_ref, strategy, state, batch_count, created_by, \
                   commit, repo_url, deploy_path, keep_releases, shared_paths, hooks, health_check, \
                   hook_timeout_secs, env_ciphertext) \
                 SELECT $1, $2, $3, $4, $5, 'running', $6, $7, $8, repo_url, deploy_path, keep_releases, \
                   shared_paths, hooks, health_check, hook_timeout_secs, env_ciphertext \
                 FROM projects WHERE id = $3",
                &[&id, &principal.account_id, project, git_ref, &json!(strategy),
                  &(batches.len() as i32), &principal.user_id, &pinned],
            )
            .await?;
        }
        RolloutKind::UpgradeAgent { version } => {
            tx.execute(
                "INSERT INTO rollouts (id, account_id, strategy, state, batch_count, created_by, \
                   upgrade_agent_version) VALUES ($1, $2, $3, 'running', $4, $5, $6)",
                &[
                    &id,
                    &principal.account_id,
                    &json!(strategy),
                    &(batches.len() as i32),
                    &principal.user_id,
                    version,
                ],
            )
            .await?;
        }
    }
    let mut batch_of = Vec::with_capacity(servers.len());
    for (b, size) in batches.iter().enumerate() {
        batch_of.extend(std::iter::repeat_n(b as i32, *size));
    }
    let positions: Vec<i32> = (0..servers.len() as i32).collect();
    tx.execute(
        "INSERT INTO rollout_targets (rollout_id, server_id, batch, position, status) \
         SELECT $1, s, b, p, 'pending' FROM unnest($2::uuid[], $3::int[], $4::int[]) AS t(s, b, p)",
        &[&id, &servers, &batch_of, &positions],
    )
    .await?;
    if !skipped.is_empty() {
        let last = batches.len() as i32 - 1;
        let (ids, reasons): (Vec<Uuid>, Vec<String>) = skipped.iter().cloned().unzip();
        let positions: Vec<i32> =
            (servers.len() as i32..(servers.len() + skipped.len()) as i32).collect();
        tx.execute(
            "INSERT INTO rollout_targets (rollout_id, server_id, batch, position, status, error) \
             SELECT $1, s, $2, p, 'skipped', e FROM unnest($3::uuid[], $4::int[], $5::text[]) AS t(s, p, e)",
            &[&id, &last, &ids, &positions, &reasons],
        )
        .await?;
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "rollout.started",
            ("rollout", id),
            json!({"ref": kind.git_ref(), "upgrade_agent": kind.upgrade_version(),
                   "targets": servers.len(), "batches": batches.len(), "skipped": skipped.len()}),
        ),
    )
    .await?;
    idempotency
        .record(
            &tx,
            principal.account_id,
            CREATE_ROUTE,
            StatusCode::CREATED,
            id,
        )
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state, principal.account_id, &principal.reach, id).await?),
    )
        .into_response())
}

/// Lists the account's rollouts, newest first, each with its target counts.
#[utoipa::path(get, path = "/v1/rollouts", tag = "rollouts", params(PageQuery),
    responses((status = 200, body = RolloutList), (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<RolloutList>, ApiError> {
    let page = query.page()?;
    let rows = state
        .pool
        .get()
        .await?
        .query(
            &format!(
                "{ROLLOUT_SQL}{}{}",
                within_reach(5, 6),
                Page::keyset_sql("r.created_at", "r.id", Order::NewestFirst, 2)
            ),
            &[
                &principal.account_id,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
                &principal.reach.project_filter(),
                &principal.reach.server_filter(),
            ],
        )
        .await?;
    let (rollouts, next_cursor) = page.finish(
        rows.iter().map(rollout_view).collect(),
        |r: &RolloutView| Cursor::at(r.created_at, r.id),
    );
    Ok(Json(RolloutList {
        rollouts,
        next_cursor,
    }))
}

/// A rollout's targets in rollout order, a page at a time.
#[utoipa::path(get, path = "/v1/rollouts/{id}/targets", tag = "rollouts",
    params(("id" = Uuid, Path, description = "rollout id"), PageQuery),
    responses((status = 200, body = TargetList), (status = 404, body = ErrorBody),
              (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn targets(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<TargetList>, ApiError> {
    let page = query.page()?;
    let client = state.pool.get().await?;
    client
        .query_opt(
            &format!(
                "SELECT 1 FROM rollouts r WHERE r.id = $1 AND r.account_id = $2{}",
                within_reach(3, 4)
            ),
            &[
                &id,
                &principal.account_id,
                &principal.reach.project_filter(),
                &principal.reach.server_filter(),
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("rollout"))?;
    // Positions are unique within a rollout and follow batch order, so the position alone
    // is the cursor's key.
    let after = page.after.map(|c| c.key).unwrap_or(-1);
    let rows = client
        .query(
            &format!("{TARGET_SQL} AND position > $2 ORDER BY position LIMIT $3"),
            &[
                &id,
                &i32::try_from(after).unwrap_or(i32::MAX),
                &page.fetch(),
            ],
        )
        .await?;
    let positioned: Vec<(i32, TargetView)> = rows
        .iter()
        .map(|r| (r.get("position"), target_view(r)))
        .collect();
    let (positioned, next_cursor) = page.finish(positioned, |(position, t)| Cursor {
        key: i64::from(*position),
        id: t.server_id,
    });
    Ok(Json(TargetList {
        targets: positioned.into_iter().map(|(_, t)| t).collect(),
        next_cursor,
    }))
}

/// One rollout with every target.
#[utoipa::path(get, path = "/v1/rollouts/{id}", tag = "rollouts",
    params(("id" = Uuid, Path, description = "rollout id")),
    responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Json<RolloutView>, ApiError> {
    Ok(Json(
        load(&state, principal.account_id, &principal.reach, id).await?,
    ))
}

/// Progress as server-sent events: the rollout (`event: rollout`) each time it changes, until
/// it reaches a final state, with keep-alive comments while quiet. Each event's `id` names the
/// state it shows; a client reconnecting with `Last-Event-ID` gets the next change, not the
/// state it already has.
#[utoipa::path(get, path = "/v1/rollouts/{id}/events", tag = "rollouts",
    params(("id" = Uuid, Path, description = "rollout id")),
    responses((status = 200, content_type = "text/event-stream"), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "too many live streams open")))]
pub async fn events(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    load(&state, principal.account_id, &principal.reach, id).await?;
    let account = principal.account_id;
    let reach = principal.reach.clone();
    let seen = live::last_event_id(&headers).unwrap_or_default().to_owned();
    let slot = state.live.open(principal.account_id, principal.user_id)?;
    let follower = live::Follower::new(
        &headers,
        meta.ip,
        &principal,
        crate::identity::auth::Scope::RolloutsRead,
    );
    let changes = state.live.subscribe(live::Followed::Rollout(id));
    let keep_alive = state.live.keep_alive();
    let stream = futures_util::stream::unfold(
        // The member's reach travels with the stream: each change is read as they may see it.
        (state, seen, false, changes, (slot, follower, reach)),
        move |(state, seen, ended, mut changes, slot)| async move {
            if ended {
                return None;
            }
            loop {
                changes.borrow_and_update();
                let Ok(view) = load(&state, account, &slot.2, id).await else {
                    return Some((
                        Err(std::io::Error::other("rollout stream interrupted")),
                        (state, seen, true, changes, slot),
                    ));
                };
                let text = serde_json::to_string(&view).unwrap_or_default();
                let event_id = hex::encode(&Sha256::digest(text.as_bytes())[..12]);
                let done = matches!(view.state.as_str(), "succeeded" | "aborted" | "rolled_back")
                    || (view.state == "halted" && view.finished_at.is_some());
                if event_id != seen || done {
                    let chunk = format!("id: {event_id}\nevent: rollout\ndata: {text}\n\n");
                    return Some((
                        Ok::<_, std::io::Error>(chunk),
                        (state, event_id, done, changes, slot),
                    ));
                }
                if !live::wait_for_change(&mut changes, keep_alive).await {
                    if !slot.1.still_allowed(&state.pool).await {
                        return None;
                    }
                    let chunk = live::KEEP_ALIVE_COMMENT.to_owned();
                    return Some((Ok(chunk), (state, seen, false, changes, slot)));
                }
            }
        },
    );
    live::event_stream(stream)
}

/// Applies an operator's command if the rollout's state allows it.
async fn command(
    state: &AppState,
    principal: &Principal,
    meta: &ClientMeta,
    id: Uuid,
    command: Command,
) -> Result<Json<RolloutView>, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "SELECT r.state, r.paused_reason, r.rolling_back, r.created_by, \
                   a.four_eyes_approval FROM rollouts r JOIN accounts a ON a.id = r.account_id \
                 WHERE r.id = $1 AND r.account_id = $2{} FOR UPDATE OF r",
                within_reach(3, 4)
            ),
            &[
                &id,
                &principal.account_id,
                &principal.reach.project_filter(),
                &principal.reach.server_filter(),
            ],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("rollout"))?;
    let four_eyes: bool = row.get("four_eyes_approval");
    let started_by: Option<Uuid> = row.get("created_by");
    if command == Command::Approve && four_eyes && started_by == Some(principal.user_id) {
        return Err(ApiError::forbidden(
            ErrorCode::FourEyesRequired,
            "this account requires four eyes: someone other than the person who started the \
             rollout must approve it",
        ));
    }
    let current = RolloutState::from_stored(
        row.get("state"),
        row.get("paused_reason"),
        row.get("rolling_back"),
    )
    .map_err(|e| ApiError::internal(&format!("rollout {id}: {e}")))?;
    let transition = transition(current, command)
        .map_err(|refused| ApiError::conflict(ErrorCode::InvalidState, refused.to_string()))?;
    if transition.to.is_final() {
        // Targets not started never will be; running deploys finish.
        tx.execute(
            "UPDATE rollout_targets SET status = 'skipped' WHERE rollout_id = $1 AND status = 'pending'",
            &[&id],
        )
        .await?;
    }
    tx.execute(
        "UPDATE rollouts SET state = $2, paused_reason = $3, approved = approved OR $4, \
           finished_at = CASE WHEN $5 THEN now() ELSE finished_at END, updated_at = now() \
         WHERE id = $1",
        &[
            &id,
            &transition.to.as_str(),
            &transition.to.paused_reason().map(PauseReason::as_str),
            &transition.approves(),
            &transition.to.is_final(),
        ],
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            principal,
            meta,
            command.audit_action(),
            ("rollout", id),
            json!({"from": transition.from.as_str()}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(
        load(state, principal.account_id, &principal.reach, id).await?,
    ))
}

macro_rules! steering_route {
    ($name:ident, $path:literal, $command:expr, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "rollouts",
            params(("id" = Uuid, Path, description = "rollout id")),
            responses((status = 200, body = RolloutView), (status = 404, body = ErrorBody),
                      (status = 409, body = ErrorBody, description = "not allowed in the rollout's state")))]
        pub async fn $name(
            State(state): State<AppState>,
            meta: ClientMeta,
            Extension(principal): Extension<Principal>,
            Path(id): Path<Uuid>,
        ) -> Result<Json<RolloutView>, ApiError> {
            command(&state, &principal, &meta, id, $command).await
        }
    };
}

steering_route!(
    pause,
    "/v1/rollouts/{id}/pause",
    Command::Pause,
    "Stops queueing jobs (no new batch, nor the rest of a batch being queued); running deploys finish."
);
steering_route!(
    resume,
    "/v1/rollouts/{id}/resume",
    Command::Resume,
    "Resumes a paused rollout."
);
steering_route!(
    abort,
    "/v1/rollouts/{id}/abort",
    Command::Abort,
    "Ends the rollout; targets not started are skipped."
);
steering_route!(
    approve,
    "/v1/rollouts/{id}/approve",
    Command::Approve,
    "Lets a rollout waiting after its canary continue."
);
