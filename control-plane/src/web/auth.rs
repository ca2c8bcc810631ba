//! Signing in (the password, then the second factor when the user has one) and out. The
//! API's login handler does the work, so the throttles, the audit rows and the cookie are
//! the API's own.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, StatusCode};
use maud::{html, Markup};
use serde::{Deserialize, Serialize};

use super::guard::{self, Signed, TokenForm};
use super::{layout, WebError};
use crate::api::auth_routes::{self, LoginRequest};
use crate::api::extract::{ClientMeta, JsonBody};
use crate::api::webauthn::Assertion;
use crate::api::AppState;
use crate::identity::signup::SignupPolicy;

/// How long the second step of a sign-in may wait for its code.
const SECOND_STEP_SECS: i64 = 300;
/// Bounds on what the form accepts (the password policy's own limit is 1024).
const MAX_EMAIL: usize = 320;
const MAX_PASSWORD: usize = 1024;
const MAX_CODE: usize = 64;
const MAX_TICKET: usize = 4096;
/// A security key's answer is a few hundred bytes.
const MAX_ASSERTION: usize = 8192;

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    code: String,
    /// `totp` (default) or `recovery`.
    #[serde(default)]
    code_kind: String,
    /// The sealed first step, on the second step's form.
    #[serde(default)]
    ticket: String,
    /// A security key's challenge and answer (JSON), on the second step's key form.
    #[serde(default)]
    challenge_id: String,
    #[serde(default)]
    assertion: String,
}

/// What the second step's form carries from the first: the email and password, sealed with
/// the field key (Fernet: encrypted and authenticated), with an expiry, so the page never
/// holds the password in the clear and a stale or forged ticket is refused. The password is
/// checked again with the code, by the same login handler.
#[derive(Serialize, Deserialize)]
struct Ticket {
    email: String,
    password: String,
    expires: i64,
}

fn seal(state: &AppState, email: &str, password: &str) -> String {
    let ticket = Ticket {
        email: email.to_owned(),
        password: password.to_owned(),
        expires: chrono::Utc::now().timestamp() + SECOND_STEP_SECS,
    };
    // Serializing two strings and a number cannot fail; an empty ticket would only be refused.
    let plain = serde_json::to_vec(&ticket).unwrap_or_default();
    state.keys.encrypt(&plain)
}

fn open(state: &AppState, text: &str) -> Option<Ticket> {
    if text.len() > MAX_TICKET {
        return None;
    }
    let plain = state.keys.decrypt(text).ok()?;
    let ticket: Ticket = serde_json::from_slice(&plain).ok()?;
    (ticket.expires >= chrono::Utc::now().timestamp()).then_some(ticket)
}

fn password_step(state: &AppState, error: Option<&str>, email: &str, done: Option<&str>) -> Markup {
    layout::bare(
        "Sign in",
        html! {
            (layout::notice(done))
            h1 { "Sign in" }
            @if let Some(error) = error { p.error role="alert" id="sign-in-error" { (error) } }
            form.stack method="post" action="/ui/sign-in" {
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="username" required
                    maxlength=(MAX_EMAIL) value=(email) autofocus;
                label for="password" { "Password" }
                input id="password" name="password" type="password"
                    autocomplete="current-password" required maxlength=(MAX_PASSWORD);
                button type="submit" id="sign-in" { "Sign in" }
            }
            (super::sso::sign_in_form())
            p { a href="/ui/reset-password" id="forgot" { "Forgot your password?" } }
            @if state.signup != SignupPolicy::Closed {
                p { a href="/ui/sign-up" id="to-sign-up" { "Create an account" } }
            }
        },
    )
}

/// The second step: the security key's part (empty without keys), then the codes.
async fn code_step(
    state: &AppState,
    meta: &ClientMeta,
    error: Option<&str>,
    email: &str,
    password: &str,
) -> Markup {
    let ticket = seal(state, email, password);
    let (key_part, totp) =
        super::webauthn::sign_in_part(state, meta, email, password, &ticket).await;
    layout::bare(
        "Second factor",
        html! {
            h1 { "Second factor" }
            @if let Some(error) = error { p.error role="alert" id="sign-in-error" { (error) } }
            (key_part)
            @if totp {
                p { "Enter the 6-digit code from your authenticator app, or one of your recovery codes." }
            } @else {
                p { "Or enter one of your recovery codes." }
            }
            form.stack method="post" action="/ui/sign-in" {
                input type="hidden" name="ticket" value=(&ticket);
                fieldset {
                    legend { "Kind of code" }
                    // Without TOTP (keys only), a recovery code is the only code there is.
                    label { input type="radio" name="code_kind" value="totp" checked[totp]; " Authenticator code" }
                    label { input type="radio" name="code_kind" value="recovery" checked[!totp]; " Recovery code" }
                }
                label for="code" { "Code" }
                input id="code" name="code" type="text" inputmode="text" autocomplete="one-time-code"
                    required maxlength=(MAX_CODE) autofocus;
                button type="submit" id="verify" { "Verify" }
            }
            p { a href="/ui/sign-in" { "Start again" } }
        },
    )
}

