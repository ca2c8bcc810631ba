//! The dashboard: HTML pages for people, on the API's HTTPS listener, from the same binary.
//!
//! It is an edge like [`crate::api`]: a page handler authenticates the session cookie, asks
//! the API's access table ([`crate::api::access::permit`]) whether the signed-in user may call
//! the route it is about to use, and then calls that route's handler as a function. So a page
//! shows and does exactly what the API would answer to the same person, and every change it
//! makes is validated and audited by the code the API runs. Templates are maud (escaped,
//! checked at compile time); the only script is a static file that follows the API's
//! server-sent events. `docs/dashboard.md` explains the design.

use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{HeaderValue, StatusCode};

use crate::api::error::ApiError;
use crate::api::AppState;

mod assets;
mod auth;
mod deploys;
mod fleet;
mod guard;
mod layout;
mod projects;
mod roles;
mod rollouts;
mod security;
mod settings;
mod sso;
mod team;
mod webauthn;
mod welcome;

/// Largest form accepted, in bytes: the largest form (a project) is far below it.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The policy every dashboard answer carries: scripts, styles and connections only from this
/// origin (so no inline script or style runs, even one that slipped into a page), forms post
/// only here, and no other site may frame a page (clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// The dashboard's routes, with the same outer layers as the API (request id, client
/// address, access log) and the security headers on every answer.
/// The query a page uses to list everything it shows (the API's largest page).
fn all_rows() -> crate::api::extract::QueryParams<crate::api::page::PageQuery> {
    crate::api::extract::QueryParams(crate::api::page::PageQuery {
        limit: Some(500),
        cursor: None,
    })
}

pub fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/", get(home))
        .route("/ui", get(home))
        .route("/ui/sign-in", get(auth::sign_in_page).post(auth::sign_in))
        .route("/ui/sign-out", post(auth::sign_out))
        .route("/ui/sso", get(sso::page))
        .route("/ui/sso/start", get(sso::start))
        .route("/ui/sso/connect", get(sso::connect))
        .route("/ui/sso/callback/{slug}", get(sso::callback))
        .route(
            "/ui/settings/sso",
            get(sso::settings).post(sso::save_settings),
        )
        .route("/ui/settings/sso/remove", post(sso::remove_settings))
        .route(
            "/ui/reset-password",
            get(welcome::reset_request_page).post(welcome::reset_request),
        )
        .route(
            crate::api::password_reset::RESET_PAGE,
            get(welcome::reset_confirm_page).post(welcome::reset_confirm),
        )
        .route(
            crate::api::members::INVITATION_PAGE,
            get(welcome::invitation_form).post(welcome::accept_invitation),
        )
        .route(
            "/ui/sign-up",
            get(welcome::sign_up_form).post(welcome::sign_up),
        )
        .route("/ui/servers", get(fleet::list))
        .route("/ui/servers/new", get(fleet::new_form).post(fleet::create))
        .route("/ui/servers/{id}", get(fleet::show))
        .route(
            "/ui/servers/{id}/revoke-certificate",
            get(fleet::confirm_revoke).post(fleet::revoke),
        )
        .route(
            "/ui/servers/{id}/enrollment-token",
            get(fleet::confirm_new_token).post(fleet::new_token),
        )
        .route(
            "/ui/servers/{id}/delete",
            get(fleet::confirm_delete).post(fleet::delete),
        )
        .route("/ui/deployments", get(deploys::list).post(deploys::create))
        .route("/ui/deployments/{id}", get(deploys::show))
        .route("/ui/deployments/{id}/rollback", post(deploys::rollback))
        .route("/ui/projects", get(projects::list).post(projects::create))
        .route(
            "/ui/projects/{id}",
            get(projects::show).post(projects::edit),
        )
        .route("/ui/projects/{id}/env", post(projects::set_env))
        .route("/ui/projects/{id}/env/unset", post(projects::unset_env))
        .route(
            "/ui/projects/{id}/delete",
            get(projects::confirm_delete).post(projects::delete),
        )
        .route("/ui/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/ui/rollouts/{id}", get(rollouts::show))
        .route("/ui/rollouts/{id}/{command}", post(rollouts::steer))
        .route("/ui/settings/sessions", get(settings::sessions))
        .route(
            "/ui/settings/sessions/sign-out-everywhere",
            post(settings::sign_out_everywhere),
        )
        .route(
            "/ui/settings/sessions/{id}/sign-out",
            post(settings::sign_out_session),
        )
        .route("/ui/settings/audit", get(settings::audit))
        .route("/ui/settings/audit/export", get(settings::audit_export))
        .route("/ui/settings/security", get(security::page))
        .route("/ui/settings/security/totp", post(security::enroll))
        .route(
            "/ui/settings/security/totp/confirm",
            post(security::confirm),
        )
        .route(
            "/ui/settings/security/totp/disable",
            post(security::disable),
        )
        .route("/ui/settings/security/keys", post(webauthn::register))
        .route(
            "/ui/settings/security/keys/options",
            post(webauthn::options),
        )
        .route(
            "/ui/settings/security/keys/{id}/rename",
            post(webauthn::rename),
        )
        .route(
            "/ui/settings/security/keys/{id}/remove",
            get(webauthn::confirm_remove).post(webauthn::remove),
        )
        .route(
            "/ui/settings/members",
            get(team::members).post(team::invite),
        )
        .route("/ui/settings/members/{id}/role", post(team::change_role))
        .route(
            "/ui/settings/members/{id}/access",
            get(roles::access).post(roles::save_access),
        )
        .route("/ui/settings/roles", get(roles::page).post(roles::create))
        .route("/ui/settings/roles/{id}", post(roles::update))
        .route("/ui/settings/roles/{id}/delete", post(roles::delete))
        .route(
            "/ui/settings/invitations/{id}/revoke",
            post(team::revoke_invitation),
        )
        .route(
            "/ui/settings/account",
            get(team::account).post(team::update_account),
        )
        .route(
            "/ui/settings/members/{id}/remove",
            get(team::confirm_remove).post(team::remove),
        )
        .route(
            "/ui/settings/api-keys",
            get(team::api_keys).post(team::create_api_key),
        )
        .route(
            "/ui/settings/api-keys/{id}/revoke",
            post(team::revoke_api_key),
        )
        .route("/ui/static/{file}", get(assets::serve))
        // Any other `/ui/…` path is a page that does not exist, answered as a page.
        .route("/ui/{*rest}", get(no_such_page))
        .layer(map_response(security_headers))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES));
    crate::api::access_log(router)
        .layer(from_fn_with_state(
            state.clone(),
            crate::api::edge::request_context,
        ))
        .with_state(state)
}

