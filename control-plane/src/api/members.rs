//! The people in an account: members and their roles, and invitations.
//!
//! Admins manage members; only owners grant, take away or remove the owner role, and the
//! account always keeps at least one owner (checked under a lock on the account row, so two
//! admins demoting the last two owners at once cannot both succeed).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth_routes::{
    create_session, new_password_hash, session_cookie, with_cookie, UserView,
};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path, QueryParams};
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::auth::{Principal, Role, SESSION_IDLE_DAYS};
use crate::identity::names::normalise_email;
use crate::identity::reach::ResourceScope;
use crate::identity::tokens::{Token, TokenKind};

/// How long an invitation link stays valid.
pub const INVITATION_DAYS: i64 = 7;
/// Open invitations an account may have at once.
const MAX_OPEN_INVITATIONS: i64 = 100;

#[derive(Serialize, ToSchema)]
pub struct MemberView {
    pub id: Uuid,
    pub email: String,
    /// A built-in role, or the name of one of the account's custom roles.
    pub role: String,
    pub mfa_enabled: bool,
    /// The resources the member reaches; absent: the whole account.
    pub resource_scope: Option<ResourceScope>,
    pub created_at: DateTime<Utc>,
}

/// The member columns [`member_view`] reads, from `users u LEFT JOIN roles r`.
const MEMBER_COLUMNS: &str = "u.id, u.email, coalesce(r.name, u.role) AS role, \
     user_has_second_factor(u.id) AS mfa_enabled, u.resource_scope, u.created_at";

fn member_view(r: &tokio_postgres::Row) -> Result<MemberView, ApiError> {
    let scope: Option<serde_json::Value> = r.get("resource_scope");
    Ok(MemberView {
        id: r.get("id"),
        email: r.get("email"),
        role: r.get("role"),
        mfa_enabled: r.get("mfa_enabled"),
        resource_scope: scope
            .map(serde_json::from_value)
            .transpose()
            .map_err(|_| ApiError::internal("unreadable resource scope in database"))?,
        created_at: r.get("created_at"),
    })
}

#[derive(Serialize, ToSchema)]
pub struct MemberList {
    pub members: Vec<MemberView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// `viewer`, `operator`, `developer`, `admin`, `owner`, or the name of one of the
    /// account's custom roles (`GET /v1/roles`). Absent: unchanged.
    pub role: Option<String>,
    /// What the member may reach: `{"projects": [...], "server_labels": {...}}`, or `null`
    /// for the whole account. Absent: unchanged. Owners always reach the whole account.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<ResourceScope>)]
    pub resource_scope: Option<Option<ResourceScope>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one not sent (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A role as a member may be given it.
enum Assigned {
    BuiltIn(Role),
    Custom { id: Uuid, name: String },
}

/// A built-in role by name, else one of the account's custom roles.
async fn assigned_role(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: Uuid,
    text: &str,
) -> Result<Assigned, ApiError> {
    if let Some(role) = Role::parse(text.trim()) {
        return Ok(Assigned::BuiltIn(role));
    }
    let row = tx
        .query_opt(
            "SELECT id, name FROM roles WHERE account_id = $1 AND lower(name) = lower($2)",
            &[&account_id, &text.trim()],
        )
        .await?
        .ok_or_else(|| {
            ApiError::unprocessable(
                ErrorCode::InvalidRole,
                "role must be viewer, operator, developer, admin, owner or one of the \
                 account's custom roles (GET /v1/roles)",
            )
        })?;
    Ok(Assigned::Custom {
        id: row.get(0),
        name: row.get(1),
    })
}

/// Checks a resource scope before it is stored: bounded, and naming only the account's
/// projects.
async fn checked_scope(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: Uuid,
    scope: &ResourceScope,
) -> Result<serde_json::Value, ApiError> {
    scope
        .check()
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidResourceScope, e))?;
    if let Some(projects) = &scope.projects {
        let known: i64 = tx
            .query_one(
                "SELECT count(*) FROM projects WHERE account_id = $1 AND deleted_at IS NULL \
                 AND id = ANY($2)",
                &[&account_id, projects],
            )
            .await?
            .get(0);
        let mut unique = projects.clone();
        unique.sort();
        unique.dedup();
        if known != unique.len() as i64 {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidResourceScope,
                "projects: every id must be one of the account's projects",
            ));
        }
    }
    serde_json::to_value(scope).map_err(|_| ApiError::internal("encoding a resource scope"))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InvitationRequest {
    pub email: String,
    pub role: String,
}

