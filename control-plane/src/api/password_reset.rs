//! Password reset by email: a single-use token valid for 15 minutes. The request answers the
//! same whether or not the address has an account, and the email leaves in the background so
//! that timing does not tell either. Confirming sets the password and ends every session.

use axum::extract::State;
use axum::Json;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth_routes::new_password_hash;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody};
use super::AppState;
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::login_throttle;
use crate::identity::tokens::{Token, TokenKind};

/// How long a reset link works.
pub const RESET_MINUTES: i64 = 15;
/// Reset emails one user can be sent per hour.
const MAX_PER_HOUR: i64 = 5;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequest {
    pub email: String,
}

#[derive(Serialize, ToSchema)]
pub struct ResetAccepted {
    pub status: &'static str,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetConfirm {
    pub token: String,
    /// The new password (10 to 1024 characters).
    pub password: String,
}

/// Asks for a reset email. Always answers 202 with the same body.
#[utoipa::path(post, path = "/v1/auth/password-reset", tag = "auth", request_body = ResetRequest,
    responses((status = 202, body = ResetAccepted, description = "if the address has an account, an email is on its way"),
              (status = 429, body = ErrorBody, description = "too many failed attempts from this address")))]
pub async fn request(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<ResetRequest>,
) -> Result<(StatusCode, Json<ResetAccepted>), ApiError> {
    let accepted = (
        StatusCode::ACCEPTED,
        Json(ResetAccepted {
            status: "if this address has an account, a reset link was sent to it",
        }),
    );
    let mut client = state.pool.get().await?;
    login_throttle::check_ip(&**client, meta.ip).await?;
    let email = req.email.trim();
    if email.is_empty() || email.len() > 254 {
        return Ok(accepted);
    }
    let tx = client.transaction().await?;
    let Some(user) = tx
        .query_opt(
            "SELECT id, account_id, email FROM users WHERE lower(email) = lower($1) FOR UPDATE",
            &[&email],
        )
        .await?
    else {
        return Ok(accepted);
    };
    let user_id: Uuid = user.get(0);
    let account_id: Uuid = user.get(1);
    let address: String = user.get(2);
    let recent: i64 = tx
        .query_one(
            "SELECT count(*) FROM password_resets WHERE user_id = $1 AND created_at > now() - interval '1 hour'",
            &[&user_id],
        )
        .await?
        .get(0);
    if recent >= MAX_PER_HOUR {
        // Quietly: a flood of requests must not flood the inbox, nor say the address exists.
        return Ok(accepted);
    }
    let token = Token::generate();
    tx.execute(
        "INSERT INTO password_resets (id, user_id, secret_hash, expires_at) \
         VALUES ($1, $2, $3, now() + make_interval(mins => $4))",
        &[
            &token.id,
            &user_id,
            &token.secret_hash(),
            &(RESET_MINUTES as i32),
        ],
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::Anonymous,
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.password_reset_requested",
            target: Some(("user", user_id)),
            outcome: Outcome::Success,
            metadata: json!({}),
        },
    )
    .await?;
    tx.commit().await?;
    let secret = token.render(TokenKind::PasswordReset);
    let body = format!(
        "Someone (hopefully you) asked to reset the Sensei password for {address}.\n\n\
         This token works once, for {RESET_MINUTES} minutes:\n\n{}\n\
         Every session of yours is signed out when it is used. If you did not ask for this, \
         ignore this email: your password stays as it is.\n",
        confirm_instructions(&state.public_url, &secret)
    );
    let mailer = state.mailer.clone();
    tokio::spawn(async move {
        mailer
            .send(&address, "Reset your Sensei password", &body)
            .await
    });
    Ok(accepted)
}

/// The token and the request that sets a password with it (a reset email, `create-owner`).
pub fn confirm_instructions(public_url: &str, token: &str) -> String {
    format!(
        "{token}\n\n\
         Set the password in the dashboard:\n\n{}\n\n\
         or with:\n\n\
         curl -X POST {public_url}/v1/auth/password-reset/confirm -H 'content-type: application/json' \\\n  \
         -d '{{\"token\": \"{token}\", \"password\": \"NEW PASSWORD\"}}'\n",
        dashboard_link(public_url, RESET_PAGE, token)
    )
}

/// The dashboard's page that sets a password with a reset token.
pub const RESET_PAGE: &str = "/ui/reset-password/confirm";

/// A link to a dashboard page for a token sent by email (a reset, an invitation). The token
/// is in the fragment, which a browser never sends to a server: it reaches no access log,
/// proxy or `Referer`; the page's script copies it into the form.
pub fn dashboard_link(public_url: &str, page: &str, token: &str) -> String {
    format!("{}{page}#token={token}", public_url.trim_end_matches('/'))
}

/// Sets a new password with a reset token; every session of the user ends.
#[utoipa::path(post, path = "/v1/auth/password-reset/confirm", tag = "auth", request_body = ResetConfirm,
    responses((status = 204, description = "password changed; all sessions signed out"),
              (status = 400, body = ErrorBody, description = "invalid, used or expired token"),
              (status = 422, body = ErrorBody, description = "weak password")))]
pub async fn confirm(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<ResetConfirm>,
) -> Result<StatusCode, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            ErrorCode::InvalidToken,
            "this reset link is not valid (unknown, used or expired); ask for a new one",
        )
    };
    let token = Token::parse(TokenKind::PasswordReset, req.token.trim()).ok_or_else(invalid)?;
    // The token first, without hashing anything: a flood of forged links costs a lookup
    // each, not an Argon2 run. (Checked again under the row lock below.)
    let lookup = |lock: bool| {
        format!(
            "SELECT r.secret_hash, r.used_at IS NULL AND r.expires_at > now(), u.id, u.account_id, u.email \
             FROM password_resets r JOIN users u ON u.id = r.user_id WHERE r.id = $1{}",
            if lock { " FOR UPDATE OF r" } else { "" }
        )
    };
    let valid = |row: Option<tokio_postgres::Row>| {
        row.filter(|r| token.matches(&r.get::<_, Vec<u8>>(0)) && r.get::<_, bool>(1))
            .ok_or_else(invalid)
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
    let user_id: Uuid = row.get(2);
    let account_id: Uuid = row.get(3);
    let email: String = row.get(4);
    // The account's networks hold for every way in, not only the sign-in page.
    if !crate::identity::allowlist::account_permits(&*tx, account_id, meta.ip).await? {
        return Err(ApiError::forbidden(
            ErrorCode::IpNotAllowed,
            format!("this account may not be used from {}", meta.ip),
        ));
    }
    tx.execute(
        "UPDATE users SET password_hash = $2 WHERE id = $1",
        &[&user_id, &hash],
    )
    .await?;
    // Every outstanding link dies with this one.
    tx.execute(
        "UPDATE password_resets SET used_at = now() WHERE user_id = $1 AND used_at IS NULL",
        &[&user_id],
    )
    .await?;
    let ended = tx
        .execute(
            "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            &[&user_id],
        )
        .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::User { id: user_id, email },
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.password_reset",
            target: Some(("user", user_id)),
            outcome: Outcome::Success,
            metadata: json!({"sessions_revoked": ended}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
