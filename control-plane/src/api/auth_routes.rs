//! Signup, login, logout and the user's sessions.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path};
use super::AppState;
use super::{mfa, webauthn};
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::auth::{Principal, Role, SESSION_COOKIE, SESSION_IDLE_DAYS};
use crate::identity::names::{account_name, normalise_email};
use crate::identity::passwords::{self, Verdict};
use crate::identity::signup::{self, NewAccount, SignupPolicy};
use crate::identity::tokens::{Token, TokenKind};
use crate::identity::{admission, allowlist, login_throttle};

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    /// 10 to 1024 characters.
    pub password: String,
    pub account_name: String,
    /// The operator's signup invitation (`su_…`), when signup is invite-only.
    pub signup_invitation: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// The current 6-digit code, for users with TOTP on.
    pub totp_code: Option<String>,
    /// A one-time recovery code, instead of `totp_code` when the authenticator is lost.
    pub recovery_code: Option<String>,
    /// A security key's answer to the challenge from `POST /v1/auth/login/webauthn`.
    #[serde(default)]
    pub webauthn: Option<webauthn::Assertion>,
}

/// The first step of a sign-in with a security key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordStep {
    pub email: String,
    pub password: String,
}

#[derive(Serialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub account_id: Uuid,
}

#[derive(Serialize, ToSchema)]
pub struct AccountView {
    pub id: Uuid,
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct SignupResponse {
    pub account: AccountView,
    pub user: UserView,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    pub user: UserView,
    pub session_id: Uuid,
}

#[derive(Serialize, ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    pub ip: String,
    pub user_agent: String,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Whether this is the session making the request.
    pub current: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub sessions: Vec<SessionView>,
}

/// Refuses a password the policy does not allow.
pub(super) fn check_password(password: &str) -> Result<(), ApiError> {
    passwords::check_policy(password)
        .map_err(|e| ApiError::unprocessable(ErrorCode::WeakPassword, e.to_string()))
}

/// Checks a new password against the policy and hashes it (off the async threads: Argon2id
/// takes tens of milliseconds by design).
pub(super) async fn new_password_hash(
    gate: &passwords::HashGate,
    password: String,
) -> Result<String, ApiError> {
    check_password(&password)?;
    gate.run(move || passwords::hash(&password))
        .await
        .map_err(|e| ApiError::internal(&e.to_string()))
}

pub(super) fn session_cookie(token: &str, max_age_secs: i64) -> HeaderValue {
    // Secure: the API only speaks HTTPS. SameSite=Lax: the cookie is not sent on cross-site
    // subrequests, which is what keeps state-changing POSTs from other sites out.
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age={max_age_secs}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("sensei_session=; Max-Age=0"))
}

/// The `Set-Cookie` value of a new session (for the dashboard's single sign-on callback).
pub fn session_cookie_header(token: &str) -> HeaderValue {
    session_cookie(token, SESSION_IDLE_DAYS * 86_400)
}

pub(super) fn with_cookie(mut response: Response, cookie: HeaderValue) -> Response {
    response
        .headers_mut()
        .append(http::header::SET_COOKIE, cookie);
    response
}

pub(super) async fn create_session(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
    meta: &ClientMeta,
) -> Result<(Uuid, String), ApiError> {
    let token = Token::generate();
    tx.execute(
        "INSERT INTO sessions (id, user_id, secret_hash, ip, user_agent) VALUES ($1,$2,$3,$4,$5)",
        &[
            &token.id,
            &user_id,
            &token.secret_hash(),
            &meta.ip.to_string(),
            &meta.user_agent,
        ],
    )
    .await?;
    Ok((token.id, token.render(TokenKind::Session)))
}

/// Creates an account and its owner, and signs the owner in, when the signup policy lets
/// the caller (`--signup`): throttled per client address before any password is hashed.
#[utoipa::path(post, path = "/v1/auth/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = SignupResponse, description = "account created; session cookie set"),
              (status = 400, body = ErrorBody, description = "the signup invitation is unknown, used or expired"),
              (status = 403, body = ErrorBody, description = "signup is closed, or needs an invitation"),
              (status = 409, body = ErrorBody, description = "email already registered"),
              (status = 422, body = ErrorBody, description = "invalid email, password or account name"),
              (status = 429, body = ErrorBody, description = "too many signups from this address")))]