#[derive(Serialize, ToSchema)]
pub struct InvitationView {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub invited_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedInvitation {
    pub invitation: InvitationView,
    /// The single-use token, shown once (it is also emailed when SMTP is configured).
    pub token: String,
    /// Whether the invitation email was handed to SMTP.
    pub emailed: bool,
}

#[derive(Serialize, ToSchema)]
pub struct InvitationList {
    pub invitations: Vec<InvitationView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The dashboard's page that accepts an invitation.
pub const INVITATION_PAGE: &str = "/ui/invitation";

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitation {
    pub token: String,
    /// The new member's password (10 to 1024 characters).
    pub password: String,
}

fn parse_role(text: &str) -> Result<Role, ApiError> {
    Role::parse(text.trim()).ok_or_else(|| {
        ApiError::unprocessable(
            ErrorCode::InvalidRole,
            "role must be viewer, operator, developer, admin or owner",
        )
    })
}

/// Only owners hand out or take away the owner role.
fn check_may_assign(principal: &Principal, role: Role) -> Result<(), ApiError> {
    if role == Role::Owner && principal.role != Role::Owner {
        return Err(ApiError::forbidden(
            ErrorCode::OwnerRequired,
            "only an owner can make someone an owner",
        ));
    }
    Ok(())
}

/// Locks the account row (serialising member changes) and counts its owners.
async fn lock_and_count_owners(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: Uuid,
) -> Result<i64, ApiError> {
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&account_id],
    )
    .await?;
    Ok(tx
        .query_one(
            "SELECT count(*) FROM users WHERE account_id = $1 AND role = 'owner'",
            &[&account_id],
        )
        .await?
        .get(0))
}

async fn member_role(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: Uuid,
    user_id: Uuid,
) -> Result<(Role, String), ApiError> {
    let row = tx
        .query_opt(
            "SELECT role, email FROM users WHERE id = $1 AND account_id = $2 FOR UPDATE",
            &[&user_id, &account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("member"))?;
    let role: String = row.get(0);
    Ok((
        Role::parse(&role).ok_or_else(|| ApiError::internal("unknown role in database"))?,
        row.get(1),
    ))
}

fn last_owner() -> ApiError {
    ApiError::conflict(
        ErrorCode::LastOwner,
        "an account keeps at least one owner: make someone else an owner first",
    )
}

/// The account's members.
#[utoipa::path(get, path = "/v1/members", tag = "members", params(PageQuery),
    responses((status = 200, body = MemberList), (status = 403, body = ErrorBody),
              (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<MemberList>, ApiError> {
    let page = query.page()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM users u LEFT JOIN roles r ON r.id = u.custom_role_id \
                 WHERE u.account_id = $1{}",
                Page::keyset_sql("u.created_at", "u.id", Order::OldestFirst, 2)
            ),
            &[
                &principal.account_id,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
            ],
        )
        .await?;
    let members = rows
        .iter()
        .map(member_view)
        .collect::<Result<Vec<_>, _>>()?;
    let (members, next_cursor) =
        page.finish(members, |m: &MemberView| Cursor::at(m.created_at, m.id));
    Ok(Json(MemberList {
        members,
        next_cursor,
    }))
}

/// Changes a member's role (built-in or custom) and what they may reach. Takes effect on their
/// next request, API keys included.
#[utoipa::path(patch, path = "/v1/members/{id}", tag = "members", request_body = RoleChange,
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 200, body = MemberView),
              (status = 403, body = ErrorBody, description = "only owners manage the owner role"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "last owner")))]