#[derive(Deserialize, Default)]
pub struct Done {
    #[serde(default)]
    done: Option<String>,
}

/// `GET /ui/sign-in`
pub async fn sign_in_page(State(state): State<AppState>, Query(done): Query<Done>) -> Markup {
    password_step(&state, None, "", done.done.as_deref())
}

/// `POST /ui/sign-in`: either step.
pub async fn sign_in(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Result<Response, WebError> {
    guard::same_origin(&state, &headers)?;
    let second_step = !form.ticket.is_empty();
    let (email, password) = if second_step {
        match open(&state, &form.ticket) {
            Some(t) => (t.email, t.password),
            None => {
                return Ok((
                    StatusCode::UNAUTHORIZED,
                    password_step(
                        &state,
                        Some("That sign-in took too long; start again."),
                        "",
                        None,
                    ),
                )
                    .into_response())
            }
        }
    } else {
        (form.email, form.password)
    };
    if email.len() > MAX_EMAIL
        || password.len() > MAX_PASSWORD
        || form.code.len() > MAX_CODE
        || form.assertion.len() > MAX_ASSERTION
    {
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            password_step(
                &state,
                Some("That is longer than any email or password."),
                "",
                None,
            ),
        )
            .into_response());
    }
    let code = form.code.trim().to_owned();
    let (totp_code, recovery_code) = match (second_step, form.code_kind.as_str()) {
        (false, _) => (None, None),
        (true, "recovery") => (None, Some(code)),
        (true, _) => (Some(code), None),
    };
    // A key's answer instead of a code (an unreadable one is refused by the API as such).
    let webauthn = (second_step && !form.assertion.is_empty()).then(|| Assertion {
        challenge_id: form.challenge_id.parse().unwrap_or_default(),
        credential: serde_json::from_str(&form.assertion).unwrap_or_default(),
    });
    let (totp_code, recovery_code) = if webauthn.is_some() {
        (None, None)
    } else {
        (totp_code, recovery_code)
    };
    let request = LoginRequest {
        email: email.clone(),
        password: password.clone(),
        totp_code,
        recovery_code,
        webauthn,
    };
    match auth_routes::login(State(state.clone()), meta.clone(), JsonBody(request)).await {
        // Home decides where to go: the fleet, or setting up a required second factor.
        Ok(answer) => Ok(carry_cookies(&answer, Redirect::to("/").into_response())),
        Err(e) if e.code() == "mfa_required" => Ok((
            StatusCode::OK,
            code_step(&state, &meta, None, &email, &password).await,
        )
            .into_response()),
        Err(e)
            if second_step
                && matches!(
                    e.code(),
                    "invalid_mfa_code" | "webauthn_refused" | "invalid_webauthn_challenge"
                ) =>
        {
            Ok((
                e.status(),
                code_step(&state, &meta, Some(e.message()), &email, &password).await,
            )
                .into_response())
        }
        Err(e) => Ok((
            e.status(),
            password_step(&state, Some(e.message()), &email, None),
        )
            .into_response()),
    }
}

/// Copies the `Set-Cookie` headers of the API's answer onto the dashboard's.
pub(super) fn carry_cookies(from: &Response, mut to: Response) -> Response {
    for cookie in from.headers().get_all(http::header::SET_COOKIE) {
        to.headers_mut()
            .append(http::header::SET_COOKIE, cookie.clone());
    }
    to
}

/// `POST /ui/sign-out`
pub async fn sign_out(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        http::Method::POST,
        "/v1/auth/logout",
    )?;
    let answer = auth_routes::logout(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
    )
    .await?;
    Ok(carry_cookies(
        &answer,
        Redirect::to("/ui/sign-in").into_response(),
    ))
}