pub async fn signup(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<SignupRequest>,
) -> Result<Response, ApiError> {
    let invitation = match (state.signup, req.signup_invitation.as_deref()) {
        (SignupPolicy::Closed, _) => {
            return Err(ApiError::forbidden(
                ErrorCode::SignupClosed,
                "this control plane does not take signups: its operator creates accounts \
                 (sensei-control-plane create-owner), and members join by invitation",
            ))
        }
        (SignupPolicy::InviteOnly, None) => {
            return Err(ApiError::forbidden(
                ErrorCode::SignupInvitationRequired,
                "signup on this control plane needs a signup invitation from its operator \
                 (send it as signup_invitation)",
            ))
        }
        (SignupPolicy::InviteOnly, Some(text)) => Some(text),
        (SignupPolicy::Open, _) => None,
    };
    let email = normalise_email(&req.email)?;
    check_password(&req.password)?;
    let account_name = account_name(&req.account_name)?;
    let invalid_invitation = |_| {
        ApiError::bad_request(
            ErrorCode::InvalidToken,
            "this signup invitation is not valid (unknown, used or expired); ask the operator \
             for a new one",
        )
    };
    {
        let mut client = state.pool.get().await?;
        if let Some(text) = invitation {
            signup::check_invitation(&**client, text)
                .await
                .map_err(invalid_invitation)?;
        }
        if let Err(refused) = admission::reserve(
            &mut client,
            admission::SIGNUP_PER_ADDRESS,
            &admission::address_key(meta.ip),
        )
        .await?
        {
            return Err(ApiError::too_many_of(
                ErrorCode::TooManySignups,
                "too many signups from this address; try again later",
                refused.retry_after_secs,
            ));
        }
    }
    let hash = new_password_hash(&state.hashing, req.password).await?;

    let mut client = state.pool.get().await?;
    let mut tx = client.transaction().await?;
    let Some(NewAccount {
        account_id,
        user_id,
    }) = signup::insert_account_with_owner(&mut tx, &email, &account_name, &hash).await?
    else {
        return Err(ApiError::conflict(
            ErrorCode::EmailTaken,
            "an account with this email already exists; sign in instead",
        ));
    };
    if let Some(text) = invitation {
        signup::redeem_invitation(&tx, text, account_id)
            .await
            .map_err(invalid_invitation)?;
    }
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
            action: "account.created",
            target: Some(("account", account_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "owner_id": user_id.to_string(),
                "signup": state.signup.as_str(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    let body = SignupResponse {
        account: AccountView {
            id: account_id,
            name: account_name,
        },
        user: UserView {
            id: user_id,
            email,
            role: Role::Owner.as_str().into(),
            account_id,
        },
    };
    Ok(with_cookie(
        (StatusCode::CREATED, Json(body)).into_response(),
        session_cookie(&cookie, SESSION_IDLE_DAYS * 86_400),
    ))
}

/// Signs in with email and password; sets the session cookie.
#[utoipa::path(post, path = "/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse, description = "signed in; session cookie set"),
              (status = 401, body = ErrorBody, description = "email or password is incorrect"),
              (status = 403, body = ErrorBody, description = "the account may not be used from this address, or requires single sign-on (sso_required)"),
              (status = 429, body = ErrorBody, description = "too many failed attempts")))]
pub async fn login(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<LoginRequest>,
) -> Result<Response, ApiError> {
    sign_in(state, meta, req, Step::Session).await
}

/// Checks email and password like `POST /v1/auth/login` (same throttle, same audit of a
/// failure) and, for a user with security keys, answers a challenge for them; the assertion
/// then goes to `POST /v1/auth/login` as `webauthn`, with the password again.
#[utoipa::path(post, path = "/v1/auth/login/webauthn", tag = "auth", request_body = PasswordStep,
    responses((status = 200, body = webauthn::SignInCeremony, description = "options for navigator.credentials.get()"),
              (status = 401, body = ErrorBody, description = "email or password is incorrect"),
              (status = 403, body = ErrorBody, description = "the account may not be used from this address"),
              (status = 409, body = ErrorBody, description = "this user has no security key"),
              (status = 429, body = ErrorBody, description = "too many failed attempts")))]
pub async fn login_webauthn(
    State(state): State<AppState>,
    meta: ClientMeta,
    JsonBody(req): JsonBody<PasswordStep>,
) -> Result<Response, ApiError> {
    let req = LoginRequest {
        email: req.email,
        password: req.password,
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    sign_in(state, meta, req, Step::KeyChallenge).await
}

/// What a checked password leads to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A session, once any second factor is proven.
    Session,
    /// A security key challenge, for the second factor.
    KeyChallenge,
}

