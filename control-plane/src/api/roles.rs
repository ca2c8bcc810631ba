//! Custom roles: an account's own named sets of permissions, given to members with
//! `PATCH /v1/members/{id}` (`{"role": "<name>"}`), optionally with a resource scope.
//!
//! A custom role holds only the permissions in [`reach::DELEGABLE`]; member management, the
//! account's settings, audit sinks and ownership stay with the built-in admin and owner roles,
//! so no custom role can be used to grant itself more.

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
use crate::identity::auth::{Principal, Role};
use crate::identity::reach::{self, MAX_CUSTOM_ROLES};

#[derive(Serialize, ToSchema)]
pub struct RoleView {
    pub id: Uuid,
    pub name: String,
    pub permissions: Vec<String>,
    /// Members holding this role now.
    pub members: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct BuiltInRole {
    pub name: String,
    pub permissions: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RoleList {
    /// The five roles every account has, weakest first.
    pub built_in: Vec<BuiltInRole>,
    /// This account's own roles, by name.
    pub custom: Vec<RoleView>,
    /// The permissions a custom role may hold.
    pub delegable: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRole {
    /// 1 to 64 characters; not the name of a built-in role.
    pub name: String,
    /// Permission names, e.g. `deployments:write`, `rollouts:approve`.
    pub permissions: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRole {
    pub name: Option<String>,
    pub permissions: Option<Vec<String>>,
}

fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    // Plain ASCII: a name shown next to the built-in roles must not be able to pass for one
    // (a Cyrillic "а", an invisible joiner, a right-to-left override).
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c))
    {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidName,
            "a role's name is 1 to 64 ASCII letters, digits, spaces, '-', '_' or '.'",
        ));
    }
    if Role::parse(&name.to_ascii_lowercase()).is_some() {
        return Err(ApiError::conflict(
            ErrorCode::RoleTaken,
            format!("{name} is a built-in role"),
        ));
    }
    Ok(name.to_owned())
}

fn check_permissions(names: &[String]) -> Result<Vec<String>, ApiError> {
    let scopes = reach::parse_permissions(names)
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidPermissions, e))?;
    Ok(scopes.iter().map(|s| s.as_str().to_owned()).collect())
}

fn taken(e: tokio_postgres::Error, name: &str) -> ApiError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        ApiError::conflict(
            ErrorCode::RoleTaken,
            format!("the account already has a role named {name}"),
        )
    } else {
        e.into()
    }
}

const VIEW_SQL: &str = "SELECT r.id, r.name, r.permissions, r.created_at, \
     (SELECT count(*) FROM users u WHERE u.custom_role_id = r.id) AS members \
     FROM roles r WHERE r.account_id = $1";

fn view(r: &tokio_postgres::Row) -> RoleView {
    RoleView {
        id: r.get("id"),
        name: r.get("name"),
        permissions: r.get("permissions"),
        members: r.get("members"),
        created_at: r.get("created_at"),
    }
}

async fn load(
    client: &impl deadpool_postgres::GenericClient,
    account: Uuid,
    id: Uuid,
) -> Result<RoleView, ApiError> {
    let row = client
        .query_opt(&format!("{VIEW_SQL} AND r.id = $2"), &[&account, &id])
        .await?
        .ok_or_else(|| ApiError::not_found("role"))?;
    Ok(view(&row))
}

