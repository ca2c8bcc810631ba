//! Security keys (WebAuthn) as a second factor: register several per user with a name, list,
//! rename and remove them, and the check sign-in runs on a key's assertion.
//!
//! A ceremony's state (the challenge, and for a sign-in the keys allowed and their counters)
//! stays in `webauthn_ceremonies`, never in the browser: it is single-use, expires after
//! [`CEREMONY_SECS`], and belongs to the session (registration) or the user whose password was
//! checked (sign-in) that started it, so a challenge from another ceremony is refused.

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;
use webauthn_rs::prelude::{
    Passkey, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, WebauthnError,
};

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path};
use super::{actor_event, mfa, AppState};
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::auth::Principal;
use crate::identity::webauthn::{
    self as keys, CEREMONY_SECS, MAX_CREDENTIAL_BYTES, MAX_KEYS_PER_USER, MAX_OPEN_CEREMONIES,
};

/// The options for the browser's `navigator.credentials.create()` or `.get()`.
#[derive(Serialize, ToSchema)]
pub struct Ceremony {
    /// Send it back with the authenticator's answer.
    pub challenge_id: Uuid,
    /// `{"publicKey": {…}}` as the WebAuthn specification's JSON form (binary fields in
    /// base64url).
    #[schema(value_type = Object)]
    pub options: serde_json::Value,
}

/// A sign-in's key challenge, after the password was checked.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SignInCeremony {
    pub challenge_id: Uuid,
    /// `{"publicKey": {…}}` for `navigator.credentials.get()`.
    #[schema(value_type = Object)]
    pub options: serde_json::Value,
    /// Whether the user also has TOTP, which they may use instead.
    pub totp_enabled: bool,
}