async fn sign_in(
    state: AppState,
    meta: ClientMeta,
    req: LoginRequest,
    step: Step,
) -> Result<Response, ApiError> {
    let mut client = state.pool.get().await?;
    login_throttle::check_ip(&**client, meta.ip).await?;
    let email = req.email.trim().to_owned();
    let user = client
        .query_opt(
            "SELECT u.id, u.account_id, u.email, u.password_hash, u.role, \
                    u.totp_enabled_at IS NOT NULL, a.ip_allowlist, \
                    EXISTS (SELECT 1 FROM webauthn_credentials w WHERE w.user_id = u.id) AS has_keys, \
                    a.require_webauthn, \
                    COALESCE(s.require_sso, false) AS require_sso, s.slug AS sso_slug \
             FROM users u JOIN accounts a ON a.id = u.account_id \
             LEFT JOIN account_sso s ON s.account_id = u.account_id \
             WHERE lower(u.email) = lower($1)",
            &[&email],
        )
        .await?;
    let email_hash = state.keys.keyed_input_hash(email.to_lowercase().as_bytes());
    // Reserved before the password is checked, atomically per address and account.
    let reservation = login_throttle::reserve(
        &mut client,
        meta.ip,
        user.as_ref().map(|row| row.get(1)),
        &email_hash,
    )
    .await?;
    // The connection goes back to the pool while Argon2 runs: slow hashes must not hold
    // the connections every other route and the agent gateway need.
    drop(client);
    let stored: Option<String> = user.as_ref().map(|row| row.get(3));
    let password = req.password.clone();
    let verdict = state
        .hashing
        .run(move || match stored {
            // A member single sign-on created has no password (`!sso`): the same time is
            // spent, so the answer's timing does not tell such members apart.
            Some(stored) if stored.starts_with('!') => {
                passwords::verify_dummy(&password);
                Verdict::Mismatch
            }
            Some(stored) => passwords::verify(&password, &stored),
            None => {
                passwords::verify_dummy(&password);
                Verdict::Mismatch
            }
        })
        .await
        .map_err(|e| ApiError::internal(&e.to_string()))?;

    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let (user, rehash) = match (user, verdict) {
        (Some(user), Verdict::Match { rehash }) => (user, rehash),
        (user, _) => {
            let failed = FailedLogin {
                email_hash: &email_hash,
                account_id: user.as_ref().map(|u| u.get(1)),
                user: user.as_ref().map(|u| u.get::<_, Uuid>(0)),
                input: format!("{email}\u{0}{}", req.password),
                factor: "password",
            };
            let answer = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::InvalidCredentials,
                "email or password is incorrect",
            );
            return Err(refuse_login(&state, tx, &meta, failed, answer).await);
        }
    };
    let user_id: Uuid = user.get(0);
    let account_id: Uuid = user.get(1);
    let email: String = user.get(2);
    let role: String = user.get(4);
    // The account's networks: checked once the password is known good, so that nobody learns
    // more than a correct password would have told them anyway; the attempt still counts.
    let networks: Vec<String> = user.get("ip_allowlist");
    if !allowlist::permits(&allowlist::stored(&networks), meta.ip) {
        let failed = FailedLogin {
            email_hash: &email_hash,
            account_id: Some(account_id),
            user: Some(user_id),
            input: format!("{email}\u{0}{}", req.password),
            factor: "network",
        };
        let answer = ApiError::forbidden(
            ErrorCode::IpNotAllowed,
            format!("this account may not be used from {}", meta.ip),
        );
        return Err(refuse_login(&state, tx, &meta, failed, answer).await);
    }
    // The account signs in through its identity provider: a member's password no longer
    // opens it. Owners keep theirs as the way in when the provider is down, but only with a
    // second factor, and the sign-in is audited as such.
    let break_glass = user.get::<_, bool>("require_sso");
    if break_glass && (role != Role::Owner.as_str() || !user.get::<_, bool>(5)) {
        let slug: Option<String> = user.get("sso_slug");
        let failed = FailedLogin {
            email_hash: &email_hash,
            account_id: Some(account_id),
            user: Some(user_id),
            input: format!("{email}\u{0}{}", req.password),
            factor: "sso_required",
        };
        let message = if role == Role::Owner.as_str() {
            "this account requires single sign-on: an owner signs in with a password only \
             with a second factor set up; sign in through the identity provider"
                .to_owned()
        } else {
            format!(
                "this account requires single sign-on: sign in through your identity provider at /ui/sso?org={}",
                slug.unwrap_or_default()
            )
        };
        let answer = ApiError::forbidden(ErrorCode::SsoRequired, message);
        return Err(refuse_login(&state, tx, &meta, failed, answer).await);
    }
    let mut factor = None;
    let mut key_used = None;
    let has_totp: bool = user.get(5);
    let has_keys: bool = user.get("has_keys");
    if step == Step::KeyChallenge {
        // A correct password, not a guess: it does not count.
        login_throttle::release(&*tx, reservation).await?;
        let ceremony = webauthn::open_sign_in(&tx, &state, user_id, has_totp).await?;
        tx.commit().await?;
        return match ceremony {
            Some(ceremony) => Ok(Json(ceremony).into_response()),
            None => Err(ApiError::conflict(
                ErrorCode::NoSecurityKeys,
                "this user has no security key registered",
            )),
        };
    }
    if has_keys && user.get::<_, bool>("require_webauthn") && req.totp_code.is_some() {
        // The account wants a key of members who have one: a code is not a guess, but it is
        // not accepted either.
        login_throttle::release(&*tx, reservation).await?;
        tx.commit().await?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::WebauthnRequired,
            "this account requires a security key: sign in with your key (or a recovery code)",
        ));
    }
    let second_factor_given =
        req.totp_code.is_some() || req.recovery_code.is_some() || req.webauthn.is_some();
    if (has_totp || has_keys) && !second_factor_given {
        // The first step of a two-step sign-in, not a wrong guess: it does not count.
        login_throttle::release(&*tx, reservation).await?;
        tx.commit().await?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::MfaRequired,
            "this user signs in with a second factor: send totp_code (or recovery_code), or a \
             security key's answer as webauthn (its challenge from POST /v1/auth/login/webauthn)",
        ));
    }
    // A key's answer is checked whenever the user has a second factor: a key removed since
    // its challenge is refused as such.
    if let (true, Some(assertion)) = (has_totp || has_keys, &req.webauthn) {
        match webauthn::check_assertion(&tx, &state, &meta, user_id, account_id, assertion).await? {
            Ok(key) => {
                factor = Some(mfa::SecondFactor::Webauthn);
                key_used = Some(key);
            }
            Err(refusal) => {
                let failed = FailedLogin {
                    email_hash: &email_hash,
                    account_id: Some(account_id),
                    user: Some(user_id),
                    input: format!("{email}\u{0}{}", assertion.challenge_id),
                    factor: "webauthn",
                };
                let answer = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    match refusal {
                        webauthn::Refusal::Challenge => ErrorCode::InvalidWebauthnChallenge,
                        _ => ErrorCode::WebauthnRefused,
                    },
                    refusal.message(),
                );
                return Err(refuse_login(&state, tx, &meta, failed, answer).await);
            }
        }
    } else if has_totp || has_keys {
        let key_required = has_keys && user.get::<_, bool>("require_webauthn");
        let (code, accept) = match (&req.totp_code, &req.recovery_code) {
            (_, Some(recovery)) if key_required => (recovery.as_str(), mfa::Accept::RecoveryOnly),
            (_, Some(recovery)) => (recovery.as_str(), mfa::Accept::TotpOrRecovery),
            (Some(totp), None) => (totp.as_str(), mfa::Accept::TotpOnly),
            (None, None) => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::MfaRequired,
                    "this user signs in with a second factor: send totp_code (or recovery_code)",
                ))
            }
        };
        factor = mfa::consume_code(&tx, &state.keys, user_id, code, accept).await?;
        if factor.is_none() {
            let failed = FailedLogin {
                email_hash: &email_hash,
                account_id: Some(account_id),
                user: Some(user_id),
                input: format!("{email}\u{0}{code}"),
                factor: "mfa",
            };
            let answer = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::InvalidMfaCode,
                "the code is wrong, expired or already used",
            );
            return Err(refuse_login(&state, tx, &meta, failed, answer).await);
        }
    }
    if rehash {
        let password = req.password;
        let new_hash = state
            .hashing
            .run(move || passwords::hash(&password))
            .await
            .map_err(|e| ApiError::internal(&e.to_string()))?;
        tx.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1",
            &[&user_id, &new_hash],
        )
        .await?;
    }
    let (session_id, cookie) = create_session(&tx, user_id, &meta).await?;
    login_throttle::release(&*tx, reservation).await?;
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
            action: "user.logged_in",
            target: Some(("session", session_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "method": "password",
                "mfaUsed": factor.is_some(),
                "mfa_method": factor.map(|f| f.as_str()),
                "second_factor": factor.map(|f| f.as_str()),
                "webauthn_key": key_used.map(|k: Uuid| k.to_string()),
                "password_rehashed": rehash,
                "break_glass": break_glass,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    let body = LoginResponse {
        user: UserView {
            id: user_id,
            email,
            role,
            account_id,
        },
        session_id,
    };
    Ok(with_cookie(
        Json(body).into_response(),
        session_cookie(&cookie, SESSION_IDLE_DAYS * 86_400),
    ))
}

/// Who failed to sign in, and with what: only keyed hashes of what was typed are kept.
struct FailedLogin<'a> {
    email_hash: &'a str,
    account_id: Option<Uuid>,
    user: Option<Uuid>,
    /// What was typed (email and password, or email and code); hashed before it is stored.
    input: String,
    /// `password`, `mfa`, `network` or `sso_required`.
    factor: &'static str,
}