/// The built-in roles, the account's custom roles and the permissions a custom role may hold.
#[utoipa::path(get, path = "/v1/roles", tag = "members",
    responses((status = 200, body = RoleList), (status = 403, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<RoleList>, ApiError> {
    let client = state.pool.get().await?;
    let custom = client
        .query(
            &format!("{VIEW_SQL} ORDER BY lower(r.name) LIMIT $2"),
            &[&principal.account_id, &MAX_CUSTOM_ROLES],
        )
        .await?
        .iter()
        .map(view)
        .collect();
    let names = |pred: &dyn Fn(crate::identity::auth::Scope) -> bool| {
        crate::identity::auth::Scope::ALL
            .into_iter()
            .filter(|s| pred(*s))
            .map(|s| s.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    Ok(Json(RoleList {
        built_in: Role::ALL
            .iter()
            .map(|role| BuiltInRole {
                name: role.as_str().to_owned(),
                permissions: names(&|s| role.grants(s)),
            })
            .collect(),
        custom,
        delegable: names(&|s| reach::DELEGABLE.contains(&s)),
    }))
}

/// Defines a custom role.
#[utoipa::path(post, path = "/v1/roles", tag = "members", request_body = CreateRole,
    responses((status = 201, body = RoleView),
              (status = 409, body = ErrorBody, description = "name taken (or a built-in role's)"),
              (status = 422, body = ErrorBody, description = "invalid name or permissions, or too many roles")))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<CreateRole>,
) -> Result<(StatusCode, Json<RoleView>), ApiError> {
    let name = check_name(&req.name)?;
    let permissions = check_permissions(&req.permissions)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Serialised per account, so the count below cannot be raced past.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&principal.account_id],
    )
    .await?;
    let count: i64 = tx
        .query_one(
            "SELECT count(*) FROM roles WHERE account_id = $1",
            &[&principal.account_id],
        )
        .await?
        .get(0);
    if count >= MAX_CUSTOM_ROLES {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidName,
            format!("an account has at most {MAX_CUSTOM_ROLES} custom roles"),
        ));
    }
    let id = Uuid::new_v4();
    tx.execute(
        "INSERT INTO roles (id, account_id, name, permissions, created_by) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &principal.account_id, &name, &permissions, &principal.user_id],
    )
    .await
    .map_err(|e| taken(e, &name))?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "role.created",
            ("role", id),
            json!({"name": name, "permissions": permissions.join(" ")}),
        ),
    )
    .await?;
    let role = load(&tx, principal.account_id, id).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(role)))
}

/// Renames a custom role or changes its permissions; its members get the new permissions on
/// their next request, API keys included.
#[utoipa::path(patch, path = "/v1/roles/{id}", tag = "members", request_body = UpdateRole,
    params(("id" = Uuid, Path, description = "role id")),
    responses((status = 200, body = RoleView), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "name taken"),
              (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    JsonBody(req): JsonBody<UpdateRole>,
) -> Result<Json<RoleView>, ApiError> {
    if req.name.is_none() && req.permissions.is_none() {
        return Err(ApiError::unprocessable(
            ErrorCode::NothingToChange,
            "give name, permissions or both",
        ));
    }
    let name = req.name.as_deref().map(check_name).transpose()?;
    let permissions = req
        .permissions
        .as_deref()
        .map(check_permissions)
        .transpose()?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let before = tx
        .query_opt(
            "SELECT name, permissions FROM roles WHERE id = $1 AND account_id = $2 FOR UPDATE",
            &[&id, &principal.account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("role"))?;
    let old_name: String = before.get(0);
    let old_permissions: Vec<String> = before.get(1);
    tx.execute(
        "UPDATE roles SET name = coalesce($3, name), permissions = coalesce($4, permissions) \
         WHERE id = $1 AND account_id = $2",
        &[&id, &principal.account_id, &name, &permissions],
    )
    .await
    .map_err(|e| taken(e, name.as_deref().unwrap_or_default()))?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "role.updated",
            ("role", id),
            json!({
                "from": {"name": old_name, "permissions": old_permissions.join(" ")},
                "to": {"name": name.unwrap_or(old_name.clone()),
                       "permissions": permissions.unwrap_or(old_permissions).join(" ")},
            }),
        ),
    )
    .await?;
    let role = load(&tx, principal.account_id, id).await?;
    tx.commit().await?;
    Ok(Json(role))
}

/// Deletes a custom role nobody holds.
#[utoipa::path(delete, path = "/v1/roles/{id}", tag = "members",
    params(("id" = Uuid, Path, description = "role id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "members still hold it")))]
pub async fn delete(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let role = load(&tx, principal.account_id, id).await?;
    if role.members > 0 {
        return Err(ApiError::conflict(
            ErrorCode::RoleInUse,
            format!(
                "{} member(s) hold {}: give them another role first",
                role.members, role.name
            ),
        ));
    }
    // The foreign key refuses the delete too if a member took the role meanwhile.
    tx.execute("DELETE FROM roles WHERE id = $1", &[&id])
        .await
        .map_err(|e| {
            if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) {
                ApiError::conflict(ErrorCode::RoleInUse, "a member holds this role")
            } else {
                e.into()
            }
        })?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "role.deleted",
            ("role", id),
            json!({"name": role.name}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