/// A security key's answer to a sign-in challenge.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// From `POST /v1/auth/login/webauthn`.
    pub challenge_id: Uuid,
    /// The `PublicKeyCredential` from `navigator.credentials.get()`, in its JSON form
    /// (binary fields in base64url).
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterKey {
    /// From `POST /v1/auth/mfa/webauthn/registrations`.
    pub challenge_id: Uuid,
    /// 1 to 64 characters, unique among the user's keys.
    pub name: String,
    /// The `PublicKeyCredential` from `navigator.credentials.create()`, in its JSON form.
    #[schema(value_type = Object)]
    pub credential: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenameKey {
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct RegisteredKey {
    pub key: KeyView,
    /// One-time recovery codes, when this is the user's first second factor (otherwise
    /// `null`: the codes they have stay valid). Shown once; stored hashed.
    pub recovery_codes: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

fn unavailable(e: keys::Unavailable) -> ApiError {
    ApiError::conflict(ErrorCode::WebauthnUnavailable, e.to_string())
}

fn invalid_name() -> ApiError {
    ApiError::unprocessable(
        ErrorCode::InvalidName,
        format!(
            "a key's name is 1 to {} characters, without control characters",
            keys::MAX_NAME_CHARS
        ),
    )
}

fn stale_challenge() -> ApiError {
    ApiError::bad_request(
        ErrorCode::InvalidWebauthnChallenge,
        "this challenge is unknown, already used, expired or not yours; start again",
    )
}

fn stored(what: &str) -> ApiError {
    ApiError::internal(&format!("stored {what} cannot be read"))
}

/// Opens a ceremony for `user_id`: ends their expired ones and, past the limit, their oldest.
async fn open_ceremony(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
    purpose: &str,
    session_id: Option<Uuid>,
    state: serde_json::Value,
) -> Result<Uuid, ApiError> {
    tx.execute(
        "DELETE FROM webauthn_ceremonies WHERE user_id = $1 AND (expires_at < now() OR id IN \
         (SELECT id FROM webauthn_ceremonies WHERE user_id = $1 \
          ORDER BY created_at DESC OFFSET $2))",
        &[&user_id, &(MAX_OPEN_CEREMONIES - 1)],
    )
    .await?;
    let id = Uuid::new_v4();
    tx.execute(
        "INSERT INTO webauthn_ceremonies (id, user_id, purpose, session_id, state, expires_at) \
         VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))",
        &[
            &id,
            &user_id,
            &purpose,
            &session_id,
            &state,
            &(CEREMONY_SECS as f64),
        ],
    )
    .await?;
    Ok(id)
}

/// Takes a ceremony (it is gone whatever happens next): its state, if it is this user's,
/// for `purpose` (and, for a registration, this session's) and not expired.
async fn take_ceremony(
    tx: &tokio_postgres::Transaction<'_>,
    id: Uuid,
    user_id: Uuid,
    purpose: &str,
    session_id: Option<Uuid>,
) -> Result<Option<serde_json::Value>, ApiError> {
    let row = tx
        .query_opt(
            "DELETE FROM webauthn_ceremonies WHERE id = $1 AND user_id = $2 AND purpose = $3 \
             AND session_id IS NOT DISTINCT FROM $4 RETURNING state, expires_at > now()",
            &[&id, &user_id, &purpose, &session_id],
        )
        .await?;
    Ok(row.filter(|r| r.get::<_, bool>(1)).map(|r| r.get(0)))
}

/// The user's keys as webauthn-rs records them.
async fn security_keys(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
) -> Result<Vec<Passkey>, ApiError> {
    let rows = tx
        .query(
            "SELECT credential FROM webauthn_credentials WHERE user_id = $1 ORDER BY created_at",
            &[&user_id],
        )
        .await?;
    rows.iter()
        .map(|r| serde_json::from_value(r.get(0)).map_err(|_| stored("security key")))
        .collect()
}

/// Starts registering a security key (or a platform authenticator) for the signed-in user.
#[utoipa::path(post, path = "/v1/auth/mfa/webauthn/registrations", tag = "auth",
    responses((status = 201, body = Ceremony, description = "options for navigator.credentials.create()"),
              (status = 409, body = ErrorBody, description = "ten keys already, or the public URL is an IP address")))]
pub async fn start_registration(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<(StatusCode, Json<Ceremony>), ApiError> {
    super::auth_routes::require_recent_sign_in(&state.pool, &principal).await?;
    let rp = keys::relying_party(&state.public_url).map_err(unavailable)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let existing = security_keys(&tx, principal.user_id).await?;
    if existing.len() as i64 >= MAX_KEYS_PER_USER {
        return Err(too_many_keys());
    }
    // The user's keys are excluded: the browser says so instead of registering one twice.
    let exclude = existing.iter().map(|k| k.cred_id().clone()).collect();
    let (options, registration) = rp
        .start_passkey_registration(
            principal.user_id,
            &principal.email,
            &principal.email,
            Some(exclude),
        )
        .map_err(|e| ApiError::internal(&format!("webauthn registration options: {e}")))?;
    let saved = serde_json::to_value(&registration).map_err(|_| stored("registration"))?;
    let challenge_id = open_ceremony(
        &tx,
        principal.user_id,
        "register",
        principal.session_id(),
        saved,
    )
    .await?;
    tx.commit().await?;
    let options = serde_json::to_value(&options).map_err(|_| stored("options"))?;
    Ok((
        StatusCode::CREATED,
        Json(Ceremony {
            challenge_id,
            options,
        }),
    ))
}

fn too_many_keys() -> ApiError {
    ApiError::conflict(
        ErrorCode::TooManyKeys,
        format!("a user may register at most {MAX_KEYS_PER_USER} security keys; remove one first"),
    )
}

/// Bounds a credential a browser sent before it is parsed.
fn bounded(value: &serde_json::Value) -> Result<(), ApiError> {
    if value.to_string().len() > MAX_CREDENTIAL_BYTES {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidField,
            format!("credential exceeds {MAX_CREDENTIAL_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Finishes a registration with the authenticator's answer: the key is then accepted at
/// sign-in. The first second factor of a user also hands out recovery codes, once.
#[utoipa::path(post, path = "/v1/auth/mfa/webauthn/keys", tag = "auth", request_body = RegisterKey,
    responses((status = 201, body = RegisteredKey),
              (status = 400, body = ErrorBody, description = "stale or foreign challenge, or the authenticator's answer does not verify"),
              (status = 409, body = ErrorBody, description = "name or key already registered, or ten keys already"),
              (status = 422, body = ErrorBody, description = "invalid name")))]
pub async fn register(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<RegisterKey>,
) -> Result<(StatusCode, Json<RegisteredKey>), ApiError> {
    let rp = keys::relying_party(&state.public_url).map_err(unavailable)?;
    let name = keys::key_name(&req.name).ok_or_else(invalid_name)?;
    bounded(&req.credential)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Taken before anything else is checked: a challenge is good for one answer only.
    let saved = take_ceremony(
        &tx,
        req.challenge_id,
        principal.user_id,
        "register",
        principal.session_id(),
    )
    .await?;
    let Some(saved) = saved else {
        tx.commit().await?;
        return Err(stale_challenge());
    };
    let registration: PasskeyRegistration =
        serde_json::from_value(saved).map_err(|_| stored("registration"))?;
    let refused = |why: String| {
        ApiError::bad_request(
            ErrorCode::WebauthnRefused,
            format!("the authenticator's answer was refused: {why}"),
        )
    };
    let credential: RegisterPublicKeyCredential = match serde_json::from_value(req.credential) {
        Ok(c) => c,
        Err(e) => {
            tx.commit().await?;
            return Err(refused(format!("not a PublicKeyCredential ({e})")));
        }
    };
    let key = match rp.finish_passkey_registration(&credential, &registration) {
        Ok(key) => key,
        Err(e) => {
            tx.commit().await?;
            return Err(refused(e.to_string()));
        }
    };
    // Serialised so that two registrations of one user cannot pass the limit together.
    tx.execute(
        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
        &[&principal.user_id],
    )
    .await?;
    let had_factor: bool = tx
        .query_one("SELECT user_has_second_factor($1)", &[&principal.user_id])
        .await?
        .get(0);
    let count: i64 = tx
        .query_one(
            "SELECT count(*) FROM webauthn_credentials WHERE user_id = $1",
            &[&principal.user_id],
        )
        .await?
        .get(0);
    if count >= MAX_KEYS_PER_USER {
        return Err(too_many_keys());
    }
    let id = Uuid::new_v4();
    let record = serde_json::to_value(&key).map_err(|_| stored("security key"))?;
    let cred_id: &[u8] = key.cred_id().as_ref();
    let inserted = tx
        .query_opt(
            "INSERT INTO webauthn_credentials (id, user_id, name, credential_id, credential) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING created_at",
            &[&id, &principal.user_id, &name, &cred_id, &record],
        )
        .await?;
    let Some(row) = inserted else {
        return Err(ApiError::conflict(
            ErrorCode::KeyNameTaken,
            "you already have a key with this name, or this key is registered already",
        ));
    };
    let recovery_codes = if had_factor {
        None
    } else {
        Some(mfa::issue_recovery_codes(&tx, principal.user_id).await?)
    };
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "webauthn.registered",
            ("webauthn_key", id),
            json!({"name": name, "first_factor_of_user": !had_factor}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(RegisteredKey {
            key: KeyView {
                id,
                name,
                created_at: row.get(0),
                last_used_at: None,
            },
            recovery_codes,
        }),
    ))
}

/// The signed-in user's security keys.
#[utoipa::path(get, path = "/v1/auth/mfa/webauthn/keys", tag = "auth",
    responses((status = 200, body = KeyList)))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<KeyList>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            "SELECT id, name, created_at, last_used_at FROM webauthn_credentials \
             WHERE user_id = $1 ORDER BY created_at, id",
            &[&principal.user_id],
        )
        .await?;
    Ok(Json(KeyList {
        keys: rows
            .iter()
            .map(|r| KeyView {
                id: r.get(0),
                name: r.get(1),
                created_at: r.get(2),
                last_used_at: r.get(3),
            })
            .collect(),
    }))
}