/// Audits a failed sign-in (its throttle reservation stays as the failure), commits, and
/// gives back the answer to send.
async fn refuse_login(
    state: &AppState,
    tx: deadpool_postgres::Transaction<'_>,
    meta: &ClientMeta,
    failed: FailedLogin<'_>,
    answer: ApiError,
) -> ApiError {
    let recorded = audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: failed.account_id,
            actor: Actor::Anonymous,
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.login_failed",
            target: failed.user.map(|u| ("user", u)),
            outcome: Outcome::Failure,
            metadata: json!({
                "email_hash": failed.email_hash,
                "input_hash": state.keys.keyed_input_hash(failed.input.as_bytes()),
                "failed_factor": failed.factor,
            }),
        },
    )
    .await;
    match recorded {
        Ok(()) => match tx.commit().await {
            Ok(()) => answer,
            Err(e) => e.into(),
        },
        Err(e) => e.into(),
    }
}

async fn revoke_sessions(
    state: &AppState,
    principal: &Principal,
    meta: &ClientMeta,
    which: Option<Uuid>,
    action: &'static str,
) -> Result<u64, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let revoked = tx
        .execute(
            "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL \
             AND ($2::uuid IS NULL OR id = $2)",
            &[&principal.user_id, &which],
        )
        .await?;
    if revoked == 0 {
        return Err(ApiError::not_found("session"));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(principal.account_id),
            actor: principal.actor(),
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action,
            target: which.map(|id| ("session", id)),
            outcome: Outcome::Success,
            metadata: json!({ "sessions_revoked": revoked }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(revoked)
}

pub(super) fn signed_out() -> Response {
    with_cookie(
        StatusCode::NO_CONTENT.into_response(),
        session_cookie("", 0),
    )
}

/// Signs out the current session.
#[utoipa::path(post, path = "/v1/auth/logout", tag = "auth",
    responses((status = 204, description = "signed out; cookie cleared"),
              (status = 401, body = ErrorBody, description = "not signed in")))]
