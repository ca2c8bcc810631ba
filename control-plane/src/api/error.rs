//! The API's one error type: every failure leaves as `{"error": {"code", "message"}}` with the
//! right status. Internal details go to the log, never to the client.

use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

/// Declares [`ErrorCode`] from one list, so that the variants, their text and `ALL` (which
/// the documentation test walks) cannot drift apart.
macro_rules! error_codes {
    ($($variant:ident => $text:literal,)*) => {
        /// Every error code the API answers with: the `code` of
        /// `{"error": {"code", "message"}}`. Clients may match on these; `docs/api.md` lists
        /// each one (a test checks that it does).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($variant,)*
        }

        impl ErrorCode {
            /// Every code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as clients see it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)*
                }
            }
        }
    };
}

error_codes! {
    ApiKeyExpired => "api_key_expired",
    BodyTooLarge => "body_too_large",
    ConfirmationMismatch => "confirmation_mismatch",
    CrossSiteRequest => "cross_site_request",
    DatabaseUnavailable => "database_unavailable",
    EmailTaken => "email_taken",
    IdempotencyKeyReused => "idempotency_key_reused",
    InsufficientScope => "insufficient_scope",
    Internal => "internal",
    InvalidAccountName => "invalid_account_name",
    InvalidAuth => "invalid_auth",
    InvalidCaFilter => "invalid_ca_filter",
    InvalidCredentials => "invalid_credentials",
    InvalidCursor => "invalid_cursor",
    InvalidDeployPath => "invalid_deploy_path",
    InvalidEmail => "invalid_email",
    InvalidEnv => "invalid_env",
    InvalidExpiry => "invalid_expiry",
    InvalidField => "invalid_field",
    InvalidFilter => "invalid_filter",
    InvalidHookTimeout => "invalid_hook_timeout",
    InvalidHooks => "invalid_hooks",
    InvalidHost => "invalid_host",
    InvalidHostKey => "invalid_host_key",
    InvalidId => "invalid_id",
    InvalidIdempotencyKey => "invalid_idempotency_key",
    InvalidIpAllowlist => "invalid_ip_allowlist",
    InvalidKeepReleases => "invalid_keep_releases",
    InvalidLabelFilter => "invalid_label_filter",
    InvalidLabels => "invalid_labels",
    InvalidLimit => "invalid_limit",
    InvalidLogRetention => "invalid_log_retention",
    InvalidMfaCode => "invalid_mfa_code",
    InvalidName => "invalid_name",
    InvalidPassword => "invalid_password",
    InvalidRef => "invalid_ref",
    InvalidRelease => "invalid_release",
    InvalidRepoUrl => "invalid_repo_url",
    InvalidRetention => "invalid_retention",
    InvalidRole => "invalid_role",
    InvalidScopes => "invalid_scopes",
    InvalidSink => "invalid_sink",
    InvalidSinkCa => "invalid_sink_ca",
    InvalidSinkUrl => "invalid_sink_url",
    InvalidSharedPath => "invalid_shared_path",
    InvalidSso => "invalid_sso",
    SsoProviderUnusable => "sso_provider_unusable",
    SsoRequired => "sso_required",
    SlugTaken => "slug_taken",
    InvalidState => "invalid_state",
    InvalidStrategy => "invalid_strategy",
    InvalidTarget => "invalid_target",
    InvalidTargets => "invalid_targets",
    InvalidToken => "invalid_token",
    InvalidTransport => "invalid_transport",
    InvalidTtl => "invalid_ttl",
    InvalidUsername => "invalid_username",
    InvalidVersion => "invalid_version",
    InvalidRollout => "invalid_rollout",
    IpNotAllowed => "ip_not_allowed",
    LastOwner => "last_owner",
    MalformedJson => "malformed_json",
    MethodNotAllowed => "method_not_allowed",
    MfaAlreadyEnabled => "mfa_already_enabled",
    MfaNotEnabled => "mfa_not_enabled",
    MfaRequired => "mfa_required",
    MfaRequiredByAccount => "mfa_required_by_account",
    MfaSetupRequired => "mfa_setup_required",
    NoCertificate => "no_certificate",
    NoMfaEnrollment => "no_mfa_enrollment",
    NoSuchRoute => "no_such_route",
    NoTargets => "no_targets",
    NotFound => "not_found",
    NothingToChange => "nothing_to_change",
    OwnerRequired => "owner_required",
    AllowlistLocksYouOut => "allowlist_locks_you_out",
    InvalidDns => "invalid_dns",
    ZoneTaken => "zone_taken",
    ScopeExceedsRole => "scope_exceeds_role",
    OutsideResourceScope => "outside_resource_scope",
    RecentSignInRequired => "recent_sign_in_required",
    FourEyesRequired => "four_eyes_required",
    RoleTaken => "role_taken",
    RoleInUse => "role_in_use",
    InvalidPermissions => "invalid_permissions",
    InvalidResourceScope => "invalid_resource_scope",
    ServerNotEnrolled => "server_not_enrolled",
    SessionRequired => "session_required",
    SignupClosed => "signup_closed",
    SinkTargetDenied => "sink_target_denied",
    SignupInvitationRequired => "signup_invitation_required",
    TooManyAttempts => "too_many_attempts",
    TooManyInvitations => "too_many_invitations",
    TooManySignups => "too_many_signups",
    TooManySinks => "too_many_sinks",
    TooManyStreams => "too_many_streams",
    Unauthenticated => "unauthenticated",
    UnreadableBody => "unreadable_body",
    UnsupportedMediaType => "unsupported_media_type",
    WeakPassword => "weak_password",
    // Security keys (WebAuthn).
    InvalidWebauthnChallenge => "invalid_webauthn_challenge",
    KeyNameTaken => "key_name_taken",
    NoSecurityKeys => "no_security_keys",
    TooManyKeys => "too_many_keys",
    WebauthnRefused => "webauthn_refused",
    WebauthnRequired => "webauthn_required",
    WebauthnUnavailable => "webauthn_unavailable",
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after_secs: Option<u64>,
}