pub async fn change_role(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    JsonBody(req): JsonBody<RoleChange>,
) -> Result<Json<MemberView>, ApiError> {
    if req.role.is_none() && req.resource_scope.is_none() {
        return Err(ApiError::unprocessable(
            ErrorCode::NothingToChange,
            "give role, resource_scope or both",
        ));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let owners = lock_and_count_owners(&tx, principal.account_id).await?;
    let (current, _) = member_role(&tx, principal.account_id, id).await?;
    check_may_assign(&principal, current)?;
    let assigned = match &req.role {
        Some(text) => Some(assigned_role(&tx, principal.account_id, text).await?),
        None => None,
    };
    // The built-in rank after the change: a custom-role member ranks as a viewer.
    let rank = match &assigned {
        Some(Assigned::BuiltIn(role)) => *role,
        Some(Assigned::Custom { .. }) => Role::Viewer,
        None => current,
    };
    check_may_assign(&principal, rank)?;
    if current == Role::Owner && rank != Role::Owner && owners <= 1 {
        return Err(last_owner());
    }
    // Admins and owners manage members, invitations and the account itself, which a scope
    // cannot narrow (an admin could lift their own): they reach the whole account.
    let scope = match &req.resource_scope {
        Some(Some(_)) if rank >= Role::Admin => {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidResourceScope,
                "admins and owners reach the whole account; give a scope to other roles",
            ))
        }
        Some(Some(scope)) => Some(Some(checked_scope(&tx, principal.account_id, scope).await?)),
        Some(None) => Some(None),
        // Someone becoming an admin or owner keeps no scope they had before.
        None if rank >= Role::Admin => Some(None),
        None => None,
    };
    if let Some(assigned) = &assigned {
        let (custom_id, custom_name) = match assigned {
            Assigned::BuiltIn(_) => (None, None),
            Assigned::Custom { id, name } => (Some(*id), Some(name.as_str())),
        };
        tx.execute(
            "UPDATE users SET role = $3, custom_role_id = $4 WHERE id = $1 AND account_id = $2",
            &[&id, &principal.account_id, &rank.as_str(), &custom_id],
        )
        .await?;
        audit::append(
            &tx,
            state.keys.audit_keys(),
            &actor_event(
                &principal,
                &meta,
                "member.role_changed",
                ("user", id),
                json!({"from": current.as_str(), "to": custom_name.unwrap_or(rank.as_str())}),
            ),
        )
        .await?;
    }
    if let Some(scope) = &scope {
        tx.execute(
            "UPDATE users SET resource_scope = $3 WHERE id = $1 AND account_id = $2",
            &[&id, &principal.account_id, scope],
        )
        .await?;
        audit::append(
            &tx,
            state.keys.audit_keys(),
            &actor_event(
                &principal,
                &meta,
                "member.scope_changed",
                ("user", id),
                json!({"resource_scope": scope}),
            ),
        )
        .await?;
    }
    let row = tx
        .query_one(
            &format!(
                "SELECT {MEMBER_COLUMNS} FROM users u LEFT JOIN roles r ON r.id = u.custom_role_id \
                 WHERE u.id = $1"
            ),
            &[&id],
        )
        .await?;
    tx.commit().await?;
    Ok(Json(member_view(&row)?))
}

/// Removes a member: their sessions end and their API keys stop working at once.
#[utoipa::path(delete, path = "/v1/members/{id}", tag = "members",
    params(("id" = Uuid, Path, description = "user id")),
    responses((status = 204, description = "removed"), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "last owner")))]
pub async fn remove(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let owners = lock_and_count_owners(&tx, principal.account_id).await?;
    let (current, email) = member_role(&tx, principal.account_id, id).await?;
    check_may_assign(&principal, current)?;
    if current == Role::Owner && owners <= 1 {
        return Err(last_owner());
    }
    // Keys stop at once: authentication joins the key to its creator, and the creator is gone.
    tx.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE created_by = $1 AND revoked_at IS NULL",
        &[&id],
    )
    .await?;
    tx.execute("DELETE FROM users WHERE id = $1", &[&id])
        .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "member.removed",
            ("user", id),
            json!({"email": email, "role": current.as_str()}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

fn invitation_view(r: &tokio_postgres::Row) -> InvitationView {
    InvitationView {
        id: r.get(0),
        email: r.get(1),
        role: r.get(2),
        invited_by: r.get(3),
        created_at: r.get(4),
        expires_at: r.get(5),
    }
}

const INVITATION_COLUMNS: &str = "id, email, role, invited_by, created_at, expires_at";

/// Invites an email address with a role. The token is answered once and emailed.
#[utoipa::path(post, path = "/v1/invitations", tag = "members", request_body = InvitationRequest,
    responses((status = 201, body = CreatedInvitation),
              (status = 403, body = ErrorBody, description = "only owners invite owners"),
              (status = 409, body = ErrorBody, description = "already a user"),
              (status = 422, body = ErrorBody)))]