pub async fn logout(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    revoke_sessions(
        &state,
        &principal,
        &meta,
        principal.session_id(),
        "user.logged_out",
    )
    .await?;
    Ok(signed_out())
}

/// Lists the caller's active sessions.
#[utoipa::path(get, path = "/v1/auth/sessions", tag = "auth",
    responses((status = 200, body = SessionList), (status = 401, body = ErrorBody)))]
pub async fn list_sessions(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<SessionList>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, ip, user_agent, created_at, last_seen_at FROM sessions \
             WHERE user_id = $1 AND revoked_at IS NULL \
             AND last_seen_at > now() - make_interval(days => $2) ORDER BY last_seen_at DESC",
            &[&principal.user_id, &(SESSION_IDLE_DAYS as i32)],
        )
        .await?;
    let current = principal.session_id();
    Ok(Json(SessionList {
        sessions: rows
            .iter()
            .map(|r| SessionView {
                id: r.get(0),
                ip: r.get(1),
                user_agent: r.get(2),
                created_at: r.get(3),
                last_seen_at: r.get(4),
                current: Some(r.get::<_, Uuid>(0)) == current,
            })
            .collect(),
    }))
}

/// Signs out one of the caller's sessions.
#[utoipa::path(delete, path = "/v1/auth/sessions/{id}", tag = "auth",
    params(("id" = Uuid, Path, description = "session id")),
    responses((status = 204, description = "session signed out"),
              (status = 404, body = ErrorBody, description = "no such active session of yours")))]
