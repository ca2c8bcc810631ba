//! Deployments: queue a deploy of a project's ref to a server, follow it, roll back.
//! A deployment is a job row; the agent collects it over its open connection at once if it
//! is connected. Jobs for one server run one at a time, in the order they were queued: a
//! second deploy waits in the queue behind the first.

use std::time::Duration;

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
use crate::auth::Principal;

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
    let one_of = |value: &Option<String>, name: &str, allowed: &[&str]| match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::bad_request(
            ErrorCode::InvalidFilter,
            format!("{name} must be one of {}", allowed.join(", ")),
        )),
        _ => Ok(()),
    };
    one_of(
        &filter.status,
        "status",
        &["queued", "running", "succeeded", "failed"],
    )?;
    one_of(&filter.kind, "kind", &["deploy", "rollback", "forget_env"])?;
    // Absent filters are NULL parameters, so one statement (and one plan) serves them all.
    let rows = state
        .pool
        .get()
        .await?
        .query(
            &format!(
                "{SELECT} AND ($2::uuid IS NULL OR d.project_id = $2) \
                 AND ($3::uuid IS NULL OR d.server_id = $3) \
                 AND ($4::text IS NULL OR d.status = $4) \
                 AND ($5::text IS NULL OR d.kind = $5) \
                 AND ($6::uuid IS NULL OR d.rollout_id = $6) \
                 AND ($7::timestamptz IS NULL OR d.created_at >= $7) \
                 AND ($8::timestamptz IS NULL OR d.created_at < $8){}",
                Page::keyset_sql("d.created_at", "d.id", Order::NewestFirst, 9)
            ),
            &[
                &principal.account_id,
                &filter.project_id,
                &filter.server_id,
                &filter.status,
                &filter.kind,
                &filter.rollout_id,
                &filter.since,
                &filter.until,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
            ],
        )
        .await?;
    let (deployments, next_cursor) = page
        .finish(rows.iter().map(view).collect(), |d: &DeploymentView| {
            Cursor::at(d.created_at, d.id)
        });
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

const SELECT: &str =
    "SELECT d.id, d.project_id, d.server_id, d.kind, d.git_ref, d.status, d.commit, \
     d.release_id, d.sequence, d.error_step, d.error_message, d.rollback_of, d.rollout_id, \
     d.created_by, u.email AS created_by_email, d.created_at, d.started_at, d.finished_at \
     FROM deployments d LEFT JOIN users u ON u.id = d.created_by WHERE d.account_id = $1";

fn view(r: &tokio_postgres::Row) -> DeploymentView {
    let step: Option<String> = r.get("error_step");
    let message: Option<String> = r.get("error_message");
    let created_by: Option<Uuid> = r.get("created_by");
    let started_at: Option<DateTime<Utc>> = r.get("started_at");
    let finished_at: Option<DateTime<Utc>> = r.get("finished_at");
    DeploymentView {
        id: r.get("id"),
        project_id: r.get("project_id"),
        server_id: r.get("server_id"),
        kind: r.get("kind"),
        git_ref: r.get("git_ref"),
        status: r.get("status"),
        commit: r.get("commit"),
        release_id: r.get("release_id"),
        sequence: r.get("sequence"),
        error: step.map(|step| DeploymentError {
            step,
            message: message.unwrap_or_default(),
        }),
        rollback_of: r.get("rollback_of"),
        rollout_id: r.get("rollout_id"),
        queued_by: created_by.map(|user_id| QueuedBy {
            user_id,
            email: r.get("created_by_email"),
        }),
        created_at: r.get("created_at"),
        started_at,
        finished_at,
        duration_secs: started_at
            .zip(finished_at)
            .map(|(s, f)| (f - s).num_milliseconds() as f64 / 1000.0),
    }
}

async fn load(state: &AppState, account: Uuid, id: Uuid) -> Result<DeploymentView, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(&format!("{SELECT} AND d.id = $2"), &[&account, &id])
        .await?
        .ok_or_else(|| ApiError::not_found("deployment"))?;
    Ok(view(&row))
}

