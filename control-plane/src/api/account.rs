//! The account itself: settings (MFA requirement, audit retention), ownership, deletion.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::allowlist;
use crate::identity::auth::{Principal, Role};

/// Audit retention bounds, in days (the database checks them too).
pub const MIN_RETENTION_DAYS: i32 = 30;
pub const MAX_RETENTION_DAYS: i32 = 2557;

#[derive(Serialize, ToSchema)]
pub struct AccountSettings {
    pub id: Uuid,
    pub name: String,
    /// Every member must sign in with a second factor.
    pub require_mfa: bool,
    /// Every member's second factor must be a security key (WebAuthn): TOTP is refused at
    /// sign-in to a member who has a key, and a member without one must register one.
    pub require_webauthn: bool,
    /// Audit rows older than this many days are expired.
    pub audit_retention_days: i32,
    /// Deployment log lines older than this many days are deleted (the deployments stay).
    pub deploy_log_retention_days: i32,
    /// Networks (CIDR) the account may be used from: sign-in, sessions and API keys. Empty:
    /// anywhere.
    pub ip_allowlist: Vec<String>,
    /// A rollout's paused batch must be approved by someone other than the person who
    /// started the rollout.
    pub four_eyes_approval: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    pub name: Option<String>,
    pub require_mfa: Option<bool>,
    pub require_webauthn: Option<bool>,
    /// 30 to 2557 days (seven years).
    pub audit_retention_days: Option<i32>,
    /// 1 to 2557 days.
    pub deploy_log_retention_days: Option<i32>,
    /// Owners only. Addresses or CIDR networks (at most 64); `[]` lifts the restriction. A
    /// list that would exclude the caller's own address is refused.
    pub ip_allowlist: Option<Vec<String>>,
    /// Require that the person approving a rollout is not the one who started it.
    pub four_eyes_approval: Option<bool>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccount {
    /// The account's name, typed out, as a guard against accidents.
    pub confirm_name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferOwnership {
    /// The member who becomes an owner; the caller becomes an admin.
    pub user_id: Uuid,
}

const COLUMNS: &str =
    "id, name, require_mfa, require_webauthn, audit_retention_days, deploy_log_retention_days, \
     ip_allowlist, four_eyes_approval, created_at";

fn settings(r: &tokio_postgres::Row) -> AccountSettings {
    AccountSettings {
        id: r.get("id"),
        name: r.get("name"),
        require_mfa: r.get("require_mfa"),
        require_webauthn: r.get("require_webauthn"),
        audit_retention_days: r.get("audit_retention_days"),
        deploy_log_retention_days: r.get("deploy_log_retention_days"),
        ip_allowlist: r.get("ip_allowlist"),
        four_eyes_approval: r.get("four_eyes_approval"),
        created_at: r.get("created_at"),
    }
}

/// The caller's account and its settings.
#[utoipa::path(get, path = "/v1/account", tag = "account",
    responses((status = 200, body = AccountSettings), (status = 403, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<AccountSettings>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM accounts WHERE id = $1"),
            &[&principal.account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?;
    Ok(Json(settings(&row)))
}

/// Changes the account's name or settings.
#[utoipa::path(patch, path = "/v1/account", tag = "account", request_body = AccountChange,
    responses((status = 200, body = AccountSettings), (status = 403, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<AccountChange>,
) -> Result<Json<AccountSettings>, ApiError> {
    let name = req
        .name
        .as_deref()
        .map(crate::identity::names::account_name)
        .transpose()?;
    if let Some(days) = req.audit_retention_days {
        if !(MIN_RETENTION_DAYS..=MAX_RETENTION_DAYS).contains(&days) {
            return Err(ApiError::unprocessable(ErrorCode::InvalidRetention,
                format!("audit_retention_days must be {MIN_RETENTION_DAYS} to {MAX_RETENTION_DAYS} (seven years)"),
            ));
        }
    }
    if let Some(days) = req.deploy_log_retention_days {
        if !(1..=MAX_RETENTION_DAYS).contains(&days) {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidLogRetention,
                format!("deploy_log_retention_days must be 1 to {MAX_RETENTION_DAYS}"),
            ));
        }
    }
    let allowlist = match &req.ip_allowlist {
        None => None,
        Some(entries) => {
            // Who may reach the account at all is the owners' decision.
            if principal.role != Role::Owner {
                return Err(ApiError::forbidden(
                    ErrorCode::OwnerRequired,
                    "only an owner can change the account's network allowlist",
                ));
            }
            let networks = allowlist::parse(entries)?;
            let as_stored: Vec<Option<ipnet::IpNet>> = networks.iter().copied().map(Some).collect();
            if !allowlist::permits(&as_stored, meta.ip) {
                return Err(ApiError::unprocessable(
                    ErrorCode::AllowlistLocksYouOut,
                    format!(
                        "this list does not include your own address ({}): you would be locked out; add it first",
                        meta.ip
                    ),
                ));
            }
            Some(networks.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        }
    };
    if name.is_none()
        && req.require_mfa.is_none()
        && req.require_webauthn.is_none()
        && req.audit_retention_days.is_none()
        && req.deploy_log_retention_days.is_none()
        && allowlist.is_none()
        && req.four_eyes_approval.is_none()
    {
        return Err(ApiError::unprocessable(
            ErrorCode::NothingToChange,
            "give name, require_mfa, require_webauthn, audit_retention_days, \
             deploy_log_retention_days, ip_allowlist or four_eyes_approval",
        ));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            &format!(
                "UPDATE accounts SET name = COALESCE($2, name), \
                 require_mfa = COALESCE($3, require_mfa), \
                 audit_retention_days = COALESCE($4, audit_retention_days), \
                 deploy_log_retention_days = COALESCE($5, deploy_log_retention_days), \
                 ip_allowlist = COALESCE($6, ip_allowlist), \
                 four_eyes_approval = COALESCE($7, four_eyes_approval), \
                 require_webauthn = COALESCE($8, require_webauthn) \
                 WHERE id = $1 RETURNING {COLUMNS}"
            ),
            &[
                &principal.account_id,
                &name,
                &req.require_mfa,
                &req.audit_retention_days,
                &req.deploy_log_retention_days,
                &allowlist,
                &req.four_eyes_approval,
                &req.require_webauthn,
            ],
        )
        .await?;
    let mut changed = serde_json::Map::new();
    if let Some(n) = &name {
        changed.insert("name".into(), json!(n));
    }
    if let Some(v) = req.require_mfa {
        changed.insert("require_mfa".into(), json!(v));
    }
    if let Some(v) = req.require_webauthn {
        changed.insert("require_webauthn".into(), json!(v));
    }
    if let Some(v) = req.audit_retention_days {
        changed.insert("audit_retention_days".into(), json!(v));
    }
    if let Some(v) = req.deploy_log_retention_days {
        changed.insert("deploy_log_retention_days".into(), json!(v));
    }
    if let Some(v) = &allowlist {
        changed.insert("ip_allowlist".into(), json!(v));
    }
    if let Some(v) = req.four_eyes_approval {
        changed.insert("four_eyes_approval".into(), json!(v));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "account.updated",
            ("account", principal.account_id),
            serde_json::Value::Object(changed),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(settings(&row)))
}

/// Makes another member an owner and the caller an admin.
#[utoipa::path(post, path = "/v1/account/transfer-ownership", tag = "account", request_body = TransferOwnership,
    responses((status = 204, description = "transferred"), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn transfer_ownership(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<TransferOwnership>,
) -> Result<StatusCode, ApiError> {
    if req.user_id == principal.user_id {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidTarget,
            "you already own this account",
        ));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&principal.account_id],
    )
    .await?;
    let promoted = tx
        .execute(
            // An owner holds the built-in role and reaches the whole account: a custom role
            // or a resource scope the member had goes.
            "UPDATE users SET role = 'owner', custom_role_id = NULL, resource_scope = NULL \
             WHERE id = $1 AND account_id = $2",
            &[&req.user_id, &principal.account_id],
        )
        .await?;
    if promoted == 0 {
        return Err(ApiError::not_found("member"));
    }
    tx.execute(
        "UPDATE users SET role = 'admin' WHERE id = $1",
        &[&principal.user_id],
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "account.ownership_transferred",
            ("user", req.user_id),
            json!({"from": principal.user_id.to_string()}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes the account and everything in it: members, servers (agent certificates revoked
/// at once), projects, deployments. The audit log stays, as the record that it happened.
#[utoipa::path(delete, path = "/v1/account", tag = "account", request_body = DeleteAccount,
    responses((status = 204, description = "deleted"), (status = 403, body = ErrorBody),
              (status = 422, body = ErrorBody, description = "confirm_name does not match")))]
pub async fn delete(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<DeleteAccount>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let name: String = tx
        .query_opt(
            "SELECT name FROM accounts WHERE id = $1 FOR UPDATE",
            &[&principal.account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("account"))?
        .get(0);
    if req.confirm_name.trim() != name {
        return Err(ApiError::unprocessable(
            ErrorCode::ConfirmationMismatch,
            "confirm_name must be the account's name exactly",
        ));
    }
    let servers: Vec<Uuid> = tx
        .query(
            // Locked, in id order, before their certificates: as server deletion and
            // enrollment lock (server, then certificates), so an enrollment in flight either
            // finishes first (and its certificate is revoked here) or finds no server.
            "SELECT id FROM servers WHERE account_id = $1 ORDER BY id FOR UPDATE",
            &[&principal.account_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let revoked = super::servers::revoke_certificates(&tx, &servers).await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "account.deleted",
            ("account", principal.account_id),
            json!({"name": name, "certificates_revoked": revoked.len()}),
        ),
    )
    .await?;
    tx.execute(
        "DELETE FROM accounts WHERE id = $1",
        &[&principal.account_id],
    )
    .await?;
    tx.commit().await?;
    state.agents.revoke(&revoked);
    Ok(StatusCode::NO_CONTENT)
}
