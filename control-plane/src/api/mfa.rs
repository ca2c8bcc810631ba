//! TOTP multi-factor sign-in: enroll (secret sealed under the field key, shown once), confirm
//! with a code (which hands out one-time recovery codes), disable with a code, and the check
//! login runs for users who have it.

use axum::extract::State;
use axum::{Extension, Json};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::auth::Principal;
use crate::identity::totp;
use crate::secrets::field_crypto::FieldKeys;

/// The issuer name authenticator apps show.
const ISSUER: &str = "Sensei";

#[derive(Serialize, ToSchema)]
pub struct TotpEnrollment {
    /// Base32 secret, for typing in by hand. Shown once.
    pub secret: String,
    /// `otpauth://totp/…` for a QR code. Shown once.
    pub otpauth_uri: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpCode {
    /// The 6-digit code, or (to disable) a recovery code.
    pub code: String,
}

#[derive(Serialize, ToSchema)]
pub struct RecoveryCodes {
    /// One-time codes for when the authenticator is lost. Shown once; stored hashed.
    pub recovery_codes: Vec<String>,
}

/// Which codes [`consume_code`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    TotpOnly,
    TotpOrRecovery,
    /// An account that requires a security key takes no TOTP code from a member who has one,
    /// whichever field it comes in (a phishing proxy relays TOTP codes as easily as passwords).
    RecoveryOnly,
}

/// How a second factor was proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondFactor {
    Totp,
    RecoveryCode,
    /// A security key's assertion ([`super::webauthn`]).
    Webauthn,
}

impl SecondFactor {
    pub fn as_str(self) -> &'static str {
        match self {
            SecondFactor::Totp => "totp",
            SecondFactor::RecoveryCode => "recovery_code",
            SecondFactor::Webauthn => "webauthn",
        }
    }
}

fn recovery_hash(normalised: &str) -> Vec<u8> {
    Sha256::digest(normalised.as_bytes()).to_vec()
}

/// Checks a TOTP code (or, when `allow_recovery`, a recovery code) for a user with MFA
/// enabled, consuming it: the step is remembered and a recovery code is marked used, in the
/// caller's transaction. `None` when the code is wrong, replayed or used.
pub async fn consume_code(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &FieldKeys,
    user_id: Uuid,
    code: &str,
    accept: Accept,
) -> Result<Option<SecondFactor>, ApiError> {
    let row = tx
        .query_one(
            "SELECT totp_secret_ciphertext, totp_last_step FROM users WHERE id = $1 FOR UPDATE",
            &[&user_id],
        )
        .await?;
    // A user with only security keys has no TOTP secret; their recovery codes still count.
    let sealed = row
        .get::<_, Option<String>>(0)
        .filter(|_| accept != Accept::RecoveryOnly);
    if let Some(sealed) = sealed {
        let secret = keys.decrypt(&sealed).map_err(|_| {
            ApiError::internal("TOTP secret cannot be decrypted with the field keys")
        })?;
        let last_step: i64 = row.get(1);
        if let Some(step) = totp::verify(&secret, code, chrono::Utc::now().timestamp(), last_step) {
            tx.execute(
                "UPDATE users SET totp_last_step = $2 WHERE id = $1",
                &[&user_id, &step],
            )
            .await?;
            return Ok(Some(SecondFactor::Totp));
        }
    }
    if accept != Accept::TotpOnly {
        if let Some(normalised) = totp::normalise_recovery_code(code) {
            let used = tx
                .execute(
                    "UPDATE mfa_recovery_codes SET used_at = now() \
                     WHERE user_id = $1 AND code_hash = $2 AND used_at IS NULL",
                    &[&user_id, &recovery_hash(&normalised)],
                )
                .await?;
            if used == 1 {
                return Ok(Some(SecondFactor::RecoveryCode));
            }
        }
    }
    Ok(None)
}

/// New recovery codes for `user_id`, replacing any they had (only their hashes are stored);
/// answered once, to be shown once.
pub async fn issue_recovery_codes(
    tx: &tokio_postgres::Transaction<'_>,
    user_id: Uuid,
) -> Result<Vec<String>, ApiError> {
    tx.execute(
        "DELETE FROM mfa_recovery_codes WHERE user_id = $1",
        &[&user_id],
    )
    .await?;
    let codes: Vec<String> = (0..totp::RECOVERY_CODES)
        .map(|_| totp::generate_recovery_code())
        .collect();
    for code in &codes {
        let normalised = totp::normalise_recovery_code(code)
            .ok_or_else(|| ApiError::internal("generated recovery code is malformed"))?;
        tx.execute(
            "INSERT INTO mfa_recovery_codes (user_id, code_hash) VALUES ($1, $2)",
            &[&user_id, &recovery_hash(&normalised)],
        )
        .await?;
    }
    Ok(codes)
}

fn wrong_code() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidMfaCode,
        "the code is wrong, expired or already used",
    )
}

/// Starts TOTP enrollment: a new secret, pending until confirmed with a code from it.
#[utoipa::path(post, path = "/v1/auth/mfa/totp", tag = "auth",
    responses((status = 201, body = TotpEnrollment),
              (status = 409, body = ErrorBody, description = "TOTP is already on; disable it first")))]
