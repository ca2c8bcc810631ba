//! The pages for someone not signed in yet: asking for a password reset and setting the new
//! password with the emailed token (also how the first owner made by `create-owner` sets
//! theirs), accepting an invitation, and signing up where the signup policy allows it. Each
//! calls the API's public handler, so its throttles, token checks, password policy and audit
//! rows apply; each form passes the origin check (there is no session to tie a token to).
//!
//! Tokens arrive by email as a link whose token is in the URL's fragment, which browsers
//! never send to a server: the script copies it into the form, so it is in no access log,
//! proxy log or `Referer`. Without the script, the token is pasted into the field.

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use http::{HeaderMap, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::carry_cookies;
use super::guard;
use super::{layout, WebError};
use crate::api::auth_routes::{self, SignupRequest};
use crate::api::extract::{ClientMeta, JsonBody};
use crate::api::members::{self, AcceptInvitation};
use crate::api::password_reset::{self, ResetConfirm, ResetRequest};
use crate::api::AppState;
use crate::identity::signup::SignupPolicy;

/// Bounds on what the forms accept (the API's own limits apply on top).
const MAX_EMAIL: usize = 320;
const MAX_PASSWORD: usize = 1024;
const MAX_TOKEN: usize = 512;
const MAX_NAME: usize = 200;

fn error_line(error: Option<&str>) -> Markup {
    html! { @if let Some(error) = error { p.error role="alert" id="form-error" { (error) } } }
}

/// The token's field; after a refused attempt (a weak password) it keeps the token the
/// person sent, so they only choose another password.
fn token_field(token: &str) -> Markup {
    html! {
        label for="token" { "Token (from the email)" }
        input id="token" name="token" type="text" required maxlength=(MAX_TOKEN)
            autocomplete="off" data-from-fragment="token" value=(token);
    }
}

fn new_password_field() -> Markup {
    html! {
        label for="password" { "New password (at least 10 characters)" }
        input id="password" name="password" type="password" autocomplete="new-password"
            required minlength="10" maxlength=(MAX_PASSWORD);
    }
}

fn too_long() -> Response {
    WebError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "that is longer than this form takes",
    )
    .into_response()
}

fn request_page(error: Option<&str>, sent: Option<&str>) -> Markup {
    layout::bare(
        "Reset your password",
        html! {
            h1 { "Reset your password" }
            (error_line(error))
            @if let Some(sent) = sent {
                p.notice role="status" id="reset-sent" { (sent) ". It works once, for "
                    (password_reset::RESET_MINUTES) " minutes." }
            }
            form.stack method="post" action="/ui/reset-password" {
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="username" required
                    maxlength=(MAX_EMAIL);
                button type="submit" id="request-reset" { "Email me a reset link" }
            }
            p { a href="/ui/sign-in" { "Back to sign in" } }
        },
    )
}

/// `GET /ui/reset-password`
pub async fn reset_request_page() -> Markup {
    request_page(None, None)
}

#[derive(Deserialize)]
pub struct EmailForm {
    #[serde(default)]
    email: String,
}

/// `POST /ui/reset-password`: the same answer whether or not the address has an account.
pub async fn reset_request(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Form(form): Form<EmailForm>,
) -> Result<Response, WebError> {
    guard::same_origin(&state, &headers)?;
    if form.email.len() > MAX_EMAIL {
        return Ok(too_long());
    }
    match password_reset::request(
        State(state),
        meta,
        JsonBody(ResetRequest { email: form.email }),
    )
    .await
    {
        Ok((status, accepted)) => {
            Ok((status, request_page(None, Some(accepted.status))).into_response())
        }
        Err(e) => Ok((e.status(), request_page(Some(e.message()), None)).into_response()),
    }
}

fn confirm_page(error: Option<&str>, token: &str) -> Markup {
    layout::bare(
        "Choose a new password",
        html! {
            h1 { "Choose a new password" }
            p { "Every session of yours is signed out when the password changes." }
            (error_line(error))
            form.stack method="post" action=(password_reset::RESET_PAGE) {
                (token_field(token))
                (new_password_field())
                button type="submit" id="set-password" { "Set password" }
            }
            p { a href="/ui/reset-password" { "Ask for a new link" } }
        },
    )
}

/// `GET /ui/reset-password/confirm`
pub async fn reset_confirm_page() -> Markup {
    confirm_page(None, "")
}

#[derive(Deserialize)]
pub struct TokenPasswordForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    password: String,
}

impl TokenPasswordForm {
    fn too_long(&self) -> bool {
        self.token.len() > MAX_TOKEN || self.password.len() > MAX_PASSWORD
    }
}

