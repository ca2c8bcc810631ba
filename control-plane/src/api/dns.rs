//! A project's DNS zone: the settings ([`crate::dns`]), the records Sensei wrote, and the last
//! error writing them. The TSIG secret is write-only.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path};
use super::{actor_event, AppState};
use crate::audit;
use crate::dns::{DnsSettings, InvalidDns};
use crate::identity::auth::Principal;

/// The zone settings to store.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDns {
    /// The zone the records go in, e.g. `apps.example.com`.
    pub zone: String,
    /// The zone's primary, `IP:PORT` (updates go over TCP).
    pub server: String,
    /// The TSIG key's name as the DNS server knows it.
    pub key_name: String,
    /// `hmac-sha256` (default), `hmac-sha384` or `hmac-sha512`.
    pub algorithm: Option<String>,
    /// The TSIG secret, base64 (as in BIND's `key` statement). Write-only.
    pub secret: String,
    /// Seconds (default 60).
    pub ttl: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct DnsRecordView {
    pub server_id: Uuid,
    /// The record's name, fully qualified.
    pub name: String,
    /// An address (A/AAAA) or a host name (CNAME).
    pub target: String,
    pub written_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct DnsView {
    /// Absent when the project has no zone.
    pub zone: Option<String>,
    pub server: Option<String>,
    pub key_name: Option<String>,
    pub algorithm: Option<String>,
    pub ttl: Option<u32>,
    /// The records Sensei wrote and still owns (including those of a previous zone still
    /// being removed).
    pub records: Vec<DnsRecordView>,
    /// The last error writing or removing a record, until a pass succeeds.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

impl From<InvalidDns> for ApiError {
    fn from(e: InvalidDns) -> Self {
        ApiError::unprocessable(ErrorCode::InvalidDns, e.to_string())
    }
}

async fn view(state: &AppState, account: Uuid, id: Uuid) -> Result<DnsView, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            "SELECT dns, dns_error, dns_error_at FROM projects \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&id, &account],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("project"))?;
    let settings: Option<DnsSettings> = row
        .get::<_, Option<serde_json::Value>>("dns")
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| ApiError::internal(&format!("stored DNS settings: {e}")))?;
    let records = client
        .query(
            "SELECT server_id, name, target, written_at FROM dns_records WHERE project_id = $1 \
             ORDER BY name",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| DnsRecordView {
            server_id: r.get("server_id"),
            name: r.get("name"),
            target: r.get("target"),
            written_at: r.get("written_at"),
        })
        .collect();
    Ok(DnsView {
        zone: settings.as_ref().map(|s| s.zone.clone()),
        server: settings.as_ref().map(|s| s.server.to_string()),
        key_name: settings.as_ref().map(|s| s.key_name.clone()),
        algorithm: settings.as_ref().map(|s| s.algorithm.clone()),
        ttl: settings.as_ref().map(|s| s.ttl),
        records,
        last_error: row.get("dns_error"),
        last_error_at: row.get("dns_error_at"),
    })
}

/// The project's DNS zone, the records written and the last error.
#[utoipa::path(get, path = "/v1/projects/{id}/dns", tag = "projects",
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 200, body = DnsView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Json<DnsView>, ApiError> {
    super::projects::in_reach(&principal, id)?;
    Ok(Json(view(&state, principal.account_id, id).await?))
}

/// Sets the project's DNS zone: every server it is deployed to gets `<server name>.<zone>`.
#[utoipa::path(put, path = "/v1/projects/{id}/dns", tag = "projects", request_body = SetDns,
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 200, body = DnsView), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "another project of the account uses this zone"),
              (status = 422, body = ErrorBody, description = "invalid zone, server, key or secret")))]
pub async fn set(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    JsonBody(req): JsonBody<SetDns>,
) -> Result<Json<DnsView>, ApiError> {
    super::projects::may_change(&principal, id)?;
    let settings = DnsSettings {
        zone: req.zone.trim().trim_end_matches('.').to_ascii_lowercase(),
        server: req.server.trim().parse().map_err(|_| {
            InvalidDns::Field(format!(
                "server must be IP:PORT (e.g. 192.0.2.53:53), not {:?}",
                req.server.chars().take(80).collect::<String>()
            ))
        })?,
        key_name: req.key_name.trim().trim_end_matches('.').to_owned(),
        algorithm: req.algorithm.unwrap_or_else(|| "hmac-sha256".into()),
        ttl: req.ttl.unwrap_or(60),
    };
    let secret = settings.check(&req.secret, &state.outbound)?;
    let sealed = state.keys.encrypt(&secret);
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Records are named after servers: two projects of one account in one zone would write,
    // and remove, each other's names.
    let taken = tx
        .query_opt(
            "SELECT name FROM projects WHERE account_id = $1 AND id <> $2 AND deleted_at IS NULL \
             AND dns->>'zone' = $3 FOR UPDATE",
            &[&principal.account_id, &id, &settings.zone],
        )
        .await?;
    if let Some(other) = taken {
        return Err(ApiError::conflict(
            ErrorCode::ZoneTaken,
            format!(
                "project {:?} already writes records in {}; give each project its own zone",
                other.get::<_, String>("name"),
                settings.zone
            ),
        ));
    }
    let n = tx
        .execute(
            "UPDATE projects SET dns = $3, dns_secret_ciphertext = $4, dns_error = NULL, \
             dns_error_at = NULL WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&id, &principal.account_id, &json!(settings), &sealed],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("project"));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "project.dns_set",
            ("project", id),
            json!({"zone": settings.zone, "server": settings.server.to_string(),
                   "key_name": settings.key_name, "algorithm": settings.algorithm}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(view(&state, principal.account_id, id).await?))
}

/// Removes the project's DNS zone; the records Sensei wrote are removed from it.
#[utoipa::path(delete, path = "/v1/projects/{id}/dns", tag = "projects",
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 204, description = "removed; its records follow"), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    super::projects::may_change(&principal, id)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE projects SET dns = NULL, dns_secret_ciphertext = NULL \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&id, &principal.account_id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("project"));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "project.dns_removed",
            ("project", id),
            json!({}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