/// What to queue: the same for every server of one request.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    pub account_id: Uuid,
    /// The user who asked (none for jobs the platform queues itself).
    pub created_by: Option<Uuid>,
    pub project_id: Uuid,
    /// `deploy`, `rollback` or `forget_env`.
    pub kind: &'a str,
    pub git_ref: Option<&'a str>,
    pub rollback_of: Option<Uuid>,
    /// The rollout the job is part of.
    pub rollout_id: Option<Uuid>,
    /// The commit the ref must resolve to on the server (signed into the job).
    pub expected_commit: Option<&'a str>,
    /// A rollback's chosen release; `None`: the newest good one before `current`.
    pub rollback_to: Option<&'a str>,
    /// How long it waits for its server before it fails as unreachable.
    pub timeout: Duration,
}

/// Queues `job` on each of `servers` that can take it, answering (server, job id) for those.
///
/// Release ids (computed in `enqueue_many`) sort by time: `YYYYMMDDHHMMSS-`, the server's job
/// sequence number zero-padded (orders releases made within the same second), and six hex
/// digits of the job id (unique even where several servers share one deploy path, e.g. NFS).
pub async fn enqueue_many(
    tx: &tokio_postgres::Transaction<'_>,
    job: &NewJob<'_>,
    servers: &[Uuid],
) -> Result<Vec<(Uuid, Uuid)>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "WITH locked AS ( \
               SELECT id FROM servers s WHERE id = ANY($1) AND account_id = $2 AND deleted_at IS NULL \
                 AND ((transport = 'agent' AND EXISTS (SELECT 1 FROM agent_certificates c \
                        WHERE c.server_id = s.id AND c.revoked_at IS NULL AND c.not_after > now())) \
                   OR (transport = 'ssh' AND (ssh_private_key_ciphertext IS NOT NULL \
                        OR ssh_password_ciphertext IS NOT NULL))) \
               ORDER BY id FOR UPDATE), \
             numbered AS ( \
               UPDATE servers SET job_sequence = job_sequence + 1 FROM locked \
               WHERE servers.id = locked.id RETURNING servers.id AS server, servers.job_sequence AS seq), \
             jobs AS (SELECT gen_random_uuid() AS job, server, seq FROM numbered), \
             queued AS ( \
               INSERT INTO deployments (id, account_id, project_id, server_id, kind, git_ref, rollback_of, \
                 sequence, release_id, status, created_by, expires_at, rollout_id, expected_commit) \
               SELECT job, $2, $3, server, $4, $5, $6, seq, \
                 CASE WHEN $4 = 'deploy' THEN to_char(now() AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS') \
                   || '-' || lpad(seq::text, 10, '0') || '-' || substr(job::text, 1, 6) \
                   ELSE $11 END, \
                 'queued', $7, now() + make_interval(secs => $8), $9, $10 \
               FROM jobs RETURNING server_id, id) \
             SELECT server_id, id FROM queued",
            &[&servers, &job.account_id, &job.project_id, &job.kind, &job.git_ref,
              &job.rollback_of, &job.created_by, &job.timeout.as_secs_f64(), &job.rollout_id,
              &job.expected_commit, &job.rollback_to],
        )
        .await?;
    let queued: Vec<(Uuid, Uuid)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // Wake the servers' polls on every replica. A large batch sends one "everyone" notice
    // instead of one per server: each replica then has all its polls look at the queue, in
    // batched statements (10,000 notifications cost more than the rollout they announce).
    if queued.len() > crate::agents::cert_events::WAKE_ALL_ABOVE {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &crate::agents::cert_events::JOB_CHANNEL,
                &crate::agents::cert_events::WAKE_ALL,
            ],
        )
        .await?;
    } else if !queued.is_empty() {
        let servers: Vec<Uuid> = queued.iter().map(|(s, _)| *s).collect();
        tx.execute(
            "SELECT pg_notify($1, s::text) FROM unnest($2::uuid[]) AS s",
            &[&crate::agents::cert_events::JOB_CHANNEL, &servers],
        )
        .await?;
    }
    Ok(queued)
}