pub async fn revoke_session(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Response, ApiError> {
    revoke_sessions(&state, &principal, &meta, Some(id), "session.revoked").await?;
    if Some(id) == principal.session_id() {
        return Ok(signed_out());
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Signs out every session of the caller, the current one included.
#[utoipa::path(post, path = "/v1/auth/sessions/sign-out-everywhere", tag = "auth",
    responses((status = 204, description = "all sessions signed out; cookie cleared")))]
pub async fn sign_out_everywhere(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    revoke_sessions(&state, &principal, &meta, None, "session.revoked_all").await?;
    Ok(signed_out())
}

#[derive(Serialize, ToSchema)]
pub struct Me {
    pub user: UserView,
    /// A second factor is on: TOTP or at least one security key.
    pub mfa_enabled: bool,
    /// TOTP in particular is on.
    pub totp_enabled: bool,
    /// The account requires MFA and this user has not set it up yet.
    pub mfa_setup_required: bool,
    /// Set when the caller is an API key (`user` is then the key's creator).
    pub api_key: Option<MeApiKey>,
    /// Every permission the member's role (built-in or custom) grants.
    pub permissions: Vec<String>,
    /// The resources the member's routes reach; absent: the whole account.
    pub resource_scope: Option<crate::identity::reach::ResourceScope>,
}

#[derive(Serialize, ToSchema)]
pub struct MeApiKey {
    pub id: Uuid,
    pub scopes: Vec<String>,
}

/// Who the caller is: the signed-in user, or an API key and the user who created it.
#[utoipa::path(get, path = "/v1/auth/me", tag = "auth",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Me>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_one(
            "SELECT user_has_second_factor(id), totp_enabled_at IS NOT NULL FROM users \
             WHERE id = $1",
            &[&principal.user_id],
        )
        .await?;
    Ok(Json(Me {
        user: UserView {
            id: principal.user_id,
            email: principal.email.clone(),
            role: principal.role_name().into(),
            account_id: principal.account_id,
        },
        mfa_enabled: row.get(0),
        totp_enabled: row.get(1),
        permissions: crate::identity::auth::Scope::ALL
            .into_iter()
            .filter(|s| principal.grants(*s))
            .map(|s| s.as_str().to_owned())
            .collect(),
        resource_scope: principal.reach.0.clone(),
        mfa_setup_required: principal.mfa_setup_required,
        api_key: match &principal.credential {
            crate::identity::auth::Credential::ApiKey { key_id, scopes } => Some(MeApiKey {
                id: *key_id,
                scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
            }),
            crate::identity::auth::Credential::Session { .. } => None,
        },
    }))
}

/// How recent a sign-in must be to add a way in (a security key, an identity at the provider)
/// or take one away.
pub const RECENT_SIGN_IN_MINUTES: i32 = 10;

/// Refuses unless the caller's session began within [`RECENT_SIGN_IN_MINUTES`]: a stolen
/// session cookie, or a script running in the page, must not be able to plant a lasting way
/// in for its holder, nor remove the owner's.
pub async fn require_recent_sign_in(
    pool: &deadpool_postgres::Pool,
    principal: &Principal,
) -> Result<(), ApiError> {
    let Some(session) = principal.session_id() else {
        return Err(ApiError::forbidden(
            ErrorCode::SessionRequired,
            "only a signed-in user may do this, not an API key",
        ));
    };
    let recent: bool = pool
        .get()
        .await?
        .query_opt(
            "SELECT 1 FROM sessions WHERE id = $1 \
             AND created_at > now() - make_interval(mins => $2)",
            &[&session, &RECENT_SIGN_IN_MINUTES],
        )
        .await?
        .is_some();
    if recent {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            ErrorCode::RecentSignInRequired,
            format!(
                "sign in again first: this needs a sign-in from the last {RECENT_SIGN_IN_MINUTES} minutes"
            ),
        ))
    }
}
