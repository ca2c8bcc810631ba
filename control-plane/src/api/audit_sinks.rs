//! The account's SIEM sinks: where its audit log is streamed (`crate::audit::sinks`). Admins
//! and owners create and delete them from a session; a key with `audit:sinks` reads their
//! status. Secrets go in and never come out.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path};
use super::{actor_event, AppState};
use crate::audit::sinks::{self, CreateError, InvalidSink, SinkRequest, SinkView, Target};
use crate::audit::{self};
use crate::egress::EgressError;
use crate::identity::auth::Principal;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSink {
    /// 1–100 characters, for people.
    pub name: String,
    /// `syslog_tls` (RFC 5424 over RFC 5425) or `https` (Splunk HEC-compatible JSON lines).
    pub kind: String,
    /// syslog_tls: the receiver's host name or address.
    pub host: Option<String>,
    /// syslog_tls: its port (6514 is syslog over TLS's).
    pub port: Option<u16>,
    /// syslog_tls: the name its certificate carries, if not `host`.
    pub server_name: Option<String>,
    /// https: the collector's `https://` URL, without credentials, query or fragment.
    pub url: Option<String>,
    /// https: `splunk` (`Authorization: Splunk <secret>`), `bearer`
    /// (`Authorization: Bearer <secret>`) or `hmac` (`X-Sensei-Signature`).
    pub auth: Option<String>,
    /// https: the token, or the HMAC key (32 characters at least). Stored sealed, never shown.
    pub secret: Option<String>,
    /// The receiver's CA certificate(s), PEM: its certificate must chain to these, and only
    /// these.
    pub ca_pem: String,
}

#[derive(Serialize, ToSchema)]
pub struct SinkStatusView {
    /// `healthy` (the last attempt was accepted, or none failed) or `failing`.
    pub state: String,
    /// The last `seq` of the account's audit chain the receiver accepted.
    pub cursor_seq: i64,
    /// Events of the chain not yet accepted.
    pub lag_events: i64,
    /// Failed attempts in a row.
    pub failures: i32,
    /// The latest failure (bounded, without secrets); kept after recovery for diagnosis.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_delivered_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditSinkView {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    /// syslog_tls: `host:port`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// https: the URL and the authentication scheme (never the secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// `SHA256:…` of the pinned CA certificate.
    pub ca_fingerprint: String,
    pub created_at: DateTime<Utc>,
    pub created_by: Option<Uuid>,
    pub status: SinkStatusView,
}

#[derive(Serialize, ToSchema)]
pub struct AuditSinkList {
    pub sinks: Vec<AuditSinkView>,
}

fn view(s: SinkView) -> AuditSinkView {
    let (host, port, server_name, url, auth) = match s.target {
        Target::SyslogTls {
            host,
            port,
            server_name,
        } => (Some(host), Some(port), Some(server_name), None, None),
        Target::Https { url, auth } => (None, None, None, Some(url), Some(auth.as_str().into())),
    };
    AuditSinkView {
        id: s.id,
        name: s.name,
        kind: s.kind.as_str().into(),
        host,
        port,
        server_name,
        url,
        auth,
        ca_fingerprint: s.ca_fingerprint,
        created_at: s.created_at,
        created_by: s.created_by,
        status: SinkStatusView {
            state: match s.state {
                sinks::SinkState::Healthy => "healthy",
                sinks::SinkState::Failing => "failing",
            }
            .into(),
            cursor_seq: s.cursor_seq,
            lag_events: s.lag_events,
            failures: s.failures,
            last_error: s.last_error,
            last_error_at: s.last_error_at,
            last_delivered_at: s.last_delivered_at,
            next_attempt_at: s.next_attempt_at,
        },
    }
}

impl From<InvalidSink> for ApiError {
    fn from(e: InvalidSink) -> Self {
        let code = match e {
            InvalidSink::Url(_) => ErrorCode::InvalidSinkUrl,
            InvalidSink::Ca(_) => ErrorCode::InvalidSinkCa,
            InvalidSink::Name | InvalidSink::Kind | InvalidSink::Field(_) => ErrorCode::InvalidSink,
        };
        ApiError::unprocessable(code, e.to_string())
    }
}

impl From<sinks::ListError> for ApiError {
    fn from(e: sinks::ListError) -> Self {
        match e {
            sinks::ListError::Stored(e) => ApiError::internal(&e.to_string()),
            sinks::ListError::Database(e) => e.into(),
        }
    }
}

/// Adds a sink; the account's retained audit log is delivered to it, then every new event.
#[utoipa::path(post, path = "/v1/audit/sinks", tag = "audit", request_body = CreateSink,
    responses((status = 201, body = AuditSinkView),
              (status = 409, body = ErrorBody, description = "the account has 10 sinks already"),
              (status = 422, body = ErrorBody, description = "a bad field, URL or CA certificate, or a target the control plane may not reach")))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<CreateSink>,
) -> Result<(StatusCode, Json<AuditSinkView>), ApiError> {
    let sink = SinkRequest {
        name: req.name,
        kind: req.kind,
        host: req.host,
        port: req.port,
        server_name: req.server_name,
        url: req.url,
        auth: req.auth,
        secret: req.secret,
        ca_pem: req.ca_pem,
    }
    .validate()?;
    if let Err(e) = sink.check_reachable(&state.outbound).await {
        return Err(ApiError::unprocessable(
            ErrorCode::SinkTargetDenied,
            match e {
                EgressError::Denied(at) => format!(
                    "{at} is not a place the control plane sends to (its own listeners, \
                     link-local and metadata addresses are refused)"
                ),
                EgressError::Unresolved(host) => format!("cannot resolve {host}"),
            },
        ));
    }
    let id = Uuid::new_v4();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let stored = match sinks::insert(
        &tx,
        &state.keys,
        principal.account_id,
        principal.user_id,
        id,
        &sink,
    )
    .await
    {
        Ok(stored) => stored,
        Err(CreateError::TooMany) => {
            return Err(ApiError::conflict(
                ErrorCode::TooManySinks,
                CreateError::TooMany.to_string(),
            ))
        }
        Err(CreateError::Stored(e)) => return Err(ApiError::internal(&e.to_string())),
        Err(CreateError::Database(e)) => return Err(e.into()),
    };
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "audit.sink_created",
            ("audit_sink", id),
            sinks::audit_metadata(&sink.name, &sink.config),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(stored))))
}

/// The account's sinks and how their delivery stands.
#[utoipa::path(get, path = "/v1/audit/sinks", tag = "audit",
    responses((status = 200, body = AuditSinkList), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<AuditSinkList>, ApiError> {
    let client = state.pool.get().await?;
    let found = sinks::list(&**client, principal.account_id).await?;
    Ok(Json(AuditSinkList {
        sinks: found.into_iter().map(view).collect(),
    }))
}

/// Stops and removes a sink; what it delivered stays delivered.
#[utoipa::path(delete, path = "/v1/audit/sinks/{id}", tag = "audit",
    params(("id" = Uuid, Path, description = "sink id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let Some((name, config)) = sinks::delete(&tx, principal.account_id, id).await? else {
        return Err(ApiError::not_found("audit sink"));
    };
    let metadata = match &config {
        Some(config) => sinks::audit_metadata(&name, config),
        None => serde_json::json!({ "name": name }),
    };
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "audit.sink_deleted",
            ("audit_sink", id),
            metadata,
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