/// Renames one of the signed-in user's keys.
#[utoipa::path(patch, path = "/v1/auth/mfa/webauthn/keys/{id}", tag = "auth", request_body = RenameKey,
    params(("id" = Uuid, Path, description = "key id")),
    responses((status = 200, body = KeyView),
              (status = 404, body = ErrorBody, description = "no such key of yours"),
              (status = 409, body = ErrorBody, description = "you have a key with this name"),
              (status = 422, body = ErrorBody, description = "invalid name")))]
pub async fn rename(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    JsonBody(req): JsonBody<RenameKey>,
) -> Result<Json<KeyView>, ApiError> {
    let name = keys::key_name(&req.name).ok_or_else(invalid_name)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let taken = tx
        .query_opt(
            "SELECT 1 FROM webauthn_credentials WHERE user_id = $1 AND name = $2 AND id <> $3",
            &[&principal.user_id, &name, &id],
        )
        .await?;
    if taken.is_some() {
        return Err(ApiError::conflict(
            ErrorCode::KeyNameTaken,
            "you already have a key with this name",
        ));
    }
    let row = tx
        .query_opt(
            "UPDATE webauthn_credentials SET name = $3 WHERE id = $1 AND user_id = $2 \
             RETURNING created_at, last_used_at",
            &[&id, &principal.user_id, &name],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("security key"))?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "webauthn.renamed",
            ("webauthn_key", id),
            json!({"name": name}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(KeyView {
        id,
        name,
        created_at: row.get(0),
        last_used_at: row.get(1),
    }))
}

