//! API keys: created by a signed-in user, scoped no wider than that user's role, optionally
//! bound to source networks and an expiry. The secret is shown once; only its hash is kept.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path, QueryParams};
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit::{self, AuditEvent, Outcome};
use crate::identity::auth::{Principal, Scope};
use crate::identity::tokens::{Token, TokenKind};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    pub name: String,
    /// e.g. `["servers:read", "deployments:write"]`
    pub scopes: Vec<String>,
    /// Networks in CIDR form (a bare address means just that address). Empty: anywhere.
    #[serde(default)]
    pub ip_allowlist: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyView {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub ip_allowlist: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub created_by: Option<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub key: ApiKeyView,
    /// The key itself: shown once, never again.
    pub secret: String,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyList {
    pub api_keys: Vec<ApiKeyView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Creates an API key; the answer holds the secret, once.
#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey),
              (status = 403, body = ErrorBody, description = "a scope exceeds your role"),
              (status = 422, body = ErrorBody, description = "unknown scope, bad network or past expiry")))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<CreateApiKey>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidName,
            "name must be 1 to 200 characters",
        ));
    }
    if req.scopes.is_empty() {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidScopes,
            "give at least one scope",
        ));
    }
    let mut scopes = Vec::new();
    for text in &req.scopes {
        let scope = Scope::parse(text).ok_or_else(|| {
            let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::unprocessable(
                ErrorCode::InvalidScopes,
                format!("unknown scope {text:?}; known scopes: {}", known.join(", ")),
            )
        })?;
        if !principal.grants(scope) {
            return Err(ApiError::forbidden(
                ErrorCode::ScopeExceedsRole,
                format!(
                    "your role ({}) does not allow {}, so no key you create can",
                    principal.role_name(),
                    scope.as_str()
                ),
            ));
        }
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    let allowlist: Vec<String> = crate::identity::allowlist::parse(&req.ip_allowlist)?
        .iter()
        .map(|n| n.to_string())
        .collect();
    if let Some(at) = req.expires_at.filter(|at| *at <= Utc::now()) {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidExpiry,
            format!("expires_at {} is in the past", at.to_rfc3339()),
        ));
    }
    let scope_names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let token = Token::generate();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO api_keys (id, account_id, created_by, name, secret_hash, scopes, ip_allowlist, expires_at) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING created_at",
            &[
                &token.id,
                &principal.account_id,
                &principal.user_id,
                &name,
                &token.secret_hash(),
                &scope_names,
                &allowlist,
                &req.expires_at,
            ],
        )
        .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(principal.account_id),
            actor: principal.actor(),
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "api_key.created",
            target: Some(("api_key", token.id)),
            outcome: Outcome::Success,
            metadata: json!({ "name": name, "scopes": scope_names.join(" ") }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            key: ApiKeyView {
                id: token.id,
                name,
                scopes: scope_names,
                ip_allowlist: allowlist,
                expires_at: req.expires_at,
                created_at: row.get(0),
                last_used_at: None,
                created_by: Some(principal.user_id),
            },
            secret: token.render(TokenKind::ApiKey),
        }),
    ))
}

/// Lists the account's active API keys (never their secrets).
#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys", params(PageQuery),
    responses((status = 200, body = ApiKeyList), (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let page = query.page()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT id, name, scopes, ip_allowlist, expires_at, created_at, last_used_at, \
                 created_by FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL \
                 AND ($5::uuid IS NULL OR created_by = $5){}",
                Page::keyset_sql("created_at", "id", Order::OldestFirst, 2)
            ),
            &[
                &principal.account_id,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
                &own_keys_only(&principal),
            ],
        )
        .await?;
    let keys = rows
        .iter()
        .map(|r| ApiKeyView {
            id: r.get("id"),
            name: r.get("name"),
            scopes: r.get("scopes"),
            ip_allowlist: r.get("ip_allowlist"),
            expires_at: r.get("expires_at"),
            created_at: r.get("created_at"),
            last_used_at: r.get("last_used_at"),
            created_by: r.get("created_by"),
        })
        .collect();
    let (api_keys, next_cursor) =
        page.finish(keys, |k: &ApiKeyView| Cursor::at(k.created_at, k.id));
    Ok(Json(ApiKeyList {
        api_keys,
        next_cursor,
    }))
}

/// Revokes an API key at once.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", tag = "api-keys",
    params(("id" = Uuid, Path, description = "API key id")),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND account_id = $2 \
             AND revoked_at IS NULL AND ($3::uuid IS NULL OR created_by = $3)",
            &[&id, &principal.account_id, &own_keys_only(&principal)],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("API key"));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "api_key.revoked",
            ("api_key", id),
            json!({}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Admins and owners see and revoke every key of the account; anyone else who may manage keys
/// (a custom role with `api_keys:*`) only their own: someone else's key answers "not found".
fn own_keys_only(principal: &Principal) -> Option<Uuid> {
    (principal.role < crate::identity::auth::Role::Admin).then_some(principal.user_id)
}