pub async fn invite(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<InvitationRequest>,
) -> Result<Response, ApiError> {
    let email = normalise_email(&req.email)?;
    let role = parse_role(&req.role)?;
    check_may_assign(&principal, role)?;
    let token = Token::generate();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&principal.account_id],
    )
    .await?;
    let taken = tx
        .query_opt(
            "SELECT 1 FROM users WHERE lower(email) = lower($1)",
            &[&email],
        )
        .await?;
    if taken.is_some() {
        return Err(ApiError::conflict(
            ErrorCode::EmailTaken,
            "this email already belongs to a Sensei user",
        ));
    }
    let open: i64 = tx
        .query_one(
            "SELECT count(*) FROM invitations WHERE account_id = $1 AND accepted_at IS NULL \
             AND revoked_at IS NULL AND expires_at > now()",
            &[&principal.account_id],
        )
        .await?
        .get(0);
    if open >= MAX_OPEN_INVITATIONS {
        return Err(ApiError::conflict(
            ErrorCode::TooManyInvitations,
            format!("at most {MAX_OPEN_INVITATIONS} open invitations; revoke some first"),
        ));
    }
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO invitations (id, account_id, email, role, secret_hash, invited_by, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(days => $7)) \
                 RETURNING {INVITATION_COLUMNS}"
            ),
            &[&token.id, &principal.account_id, &email, &role.as_str(), &token.secret_hash(),
              &principal.user_id, &(INVITATION_DAYS as i32)],
        )
        .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "invitation.created",
            ("invitation", token.id),
            json!({"email": email, "role": role.as_str()}),
        ),
    )
    .await?;
    tx.commit().await?;
    let secret = token.render(TokenKind::Invitation);
    let body = format!(
        "{} invited you to their Sensei account as {}.\n\n\
         Choose a password to join (the link works once, for {INVITATION_DAYS} days):\n\n\
         {}\n\n\
         or with:\n\n\
         curl -X POST {}/v1/invitations/accept -H 'content-type: application/json' \\\n  \
         -d '{{\"token\": \"{secret}\", \"password\": \"NEW PASSWORD\"}}'\n",
        principal.email,
        role.as_str(),
        super::password_reset::dashboard_link(&state.public_url, INVITATION_PAGE, &secret),
        state.public_url
    );
    let mailer = state.mailer.clone();
    let to = email.clone();
    tokio::spawn(async move { mailer.send(&to, "You are invited to Sensei", &body).await });
    Ok((
        StatusCode::CREATED,
        Json(CreatedInvitation {
            invitation: invitation_view(&row),
            token: secret,
            emailed: state.mailer.delivers(),
        }),
    )
        .into_response())
}

