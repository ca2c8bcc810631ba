//! Deployments: queue a deploy of a project's ref to a server, follow it, roll back.
//! A deployment is a job row; the agent collects it over its open connection at once if it
//! is connected. Jobs for one server run one at a time, in the order they were queued: a
//! second deploy waits in the queue behind the first.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, OptionalJsonBody, Path, QueryParams};
use super::idempotency::{replayed, Claim, IdempotencyKey};
use super::live;
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::auth::Principal;
use crate::jobs::queue::{enqueue, NewJob};
use crate::jobs::{history, JobKind, JobStatus};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub project_id: Uuid,
    pub server_id: Uuid,
    /// Branch, tag or commit.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

#[derive(Serialize, ToSchema)]
pub struct DeploymentError {
    pub step: String,
    pub message: String,
}

#[derive(Serialize, ToSchema)]
pub struct DeploymentView {
    pub id: Uuid,
    pub project_id: Uuid,
    pub server_id: Uuid,
    /// `deploy` or `rollback`.
    pub kind: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    pub commit: Option<String>,
    pub release_id: Option<String>,
    pub sequence: i64,
    pub error: Option<DeploymentError>,
    pub rollback_of: Option<Uuid>,
    /// The rollout this job is part of.
    pub rollout_id: Option<Uuid>,
    /// Who queued it; absent for jobs the platform queued itself.
    pub queued_by: Option<QueuedBy>,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
    /// When its server picked it up.
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// From pick-up to the end, once finished.
    pub duration_secs: Option<f64>,
}

#[derive(Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeploymentFilter {
    /// Only this project's deployments.
    pub project_id: Option<Uuid>,
    /// Only this server's.
    pub server_id: Option<Uuid>,
    /// Only in this status: `queued`, `running`, `succeeded` or `failed`.
    pub status: Option<String>,
    /// Only `deploy` or only `rollback` jobs.
    pub kind: Option<String>,
    /// Only the jobs of this rollout.
    pub rollout_id: Option<Uuid>,
    /// Only queued at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only queued before this time.
    pub until: Option<DateTime<Utc>>,
    /// Page size (1–500, default 100).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeploymentList {
    /// Newest first.
    pub deployments: Vec<DeploymentView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The deployment history, newest first, filtered.