/// Queues one job, saying clearly why a server cannot take it.
pub async fn enqueue(
    tx: &tokio_postgres::Transaction<'_>,
    job: &NewJob<'_>,
    server_id: Uuid,
) -> Result<Uuid, ApiError> {
    let queued = enqueue_many(tx, job, &[server_id]).await?;
    if let Some((_, id)) = queued.first() {
        return Ok(*id);
    }
    let transport: Option<String> = tx
        .query_opt(
            "SELECT transport FROM servers WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&server_id, &job.account_id],
        )
        .await?
        .map(|r| r.get(0));
    match transport.as_deref() {
        None => Err(ApiError::not_found("server")),
        Some("ssh") => Err(ApiError::conflict(ErrorCode::ServerNotEnrolled,
            "this SSH server has no stored credentials",
        )),
        Some(_) => Err(ApiError::conflict(ErrorCode::ServerNotEnrolled,
            "this server has no valid agent certificate: enroll its agent first (a revoked agent is never reached by any other way)",
        )),
    }
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
        let view = load(&state, principal.account_id, resource).await?;
        return Ok(replayed((status, Json(view))));
    }
    tx.query_opt(
        "SELECT 1 FROM projects WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
        &[&req.project_id, &principal.account_id],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("project"))?;
    let id = enqueue(
        &tx,
        &NewJob {
            account_id: principal.account_id,
            created_by: Some(principal.user_id),
            project_id: req.project_id,
            kind: "deploy",
            git_ref: Some(git_ref),
            rollback_of: None,
            rollout_id: None,
            expected_commit: None,
            rollback_to: None,
            timeout: state.dispatch_timeout,
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
    state.agents.wake(req.server_id);
    Ok((
        StatusCode::CREATED,
        Json(load(&state, principal.account_id, id).await?),
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
    Ok(Json(load(&state, principal.account_id, id).await?))
}

async fn lines_after(
    state: &AppState,
    id: Uuid,
    after: i64,
) -> Result<(Vec<LogEntry>, String), ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, at, stream, line FROM deployment_logs WHERE deployment_id = $1 AND id > $2 \
             ORDER BY id LIMIT 1000",
            &[&id, &after],
        )
        .await?;
    let status: String = client
        .query_one("SELECT status FROM deployments WHERE id = $1", &[&id])
        .await?
        .get(0);
    let lines = rows
        .iter()
        .map(|r| LogEntry {
            id: r.get(0),
            at: r.get(1),
            stream: match r.get::<_, i16>(2) {
                0 => "sensei",
                1 => "stdout",
                _ => "stderr",
            }
            .into(),
            line: r.get(3),
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
    load(&state, principal.account_id, id).await?;
    let mut after = q.after.unwrap_or(0);
    if !q.follow {
        let (lines, status) = lines_after(&state, id, after).await?;
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
        crate::auth::Scope::DeploymentsRead,
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
                let finished = status == "succeeded" || status == "failed";
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
                let done = finished && lines.len() < 1000;
                if done {
                    chunk.push_str(&format!(
                        "event: status\ndata: {}\n\n",
                        json!({"status": status})
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
    let original = load(&state, principal.account_id, id).await?;
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
        let view = load(&state, principal.account_id, resource).await?;
        return Ok(replayed((status, Json(view))));
    }
    if let Some(to) = &to_release {
        // Only a release this project's deploys made on this server: the picker's list, and
        // never a directory some other project (or a hand) put there.
        let made_here = tx
            .query_opt(
                "SELECT 1 FROM deployments WHERE account_id = $1 AND server_id = $2 \
                 AND project_id = $3 AND kind = 'deploy' AND status = 'succeeded' AND release_id = $4",
                &[&principal.account_id, &original.server_id, &original.project_id, to],
            )
            .await?
            .is_some();
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
            project_id: original.project_id,
            kind: "rollback",
            git_ref: None,
            rollback_of: Some(id),
            rollout_id: None,
            expected_commit: None,
            rollback_to: to_release.as_deref(),
            timeout: state.dispatch_timeout,
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
    state.agents.wake(original.server_id);
    Ok((
        StatusCode::CREATED,
        Json(load(&state, principal.account_id, new_id).await?),
    )
        .into_response())
}
