//! Reading the audit log: a filtered, paginated list and a JSON-lines export for SIEMs.
//! Admins and owners see the whole account; other roles see their own actions.

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::QueryParams;
use super::AppState;
use crate::audit::{AuditRecord, COLUMNS};
use crate::identity::auth::{Principal, Role};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 500;
const EXPORT_PAGE: i64 = 1000;

#[derive(Deserialize, IntoParams, Default, Clone)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    /// Only actions by this user or API key.
    pub actor: Option<Uuid>,
    /// Only this action name, e.g. `user.logged_in`.
    pub action: Option<String>,
    /// Only actions on this object.
    pub target: Option<Uuid>,
    /// Only at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only before this time.
    pub until: Option<DateTime<Utc>>,
    /// Page size (1–500, default 100).
    pub limit: Option<i64>,
    /// Continue after this event id (from `next_before`).
    pub before: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first, in the export shape plus `id`.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// Pass as `before` for the next page; absent on the last page.
    pub next_before: Option<i64>,
}

/// Builds the WHERE clause shared by the list and the export.
fn conditions(
    principal: &Principal,
    f: &AuditFilter,
) -> (
    String,
    Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
) {
    let mut sql = String::from("account_id = $1");
    let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
        vec![Box::new(principal.account_id)];
    let mut add = |clause: &str, value: Box<dyn tokio_postgres::types::ToSql + Sync + Send>| {
        params.push(value);
        sql.push_str(&format!(" AND {clause} ${}", params.len()));
    };
    if principal.role < Role::Admin {
        add("actor_id =", Box::new(principal.user_id));
    }
    if let Some(v) = f.actor {
        add("actor_id =", Box::new(v));
    }
    if let Some(v) = &f.action {
        add("action =", Box::new(v.clone()));
    }
    if let Some(v) = f.target {
        add("target_id =", Box::new(v));
    }
    if let Some(v) = f.since {
        add("at >=", Box::new(v));
    }
    if let Some(v) = f.until {
        add("at <", Box::new(v));
    }
    (sql, params)
}

async fn page(
    state: &AppState,
    principal: &Principal,
    filter: &AuditFilter,
    order_desc: bool,
    cursor: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditRecord>, ApiError> {
    let (mut sql, mut params) = conditions(principal, filter);
    if let Some(c) = cursor {
        params.push(Box::new(c));
        let op = if order_desc { "<" } else { ">" };
        sql.push_str(&format!(" AND id {op} ${}", params.len()));
    }
    params.push(Box::new(limit));
    let query = format!(
        "SELECT {COLUMNS} FROM audit_log WHERE {sql} ORDER BY id {} LIMIT ${}",
        if order_desc { "DESC" } else { "ASC" },
        params.len()
    );
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        params.iter().map(|p| p.as_ref() as _).collect();
    let client = state.pool.get().await?;
    let rows = client.query(&query, &refs).await?;
    Ok(rows.iter().map(AuditRecord::from_row).collect())
}

/// The audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditFilter),
    responses((status = 200, body = AuditPage), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(filter): QueryParams<AuditFilter>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidLimit,
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let records = page(&state, &principal, &filter, true, filter.before, limit).await?;
    let next_before = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.id))
        .flatten();
    Ok(Json(AuditPage {
        events: records
            .iter()
            .map(|r| {
                let mut v = r.export_json();
                v["id"] = r.id.into();
                v
            })
            .collect(),
        next_before,
    }))
}

/// The audit log as JSON lines, oldest first, streamed.
#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", params(AuditFilter),
    responses((status = 200, content_type = "application/x-ndjson",
               description = "one event per line: timestamp, event, actor, resource, action, result, metadata")))]
pub async fn export(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(filter): QueryParams<AuditFilter>,
) -> Result<Response, ApiError> {
    // Fetch the first page before answering, so that a database failure is a clean error
    // rather than a truncated 200.
    let first = page(&state, &principal, &filter, false, None, EXPORT_PAGE).await?;
    let body = stream::unfold(
        (Some(first), state, principal, filter),
        |(pending, state, principal, filter)| async move {
            let records = match pending {
                Some(records) => records,
                None => return None,
            };
            if records.is_empty() {
                return None;
            }
            let mut chunk = Vec::new();
            for r in &records {
                if serde_json::to_writer(&mut chunk, &r.export_json()).is_ok() {
                    chunk.push(b'\n');
                }
            }
            let next = if (records.len() as i64) < EXPORT_PAGE {
                Some(Vec::new())
            } else {
                let cursor = records.last().map(|r| r.id);
                match page(&state, &principal, &filter, false, cursor, EXPORT_PAGE).await {
                    Ok(more) => Some(more),
                    Err(_) => {
                        return Some((
                            Err(std::io::Error::other("audit export interrupted")),
                            (None, state, principal, filter),
                        ))
                    }
                }
            };
            Some((
                Ok::<_, std::io::Error>(chunk),
                (next, state, principal, filter),
            ))
        },
    );
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .map_err(|_| ApiError::internal("building export response"))
}