#[utoipa::path(get, path = "/v1/deployments", tag = "deployments", params(DeploymentFilter),
    responses((status = 200, body = DeploymentList),
              (status = 400, body = ErrorBody, description = "invalid filter, limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(filter): QueryParams<DeploymentFilter>,
) -> Result<Json<DeploymentList>, ApiError> {
    let page = PageQuery {
        limit: filter.limit,
        cursor: filter.cursor.clone(),
    }
    .page()?;
    let filter = history::Filter {
        project_id: filter.project_id,
        server_id: filter.server_id,
        status: one_of(
            filter.status.as_deref(),
            "status",
            JobStatus::parse,
            JobStatus::ALL,
        )?,
        kind: one_of(filter.kind.as_deref(), "kind", JobKind::parse, JobKind::ALL)?,
        rollout_id: filter.rollout_id,
        since: filter.since,
        until: filter.until,
    };
    let keyset = Page::keyset_sql("d.created_at", "d.id", Order::NewestFirst, 9);
    let client = state.pool.get().await?;
    let rows = history::list(
        &client,
        principal.account_id,
        &principal.reach,
        &filter,
        &history::Keyset {
            sql: &keyset,
            after: page.after_time().zip(page.after_id()),
            fetch: page.fetch(),
        },
    )
    .await?;
    let (deployments, next_cursor) = page.finish(
        rows.into_iter().map(view).collect(),
        |d: &DeploymentView| Cursor::at(d.created_at, d.id),
    );
    Ok(Json(DeploymentList {
        deployments,
        next_cursor,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct LogEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// `sensei`, `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

#[derive(Serialize, ToSchema)]
pub struct DeploymentLog {
    pub status: String,
    pub lines: Vec<LogEntry>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Stream new lines as server-sent events until the deployment ends.
    #[serde(default)]
    pub follow: bool,
    /// Only lines after this id.
    pub after: Option<i64>,
}

/// The routes' names for their idempotency keys.
const CREATE_ROUTE: &str = "POST /v1/deployments";
const ROLLBACK_ROUTE: &str = "POST /v1/deployments/{id}/rollback";

#[derive(Serialize, ToSchema)]
pub struct QueuedBy {
    pub user_id: Uuid,
    /// Absent once the user has been removed from the account.
    pub email: Option<String>,
}

/// A filter value that must be one of a stored enum's words.
fn one_of<T: Copy + std::fmt::Display>(
    value: Option<&str>,
    name: &str,
    parse: impl Fn(&str) -> Result<T, crate::jobs::UnknownValue>,
    allowed: &[T],
) -> Result<Option<T>, ApiError> {
    value.map(parse).transpose().map_err(|_| {
        let allowed: Vec<String> = allowed.iter().map(T::to_string).collect();
        ApiError::bad_request(
            ErrorCode::InvalidFilter,
            format!("{name} must be one of {}", allowed.join(", ")),
        )
    })
}

fn view(d: history::Deployment) -> DeploymentView {
    DeploymentView {
        id: d.id,
        project_id: d.project_id,
        server_id: d.server_id,
        kind: d.kind.as_str().to_owned(),
        git_ref: d.git_ref,
        status: d.status.as_str().to_owned(),
        commit: d.commit,
        release_id: d.release_id,
        sequence: d.sequence,
        error: d
            .error
            .map(|(step, message)| DeploymentError { step, message }),
        rollback_of: d.rollback_of,
        rollout_id: d.rollout_id,
        queued_by: d
            .created_by
            .map(|(user_id, email)| QueuedBy { user_id, email }),
        created_at: d.created_at,
        started_at: d.started_at,
        finished_at: d.finished_at,
        duration_secs: d
            .started_at
            .zip(d.finished_at)
            .map(|(s, f)| (f - s).num_milliseconds() as f64 / 1000.0),
    }
}

/// The deployment `id` if it is the caller's account's and within their reach.
async fn load(
    state: &AppState,
    principal: &Principal,
    id: Uuid,
) -> Result<DeploymentView, ApiError> {
    let client = state.pool.get().await?;
    let found = history::one(&client, principal.account_id, &principal.reach, id).await?;
    Ok(view(
        found.ok_or_else(|| ApiError::not_found("deployment"))?,
    ))
}

/// Queues a deploy.
#[utoipa::path(post, path = "/v1/deployments", tag = "deployments", request_body = CreateDeployment,
    responses((status = 201, body = DeploymentView),
              (status = 404, body = ErrorBody, description = "no such project or server"),
              (status = 409, body = ErrorBody, description = "the server's agent is not enrolled"),
              (status = 422, body = ErrorBody, description = "invalid ref")))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    idempotency: IdempotencyKey,
    JsonBody(req): JsonBody<CreateDeployment>,
) -> Result<Response, ApiError> {
    let git_ref = req.git_ref.trim();
    sensei_shared::release::check_git_ref(git_ref)
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidRef, e.0))?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let request = json!({"project_id": req.project_id, "server_id": req.server_id, "ref": git_ref});
    if let Claim::Replay { status, resource } = idempotency
        .claim(&tx, principal.account_id, CREATE_ROUTE, &request)
        .await?
    {
        drop(tx);
        let view = load(&state, &principal, resource).await?;
        return Ok(replayed((status, Json(view))));
    }
    tx.query_opt(
        "SELECT 1 FROM projects WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        &[&req.project_id, &principal.account_id],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("project"))?;
    if !principal.reach.reaches_project(req.project_id) {
        return Err(ApiError::outside_scope(format!(
            "project {}",
            req.project_id
        )));
    }
    super::servers::check_in_reach(&tx, &principal, &[req.server_id]).await?;
    let id = enqueue(
        &tx,
        &NewJob {
            account_id: principal.account_id,
            created_by: Some(principal.user_id),
            project_id: Some(req.project_id),
            kind: JobKind::Deploy,
            git_ref: Some(git_ref),
            rollback_of: None,
            rollout_id: None,
            expected_commit: None,
            rollback_to: None,
            timeout: state.dispatch_timeout,
            upgrade_version: None,
        },
        req.server_id,
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(&principal, &meta, "deployment.queued", ("deployment", id), json!({"project_id": req.project_id.to_string(), "server_id": req.server_id.to_string(), "ref": git_ref})),
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
    state.agents.wakes.wake(req.server_id);
    Ok((
        StatusCode::CREATED,
        Json(load(&state, &principal, id).await?),
    )
        .into_response())
}

/// One deployment: status, commit, release, timings, and on failure the step and reason.
#[utoipa::path(get, path = "/v1/deployments/{id}", tag = "deployments",
    params(("id" = Uuid, Path, description = "deployment id")),
    responses((status = 200, body = DeploymentView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Json<DeploymentView>, ApiError> {
    Ok(Json(load(&state, &principal, id).await?))
}

/// Lines sent per read (and per event-stream chunk).
pub const LINES_PER_READ: i64 = 1000;

async fn lines_after(
    state: &AppState,
    id: Uuid,
    after: i64,
) -> Result<(Vec<LogEntry>, JobStatus), ApiError> {
    let client = state.pool.get().await?;
    let (stored, status) = history::lines_after(&client, id, after, LINES_PER_READ).await?;
    let lines = stored
        .into_iter()
        .map(|l| LogEntry {
            id: l.id,
            at: l.at,
            stream: match l.stream {
                0 => "sensei",
                1 => "stdout",
                _ => "stderr",
            }
            .into(),
            line: l.line,
        })
        .collect();
    Ok((lines, status))
}

/// The deployment's log. With `follow=true`: server-sent events, one `line` event per log line
/// (its `id` is the line's), keep-alive comments while quiet, and a final `status` event when
/// the deployment has ended. A reconnecting client's `Last-Event-ID` resumes after that line.
#[utoipa::path(get, path = "/v1/deployments/{id}/logs", tag = "deployments", params(("id" = Uuid, Path, description = "deployment id"), LogQuery),
    responses((status = 200, body = DeploymentLog, description = "JSON, or text/event-stream with follow=true"),
              (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "too many live streams open")))]
pub async fn logs(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    QueryParams(q): QueryParams<LogQuery>,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    load(&state, &principal, id).await?;
    let mut after = q.after.unwrap_or(0);
    if !q.follow {
        let (lines, status) = lines_after(&state, id, after).await?;
        let status = status.as_str().to_owned();
        let body = serde_json::to_vec(&DeploymentLog { status, lines })
            .map_err(|_| ApiError::internal("encoding log"))?;
        return Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .map_err(|_| ApiError::internal("building response"));
    }
    if let Some(seen) = live::last_event_id(&headers).and_then(|v| v.parse::<i64>().ok()) {
        after = after.max(seen);
    }
    let slot = state.live.open(principal.account_id, principal.user_id)?;
    let follower = live::Follower::new(
        &headers,
        meta.ip,
        &principal,
        crate::identity::auth::Scope::DeploymentsRead,
    );
    let changes = state.live.subscribe(live::Followed::Deployment(id));
    let keep_alive = state.live.keep_alive();
    let stream = futures_util::stream::unfold(
        (state, after, false, changes, (slot, follower)),
        move |(state, after, ended, mut changes, slot)| async move {
            if ended {
                return None;
            }
            loop {
                // Seen before reading: a change during the read wakes the next wait.
                changes.borrow_and_update();
                let (lines, status) = match lines_after(&state, id, after).await {
                    Ok(x) => x,
                    Err(_) => {
                        return Some((
                            Err(std::io::Error::other("log stream interrupted")),
                            (state, after, true, changes, slot),
                        ))
                    }
                };
                let finished = status.is_final();
                if lines.is_empty() && !finished {
                    if live::wait_for_change(&mut changes, keep_alive).await {
                        continue;
                    }
                    if !slot.1.still_allowed(&state.pool).await {
                        return None;
                    }
                    let chunk = live::KEEP_ALIVE_COMMENT.to_owned();
                    return Some((Ok(chunk), (state, after, false, changes, slot)));
                }
                let mut chunk = String::new();
                let mut last = after;
                for l in &lines {
                    last = l.id;
                    let data = serde_json::to_string(l).unwrap_or_default();
                    chunk.push_str(&format!("id: {}\nevent: line\ndata: {data}\n\n", l.id));
                }
                // The end is announced once every line has been sent.
                let done = finished && (lines.len() as i64) < LINES_PER_READ;
                if done {
                    chunk.push_str(&format!(
                        "event: status\ndata: {}\n\n",
                        json!({"status": status.as_str()})
                    ));
                }
                return Some((
                    Ok::<_, std::io::Error>(chunk),
                    (state, last, done, changes, slot),
                ));
            }
        },
    );
    live::event_stream(stream)
}

/// Where a rollback goes. Without a body (or without `to_release`) it goes to the newest
/// good release older than the current one.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// A release a successful deploy of this project made on this server (its
    /// `release_id`); it must still be on the server.
    pub to_release: Option<String>,
}

/// Switches the deployment's server back to an earlier release: the one named in
/// `to_release`, or the previous good release. Queued like a deploy; answers the new
/// rollback job.
#[utoipa::path(post, path = "/v1/deployments/{id}/rollback", tag = "deployments",
    params(("id" = Uuid, Path, description = "deployment id")),
    request_body(content = Option<RollbackRequest>, description = "optional: the release to return to"),
    responses((status = 201, body = DeploymentView), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "`to_release` is not a release this project made on this server")))]