/// `/`: the fleet for a signed-in user (or, when their account requires a second factor
/// they have not set up, the page that sets it up); the guard sends anyone else to sign in.
async fn home(signed: guard::Signed) -> Redirect {
    if signed.principal.mfa_setup_required {
        Redirect::to("/ui/settings/security")
    } else {
        Redirect::to("/ui/servers")
    }
}

async fn no_such_page() -> WebError {
    WebError::new(StatusCode::NOT_FOUND, "there is no such page")
}

/// Headers on every dashboard answer, pages, assets and errors alike.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    // Links out of the dashboard (a repository URL) do not carry the page's path, which
    // holds ids.
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    // Pages hold account data (and once, an enrollment token): never kept by a cache.
    // Assets set their own, long-lived, policy.
    if !headers.contains_key(http::header::CACHE_CONTROL) {
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
    response
}

/// Why a page could not be shown or an action not taken: rendered as a page with the
/// status the API would have answered.
#[derive(Debug)]
pub struct WebError {
    status: StatusCode,
    message: String,
}

impl WebError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A form that does not come from the dashboard itself.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        // The API's messages are written for the person who called it; a server error's
        // message is generic already (details are logged, never answered).
        Self::new(e.status(), e.message().to_owned())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let title = self
            .status
            .canonical_reason()
            .unwrap_or("Something went wrong");
        let body = layout::bare(
            title,
            maud::html! {
                h1 { (title) }
                p.error role="alert" { (self.message) }
                p { a href="/ui/servers" { "Back to the dashboard" } }
            },
        );
        (self.status, body).into_response()
    }
}

/// The id of what an API handler created (a deployment, a rollout), from its answer.
async fn created_id(answer: Response, what: &str) -> Result<uuid::Uuid, WebError> {
    let created: serde_json::Value = json_body(answer).await?;
    created["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            WebError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the {what} was queued but its answer was unreadable"),
            )
        })
}

/// Largest API answer a page reads back as JSON (a deployment's first log page).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// The JSON of an API handler's answer, for the handlers that answer a built response.
async fn json_body<T: serde::de::DeserializeOwned>(answer: Response) -> Result<T, WebError> {
    let unreadable = || {
        WebError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "an answer could not be read",
        )
    };
    let bytes = axum::body::to_bytes(answer.into_body(), MAX_ANSWER_BYTES)
        .await
        .map_err(|_| unreadable())?;
    serde_json::from_slice(&bytes).map_err(|_| unreadable())
}
