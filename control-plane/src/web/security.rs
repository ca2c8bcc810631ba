//! Settings → Security: the signed-in person's second factor. Setting up TOTP shows the
//! secret once and asks for a code from it before it is on; the recovery codes are shown
//! once at that moment. Turning it off takes a current code or a recovery code.
//!
//! This is also where someone lands whose account requires a second factor they have not set
//! up: every other page is refused to them, as every other API route is.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{Signed, TokenForm};
use super::layout::{self, Section};
use super::settings::{tabs, Done};
use super::WebError;
use crate::api::auth_routes;
use crate::api::extract::JsonBody;
use crate::api::mfa::{self, TotpCode};
use crate::api::AppState;

/// Longest code accepted (a recovery code is longer than a TOTP code).
const MAX_CODE: usize = 64;

/// `GET /ui/settings/security`
pub async fn page(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/auth/me")?;
    let me = auth_routes::me(State(state.clone()), Extension(signed.principal.clone()))
        .await?
        .0;
    let keys = super::webauthn::section(&state, &signed).await?;
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/security"))
        (layout::notice(done.done.as_deref()))
        h2 { "Second factor" }
        @if me.mfa_setup_required {
            p.error role="alert" { "Your account requires a second factor: set one up to use the dashboard." }
        }
        @if me.totp_enabled {
            p id="totp-state" { "Sign-in asks for a code from your authenticator app (TOTP)." }
            form.stack method="post" action="/ui/settings/security/totp/disable" {
                (layout::csrf(&signed))
                label for="code" { "A current code, or a recovery code, to turn it off" }
                input id="code" name="code" type="text" autocomplete="one-time-code" required maxlength=(MAX_CODE);
                button.danger type="submit" id="disable-totp" { "Turn off the second factor" }
            }
        } @else {
            p id="totp-state" { "Sign-in asks only for your password." }
            form method="post" action="/ui/settings/security/totp" {
                (layout::csrf(&signed))
                button type="submit" id="enroll-totp" { "Set up an authenticator app" }
            }
        }
        (keys)
    };
    Ok(layout::page("Security", &signed, Section::Settings, body))
}

fn confirm_form(signed: &Signed, error: Option<&str>) -> Markup {
    html! {
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form.stack method="post" action="/ui/settings/security/totp/confirm" {
            (layout::csrf(signed))
            label for="code" { "The 6-digit code the app shows now" }
            input id="code" name="code" type="text" inputmode="numeric" autocomplete="one-time-code"
                required maxlength=(MAX_CODE);
            button type="submit" id="confirm-totp" { "Turn on" }
        }
    }
}

/// `POST /ui/settings/security/totp`: a new secret, shown once, pending until confirmed.
pub async fn enroll(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp",
    )?;
    let (_, enrolled) = mfa::enroll(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
    )
    .await?;
    let enrolled = enrolled.0;
    let body = html! {
        h1 { "Set up an authenticator app" }
        p { "Add this secret to your authenticator app (type it in, or open the otpauth link on a device that has one). "
            "It is shown only this once." }
        dl.facts {
            dt { "Secret" } dd { code id="totp-secret" { (enrolled.secret) } }
            dt { "Link" } dd { code.wrap id="totp-uri" { (enrolled.otpauth_uri) } }
        }
        (confirm_form(&signed, None))
    };
    Ok((
        StatusCode::CREATED,
        layout::page("Authenticator", &signed, Section::Settings, body),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

/// `POST /ui/settings/security/totp/confirm`: on with a right code; the recovery codes,
/// once.
pub async fn confirm(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp/confirm",
    )?;
    let code = form.code.trim().chars().take(MAX_CODE).collect();
    let answer = mfa::confirm(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(TotpCode { code }),
    )
    .await;
    let codes = match answer {
        Ok(codes) => codes.0,
        // A wrong code: the same secret stays pending; ask again.
        Err(e) if e.code() == "invalid_mfa_code" => {
            let body = html! {
                h1 { "Set up an authenticator app" }
                (confirm_form(&signed, Some(e.message())))
            };
            return Ok((
                e.status(),
                layout::page("Authenticator", &signed, Section::Settings, body),
            )
                .into_response());
        }
        Err(e) => return Err(e.into()),
    };
    let body = html! {
        h1 { "The second factor is on" }
        p { "Keep these recovery codes somewhere safe: each signs you in once if you lose the app. "
            "They are shown only this once." }
        ul.codes id="recovery-codes" {
            @for c in &codes.recovery_codes { li { code { (c) } } }
        }
        p { a href="/ui/settings/security" { "Done" } }
    };
    Ok(layout::page("Recovery codes", &signed, Section::Settings, body).into_response())
}

/// `POST /ui/settings/security/totp/disable`
pub async fn disable(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CodeForm>,
) -> Result<Redirect, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/totp/disable",
    )?;
    let code = form.code.trim().chars().take(MAX_CODE).collect();
    mfa::disable(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(TotpCode { code }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/security?done=totp-off"))
}