pub async fn enroll(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
) -> Result<(StatusCode, Json<TotpEnrollment>), ApiError> {
    let secret = totp::generate_secret();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let updated = tx
        .execute(
            "UPDATE users SET totp_pending_ciphertext = $2 WHERE id = $1 AND totp_enabled_at IS NULL",
            &[&principal.user_id, &state.keys.encrypt(&secret)],
        )
        .await?;
    if updated == 0 {
        return Err(ApiError::conflict(
            ErrorCode::MfaAlreadyEnabled,
            "TOTP is already on for this user; disable it first to enroll a new authenticator",
        ));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "user.mfa_enrollment_started",
            ("user", principal.user_id),
            json!({"method": "totp"}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(TotpEnrollment {
            secret: totp::base32(&secret),
            otpauth_uri: totp::otpauth_uri(&secret, ISSUER, &principal.email),
        }),
    ))
}

/// Confirms enrollment with a current code; TOTP is then required at sign-in. Answers the
/// recovery codes, once.
#[utoipa::path(post, path = "/v1/auth/mfa/totp/confirm", tag = "auth", request_body = TotpCode,
    responses((status = 200, body = RecoveryCodes),
              (status = 401, body = ErrorBody, description = "wrong code"),
              (status = 409, body = ErrorBody, description = "no enrollment in progress")))]
pub async fn confirm(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<TotpCode>,
) -> Result<Json<RecoveryCodes>, ApiError> {
    let mut client = state.pool.get().await?;
    crate::identity::login_throttle::check_account(&**client, principal.account_id).await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT totp_pending_ciphertext, totp_last_step FROM users WHERE id = $1 FOR UPDATE",
            &[&principal.user_id],
        )
        .await?;
    let Some(sealed) = row.get::<_, Option<String>>(0) else {
        return Err(ApiError::conflict(
            ErrorCode::NoMfaEnrollment,
            "start with POST /v1/auth/mfa/totp",
        ));
    };
    let secret = state
        .keys
        .decrypt(&sealed)
        .map_err(|_| ApiError::internal("TOTP secret cannot be decrypted with the field keys"))?;
    let Some(step) = totp::verify(
        &secret,
        &req.code,
        chrono::Utc::now().timestamp(),
        row.get(1),
    ) else {
        drop(tx);
        let hash = state
            .keys
            .keyed_input_hash(principal.email.to_lowercase().as_bytes());
        crate::identity::login_throttle::record(
            &**client,
            meta.ip,
            Some(principal.account_id),
            &hash,
        )
        .await?;
        return Err(wrong_code());
    };
    tx.execute(
        "UPDATE users SET totp_secret_ciphertext = totp_pending_ciphertext, \
         totp_pending_ciphertext = NULL, totp_enabled_at = now(), totp_last_step = $2 WHERE id = $1",
        &[&principal.user_id, &step],
    )
    .await?;
    let codes = issue_recovery_codes(&tx, principal.user_id).await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "user.mfa_enabled",
            ("user", principal.user_id),
            json!({"method": "totp", "recovery_codes": codes.len()}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(RecoveryCodes {
        recovery_codes: codes,
    }))
}

/// Turns TOTP off, given a current code or a recovery code. Refused while the account
/// requires MFA.
#[utoipa::path(post, path = "/v1/auth/mfa/totp/disable", tag = "auth", request_body = TotpCode,
    responses((status = 204, description = "TOTP off; recovery codes deleted"),
              (status = 401, body = ErrorBody, description = "wrong code"),
              (status = 409, body = ErrorBody, description = "not enabled, or the account requires MFA")))]
pub async fn disable(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<TotpCode>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    crate::identity::login_throttle::check_account(&**client, principal.account_id).await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT u.totp_enabled_at IS NOT NULL, a.require_mfa, \
                    EXISTS (SELECT 1 FROM webauthn_credentials w WHERE w.user_id = u.id) \
             FROM users u JOIN accounts a ON a.id = u.account_id WHERE u.id = $1",
            &[&principal.user_id],
        )
        .await?;
    let (enabled, required, has_keys): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !enabled {
        return Err(ApiError::conflict(
            ErrorCode::MfaNotEnabled,
            "TOTP is not on",
        ));
    }
    if required && !has_keys {
        return Err(ApiError::conflict(
            ErrorCode::MfaRequiredByAccount,
            "this account requires MFA of every member; it cannot be turned off",
        ));
    }
    if consume_code(
        &tx,
        &state.keys,
        principal.user_id,
        &req.code,
        Accept::TotpOrRecovery,
    )
    .await?
    .is_none()
    {
        drop(tx);
        let hash = state
            .keys
            .keyed_input_hash(principal.email.to_lowercase().as_bytes());
        crate::identity::login_throttle::record(
            &**client,
            meta.ip,
            Some(principal.account_id),
            &hash,
        )
        .await?;
        return Err(wrong_code());
    }
    tx.execute(
        "UPDATE users SET totp_secret_ciphertext = NULL, totp_pending_ciphertext = NULL, \
         totp_enabled_at = NULL WHERE id = $1",
        &[&principal.user_id],
    )
    .await?;
    // The recovery codes stay while a security key is left for them to stand in for.
    if !has_keys {
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
            "user.mfa_disabled",
            ("user", principal.user_id),
            json!({"method": "totp"}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