/// Open invitations.
#[utoipa::path(get, path = "/v1/invitations", tag = "members", params(PageQuery),
    responses((status = 200, body = InvitationList), (status = 403, body = ErrorBody),
              (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list_invitations(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<InvitationList>, ApiError> {
    let page = query.page()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {INVITATION_COLUMNS} FROM invitations WHERE account_id = $1 \
                 AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now(){}",
                Page::keyset_sql("created_at", "id", Order::OldestFirst, 2)
            ),
            &[
                &principal.account_id,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
            ],
        )
        .await?;
    let (invitations, next_cursor) = page.finish(
        rows.iter().map(invitation_view).collect(),
        |i: &InvitationView| Cursor::at(i.created_at, i.id),
    );
    Ok(Json(InvitationList {
        invitations,
        next_cursor,
    }))
}

/// Withdraws an open invitation; its link stops working.
#[utoipa::path(delete, path = "/v1/invitations/{id}", tag = "members",
    params(("id" = Uuid, Path, description = "invitation id")),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn revoke_invitation(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let done = tx
        .execute(
            "UPDATE invitations SET revoked_at = now() WHERE id = $1 AND account_id = $2 \
             AND accepted_at IS NULL AND revoked_at IS NULL",
            &[&id, &principal.account_id],
        )
        .await?;
    if done == 0 {
        return Err(ApiError::not_found("open invitation"));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "invitation.revoked",
            ("invitation", id),
            json!({}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Joins an account through an invitation: sets the password and signs in.
#[utoipa::path(post, path = "/v1/invitations/accept", tag = "members", request_body = AcceptInvitation,
    responses((status = 201, body = UserView, description = "joined; session cookie set"),
              (status = 400, body = ErrorBody, description = "invalid, used, revoked or expired token"),
              (status = 409, body = ErrorBody, description = "the email registered meanwhile"),
              (status = 422, body = ErrorBody, description = "weak password")))]
pub async fn accept(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<AcceptInvitation>,
) -> Result<Response, ApiError> {
    let invalid_token = || {
        ApiError::bad_request(
            ErrorCode::InvalidToken,
            "this invitation is not valid (unknown, used, withdrawn or expired)",
        )
    };
    let token = Token::parse(TokenKind::Invitation, req.token.trim()).ok_or_else(invalid_token)?;
    // The token first, without hashing anything: a flood of forged tokens costs a lookup
    // each, not an Argon2 run. (Checked again under the row lock below.)
    let lookup = |lock: bool| {
        format!(
            "SELECT secret_hash, account_id, email, role, \
                    accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now() \
             FROM invitations WHERE id = $1{}",
            if lock { " FOR UPDATE" } else { "" }
        )
    };
    let valid = |row: Option<tokio_postgres::Row>| {
        row.filter(|r| token.matches(&r.get::<_, Vec<u8>>(0)) && r.get::<_, bool>(4))
            .ok_or_else(invalid_token)
    };
    valid(
        state
            .pool
            .get()
            .await?
            .query_opt(&lookup(false), &[&token.id])
            .await?,
    )?;
    let hash = new_password_hash(&state.hashing, req.password).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let row = valid(tx.query_opt(&lookup(true), &[&token.id]).await?)?;
    let account_id: Uuid = row.get(1);
    let email: String = row.get(2);
    let role: String = row.get(3);
    // The account's networks hold for every way in, not only the sign-in page.
    if !crate::identity::allowlist::account_permits(&*tx, account_id, meta.ip).await? {
        return Err(ApiError::forbidden(
            ErrorCode::IpNotAllowed,
            format!("this account may not be used from {}", meta.ip),
        ));
    }
    // An account that requires single sign-on takes its members through its provider: an
    // invitation (a bearer token) never becomes a password and a session that skipped it.
    // The invitation stays open; the person signs in through the provider instead.
    let sso_slug: Option<String> = tx
        .query_opt(
            "SELECT slug FROM account_sso WHERE account_id = $1 AND require_sso",
            &[&account_id],
        )
        .await?
        .map(|r| r.get(0));
    if let Some(slug) = sso_slug {
        return Err(ApiError::forbidden(
            ErrorCode::SsoRequired,
            format!(
                "this account requires single sign-on: sign in through your identity provider \
                 at /ui/sso?org={slug} instead of accepting with a password"
            ),
        ));
    }
    let user_id = Uuid::new_v4();
    let inserted = tx
        .execute(
            "INSERT INTO users (id, account_id, email, password_hash, role) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&user_id, &account_id, &email, &hash, &role],
        )
        .await?;
    if inserted == 0 {
        return Err(ApiError::conflict(
            ErrorCode::EmailTaken,
            "this email already belongs to a Sensei user",
        ));
    }
    tx.execute(
        "UPDATE invitations SET accepted_at = now() WHERE id = $1",
        &[&token.id],
    )
    .await?;
    let (_, cookie) = create_session(&tx, user_id, &meta).await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::User {
                id: user_id,
                email: email.clone(),
            },
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "invitation.accepted",
            target: Some(("invitation", token.id)),
            outcome: Outcome::Success,
            metadata: json!({"role": role}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(with_cookie(
        (
            StatusCode::CREATED,
            Json(UserView {
                id: user_id,
                email,
                role,
                account_id,
            }),
        )
            .into_response(),
        session_cookie(&cookie, SESSION_IDLE_DAYS * 86_400),
    ))
}