pub async fn rollback(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    idempotency: IdempotencyKey,
    Path(id): Path<Uuid>,
    OptionalJsonBody(req): OptionalJsonBody<RollbackRequest>,
) -> Result<Response, ApiError> {
    let to_release = req.unwrap_or_default().to_release;
    if let Some(to) = &to_release {
        sensei_shared::release::check_release_id(to)
            .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidRelease, e.0))?;
    }
    let original = load(&state, &principal, id).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    if let Claim::Replay { status, resource } = idempotency
        .claim(
            &tx,
            principal.account_id,
            ROLLBACK_ROUTE,
            &json!({"rollback_of": id, "to_release": to_release}),
        )
        .await?
    {
        drop(tx);
        let view = load(&state, &principal, resource).await?;
        return Ok(replayed((status, Json(view))));
    }
    if let Some(to) = &to_release {
        // Only a release this project's deploys made on this server: the picker's list, and
        // never a directory some other project (or a hand) put there.
        let made_here = history::made_release(
            &*tx,
            principal.account_id,
            original.project_id,
            original.server_id,
            to,
        )
        .await?;
        if !made_here {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidRelease,
                format!("no successful deploy of this project on this server made release {to}"),
            ));
        }
    }
    let new_id = enqueue(
        &tx,
        &NewJob {
            account_id: principal.account_id,
            created_by: Some(principal.user_id),
            project_id: Some(original.project_id),
            kind: JobKind::Rollback,
            git_ref: None,
            rollback_of: Some(id),
            rollout_id: None,
            expected_commit: None,
            rollback_to: to_release.as_deref(),
            timeout: state.dispatch_timeout,
            upgrade_version: None,
        },
        original.server_id,
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "deployment.rollback_queued",
            ("deployment", new_id),
            json!({"rollback_of": id.to_string(), "to_release": to_release}),
        ),
    )
    .await?;
    idempotency
        .record(
            &tx,
            principal.account_id,
            ROLLBACK_ROUTE,
            StatusCode::CREATED,
            new_id,
        )
        .await?;
    tx.commit().await?;
    state.agents.wakes.wake(original.server_id);
    Ok((
        StatusCode::CREATED,
        Json(load(&state, &principal, new_id).await?),
    )
        .into_response())
}