/// Removes one of the signed-in user's keys: it is refused at sign-in from then on. Refused
/// for the last second factor while the account requires one.
#[utoipa::path(delete, path = "/v1/auth/mfa/webauthn/keys/{id}", tag = "auth",
    params(("id" = Uuid, Path, description = "key id")),
    responses((status = 204, description = "removed"),
              (status = 404, body = ErrorBody, description = "no such key of yours"),
              (status = 409, body = ErrorBody, description = "the account requires a second factor and this is your last")))]
pub async fn remove(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    super::auth_routes::require_recent_sign_in(&state.pool, &principal).await?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT 1 FROM users WHERE id = $1 FOR UPDATE",
        &[&principal.user_id],
    )
    .await?;
    let name: String = tx
        .query_opt(
            "DELETE FROM webauthn_credentials WHERE id = $1 AND user_id = $2 RETURNING name",
            &[&id, &principal.user_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("security key"))?
        .get(0);
    let row = tx
        .query_one(
            "SELECT user_has_second_factor(u.id), a.require_mfa, a.require_webauthn, \
                    EXISTS (SELECT 1 FROM webauthn_credentials w WHERE w.user_id = u.id) \
             FROM users u \
             JOIN accounts a ON a.id = u.account_id WHERE u.id = $1",
            &[&principal.user_id],
        )
        .await?;
    let (still_has_factor, required, keys_required, still_has_key): (bool, bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if keys_required && !still_has_key {
        // Dropping the transaction keeps the key.
        return Err(ApiError::conflict(
            ErrorCode::MfaRequiredByAccount,
            "this account requires a security key of every member and this is your last; \
             register another one first",
        ));
    }
    if !still_has_factor {
        if required {
            // Dropping the transaction keeps the key.
            return Err(ApiError::conflict(
                ErrorCode::MfaRequiredByAccount,
                "this account requires a second factor of every member and this is your last; \
                 set up another one first",
            ));
        }
        // No second factor left: the recovery codes have nothing to stand in for.
        tx.execute(
            "DELETE FROM mfa_recovery_codes WHERE user_id = $1",
            &[&principal.user_id],
        )
        .await?;
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "webauthn.removed",
            ("webauthn_key", id),
            json!({"name": name, "second_factor_left": still_has_factor}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A sign-in's key challenge for a user whose password was just checked (`None` when they
/// have no key), in the caller's transaction.
pub async fn open_sign_in(
    tx: &tokio_postgres::Transaction<'_>,
    state: &AppState,
    user_id: Uuid,
    totp_enabled: bool,
) -> Result<Option<SignInCeremony>, ApiError> {
    let registered = security_keys(tx, user_id).await?;
    if registered.is_empty() {
        return Ok(None);
    }
    let rp = keys::relying_party(&state.public_url).map_err(unavailable)?;
    let (options, authentication) = rp
        .start_passkey_authentication(&registered)
        .map_err(|e| ApiError::internal(&format!("webauthn sign-in options: {e}")))?;
    let saved = serde_json::to_value(&authentication).map_err(|_| stored("authentication"))?;
    let challenge_id = open_ceremony(tx, user_id, "sign_in", None, saved).await?;
    Ok(Some(SignInCeremony {
        challenge_id,
        options: serde_json::to_value(&options).map_err(|_| stored("options"))?,
        totp_enabled,
    }))
}

/// Why a key's assertion did not sign someone in.
#[derive(Debug)]
pub enum Refusal {
    /// Unknown, used, expired or another user's challenge.
    Challenge,
    /// Not a credential, not one of the user's keys (a removed one), or its signature,
    /// origin, user presence or verification does not hold.
    Assertion(String),
    /// The key's signature counter did not advance past the stored one: two authenticators
    /// hold the same key, one of them a copy.
    Cloned { key: Uuid, stored: u32, seen: u32 },
}

impl Refusal {
    pub fn message(&self) -> String {
        match self {
            Refusal::Challenge => {
                "this security key challenge is unknown, already used, expired or not yours; \
                 sign in again"
                    .into()
            }
            Refusal::Assertion(why) => format!("the security key was refused: {why}"),
            Refusal::Cloned { .. } => "the security key was refused: its signature counter \
                 went backwards, which a copied key does"
                .into(),
        }
    }
}

/// Checks a key's assertion for `user_id`'s sign-in, in the caller's transaction: the
/// challenge is taken (single use), the signature verified by webauthn-rs against the user's
/// current keys, and the counter checked against the stored one (locked, so two sign-ins
/// cannot both pass with the same value). A key suspected of being cloned is audited as
/// `webauthn.clone_suspected`. On success the key's counter and last use are stored and its
/// id is answered.
pub async fn check_assertion(
    tx: &tokio_postgres::Transaction<'_>,
    state: &AppState,
    meta: &ClientMeta,
    user_id: Uuid,
    account_id: Uuid,
    assertion: &Assertion,
) -> Result<Result<Uuid, Refusal>, ApiError> {
    let rp = keys::relying_party(&state.public_url).map_err(unavailable)?;
    let Some(saved) = take_ceremony(tx, assertion.challenge_id, user_id, "sign_in", None).await?
    else {
        return Ok(Err(Refusal::Challenge));
    };
    bounded(&assertion.credential)?;
    let authentication: PasskeyAuthentication =
        serde_json::from_value(saved).map_err(|_| stored("authentication"))?;
    let credential: PublicKeyCredential = match serde_json::from_value(assertion.credential.clone())
    {
        Ok(c) => c,
        Err(e) => {
            return Ok(Err(Refusal::Assertion(format!(
                "not a PublicKeyCredential ({e})"
            ))))
        }
    };
    // The key as it is stored now (it may have been removed, or used, since the challenge).
    let row = tx
        .query_opt(
            "SELECT id, credential, sign_count FROM webauthn_credentials \
             WHERE user_id = $1 AND credential_id = $2 FOR UPDATE",
            &[&user_id, &credential.raw_id],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Err(Refusal::Assertion(
            "it is not one of this user's keys".into(),
        )));
    };
    let key_id: Uuid = row.get(0);
    let mut key: Passkey =
        serde_json::from_value(row.get(1)).map_err(|_| stored("security key"))?;
    let stored_count = u32::try_from(row.get::<_, i64>(2)).unwrap_or(u32::MAX);
    let result = match rp.finish_passkey_authentication(&credential, &authentication) {
        Ok(result) => result,
        Err(WebauthnError::CredentialPossibleCompromise) => {
            let seen = counter_of(&credential).unwrap_or(0);
            return Ok(Err(suspect_clone(
                tx,
                state,
                meta,
                account_id,
                user_id,
                key_id,
                stored_count,
                seen,
            )
            .await?));
        }
        Err(e) => return Ok(Err(Refusal::Assertion(e.to_string()))),
    };
    if result.cred_id().as_ref() as &[u8] != credential.raw_id.as_slice() {
        return Ok(Err(Refusal::Assertion("credential mismatch".into())));
    }
    // The specification's counter rule (step 21 of verifying an assertion), against the
    // counter stored now rather than the one the challenge was issued with.
    let seen = result.counter();
    if (seen != 0 || stored_count != 0) && seen <= stored_count {
        return Ok(Err(suspect_clone(
            tx,
            state,
            meta,
            account_id,
            user_id,
            key_id,
            stored_count,
            seen,
        )
        .await?));
    }
    key.update_credential(&result);
    let record = serde_json::to_value(&key).map_err(|_| stored("security key"))?;
    tx.execute(
        "UPDATE webauthn_credentials SET credential = $2, sign_count = $3, last_used_at = now() \
         WHERE id = $1",
        &[&key_id, &record, &i64::from(seen)],
    )
    .await?;
    Ok(Ok(key_id))
}

/// The signature counter an assertion's authenticator data carries (bytes 33..37).
fn counter_of(credential: &PublicKeyCredential) -> Option<u32> {
    let data = &credential.response.authenticator_data;
    let bytes: [u8; 4] = data.get(33..37)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

#[allow(clippy::too_many_arguments)]
async fn suspect_clone(
    tx: &tokio_postgres::Transaction<'_>,
    state: &AppState,
    meta: &ClientMeta,
    account_id: Uuid,
    user_id: Uuid,
    key_id: Uuid,
    stored: u32,
    seen: u32,
) -> Result<Refusal, ApiError> {
    audit::append(
        tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(account_id),
            actor: Actor::Anonymous,
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "webauthn.clone_suspected",
            target: Some(("webauthn_key", key_id)),
            outcome: Outcome::Failure,
            metadata: json!({
                "user_id": user_id.to_string(),
                "stored_counter": stored,
                "presented_counter": seen,
            }),
        },
    )
    .await?;
    Ok(Refusal::Cloned {
        key: key_id,
        stored,
        seen,
    })
}