/// `POST /ui/reset-password/confirm`: sets the password, then to sign in with it.
pub async fn reset_confirm(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Form(form): Form<TokenPasswordForm>,
) -> Result<Response, WebError> {
    guard::same_origin(&state, &headers)?;
    if form.too_long() {
        return Ok(too_long());
    }
    let token = form.token.clone();
    let request = ResetConfirm {
        token: form.token,
        password: form.password,
    };
    match password_reset::confirm(State(state), meta, JsonBody(request)).await {
        Ok(_) => Ok(Redirect::to("/ui/sign-in?done=password-set").into_response()),
        Err(e) => Ok((e.status(), confirm_page(Some(e.message()), &token)).into_response()),
    }
}

fn invitation_page(error: Option<&str>, token: &str) -> Markup {
    layout::bare(
        "Join an account",
        html! {
            h1 { "Join an account" }
            p { "Choose the password you will sign in with; the email address is the one the invitation was sent to." }
            (error_line(error))
            form.stack method="post" action=(members::INVITATION_PAGE) {
                (token_field(token))
                (new_password_field())
                button type="submit" id="accept-invitation" { "Join" }
            }
        },
    )
}

/// `GET /ui/invitation`
pub async fn invitation_form() -> Markup {
    invitation_page(None, "")
}

/// `POST /ui/invitation`: joins, signed in with the API's session cookie.
pub async fn accept_invitation(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Form(form): Form<TokenPasswordForm>,
) -> Result<Response, WebError> {
    guard::same_origin(&state, &headers)?;
    if form.too_long() {
        return Ok(too_long());
    }
    let token = form.token.clone();
    let request = AcceptInvitation {
        token: form.token,
        password: form.password,
    };
    match members::accept(State(state), meta, JsonBody(request)).await {
        Ok(answer) => Ok(carry_cookies(&answer, Redirect::to("/").into_response())),
        Err(e) => Ok((e.status(), invitation_page(Some(e.message()), &token)).into_response()),
    }
}

fn sign_up_page(policy: SignupPolicy, error: Option<&str>) -> Markup {
    layout::bare(
        "Create an account",
        html! {
            h1 { "Create an account" }
            p { "You become the owner of a new account, and can invite the others from Settings → Members." }
            (error_line(error))
            form.stack method="post" action="/ui/sign-up" {
                label for="account_name" { "Account name (your organisation)" }
                input id="account_name" name="account_name" type="text" required maxlength=(MAX_NAME);
                label for="email" { "Email" }
                input id="email" name="email" type="email" autocomplete="username" required maxlength=(MAX_EMAIL);
                (new_password_field())
                @if policy == SignupPolicy::InviteOnly {
                    label for="signup_invitation" { "Signup invitation (from the operator)" }
                    input id="signup_invitation" name="signup_invitation" type="text" required
                        maxlength=(MAX_TOKEN) autocomplete="off";
                }
                button type="submit" id="sign-up" { "Create account" }
            }
            p { a href="/ui/sign-in" { "Sign in instead" } }
        },
    )
}

/// Whether this control plane takes signups at all; where it does not, there is no such
/// page (owners come from `create-owner`, members by invitation).
fn signups(state: &AppState) -> Result<SignupPolicy, WebError> {
    match state.signup {
        SignupPolicy::Closed => Err(WebError::new(
            StatusCode::NOT_FOUND,
            "this control plane does not take signups: its operator creates accounts, and \
             members join by invitation",
        )),
        open => Ok(open),
    }
}

/// `GET /ui/sign-up`
pub async fn sign_up_form(State(state): State<AppState>) -> Result<Markup, WebError> {
    Ok(sign_up_page(signups(&state)?, None))
}

#[derive(Deserialize)]
pub struct SignUpForm {
    #[serde(default)]
    account_name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    signup_invitation: String,
}

/// `POST /ui/sign-up`: the account and its owner, signed in.
pub async fn sign_up(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Form(form): Form<SignUpForm>,
) -> Result<Response, WebError> {
    guard::same_origin(&state, &headers)?;
    let policy = signups(&state)?;
    if form.email.len() > MAX_EMAIL
        || form.password.len() > MAX_PASSWORD
        || form.account_name.len() > MAX_NAME
        || form.signup_invitation.len() > MAX_TOKEN
    {
        return Ok(too_long());
    }
    let invitation = form.signup_invitation.trim();
    let request = SignupRequest {
        email: form.email,
        password: form.password,
        account_name: form.account_name,
        signup_invitation: (!invitation.is_empty()).then(|| invitation.to_owned()),
    };
    match auth_routes::signup(State(state), meta, JsonBody(request)).await {
        Ok(answer) => Ok(carry_cookies(&answer, Redirect::to("/").into_response())),
        Err(e) => Ok((e.status(), sign_up_page(policy, Some(e.message()))).into_response()),
    }
}