/// The error body.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_credentials`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The request's id (also in the `x-request-id` header): quote it when asking an operator,
    /// who finds the request's log line by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// 422: the request is well-formed but a value is not acceptable.
    pub fn unprocessable(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            message,
        )
    }

    pub fn forbidden(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// A resource outside the caller's resource scope was named in a request body (a path
    /// naming one answers "not found" instead, as for another account's).
    pub fn outside_scope(what: impl std::fmt::Display) -> Self {
        Self::forbidden(
            ErrorCode::OutsideResourceScope,
            format!("{what} is outside your resource scope"),
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("{what} not found"),
        )
    }

    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn too_many(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::too_many_of(ErrorCode::TooManyAttempts, message, retry_after_secs)
    }

    /// 429 with `code` and a `Retry-After`.
    pub fn too_many_of(code: ErrorCode, message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after_secs: Some(retry_after_secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// A fault on our side. `detail` is logged; the client sees a generic message.
    pub fn internal(detail: &str) -> Self {
        tracing::error!(detail, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error; the control plane log has the details",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code.as_str()
    }

    /// The message for people.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message,
                request_id: super::edge::current_request_id(),
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        response
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::internal(&crate::store::db::describe(&e))
    }
}

impl From<crate::jobs::queue::QueueError> for ApiError {
    fn from(e: crate::jobs::queue::QueueError) -> Self {
        use crate::jobs::queue::QueueError;
        match e {
            QueueError::NoSuchServer => ApiError::not_found("server"),
            QueueError::NoSshCredentials | QueueError::AgentNotEnrolled => {
                ApiError::conflict(ErrorCode::ServerNotEnrolled, e.to_string())
            }
            QueueError::Database(e) => e.into(),
        }
    }
}

impl From<crate::identity::login_throttle::ThrottleError> for ApiError {
    fn from(e: crate::identity::login_throttle::ThrottleError) -> Self {
        use crate::identity::login_throttle::ThrottleError;
        match e {
            ThrottleError::Throttled {
                retry_after_secs, ..
            } => ApiError::too_many(e.to_string(), retry_after_secs),
            ThrottleError::Database(e) => e.into(),
        }
    }
}

impl From<crate::identity::auth::AuthError> for ApiError {
    fn from(e: crate::identity::auth::AuthError) -> Self {
        use crate::identity::auth::AuthError;
        match e {
            AuthError::NotSignedIn | AuthError::SessionInvalid | AuthError::ApiKeyInvalid => {
                ApiError::unauthenticated(e.to_string())
            }
            AuthError::ApiKeyExpired { .. } => ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::ApiKeyExpired,
                e.to_string(),
            ),
            AuthError::IpNotAllowed { .. } | AuthError::AccountIpNotAllowed { .. } => {
                ApiError::forbidden(ErrorCode::IpNotAllowed, e.to_string())
            }
            AuthError::Stored(detail) => ApiError::internal(&detail),
            AuthError::Database(e) => e.into(),
            AuthError::Pool(e) => e.into(),
        }
    }
}

impl From<crate::identity::names::InvalidEmail> for ApiError {
    fn from(e: crate::identity::names::InvalidEmail) -> Self {
        ApiError::unprocessable(ErrorCode::InvalidEmail, e.to_string())
    }
}

impl From<crate::identity::names::InvalidAccountName> for ApiError {
    fn from(e: crate::identity::names::InvalidAccountName) -> Self {
        ApiError::unprocessable(ErrorCode::InvalidAccountName, e.to_string())
    }
}

impl From<crate::identity::allowlist::InvalidAllowlist> for ApiError {
    fn from(e: crate::identity::allowlist::InvalidAllowlist) -> Self {
        ApiError::unprocessable(ErrorCode::InvalidIpAllowlist, e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        tracing::error!(error = %e, "database pool");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::DatabaseUnavailable,
            "the database is unavailable; try again shortly",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes in the first column of `docs/api.md`'s error-code tables.
    fn documented_codes() -> std::collections::BTreeSet<String> {
        let doc = include_str!("../../../docs/api.md");
        let section = doc
            .split("\n#")
            .filter(|s| s.to_lowercase().contains("error codes"))
            .collect::<Vec<_>>()
            .join("\n");
        section
            .lines()
            .filter_map(|l| l.trim().strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn docs_api_md_lists_every_error_code_and_no_other() {
        let documented = documented_codes();
        let known: std::collections::BTreeSet<String> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        let undocumented: Vec<_> = known.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&known).collect();
        assert!(
            undocumented.is_empty(),
            "error codes missing from docs/api.md: {undocumented:?}"
        );
        assert!(
            stale.is_empty(),
            "docs/api.md lists codes the API never returns: {stale:?}"
        );
    }

    #[test]
    fn every_code_is_listed_once_and_spelled_in_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{text}"
            );
        }
    }
}
