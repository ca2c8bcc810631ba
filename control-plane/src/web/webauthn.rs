//! Security keys in the dashboard: the "Security keys" section of Settings → Security
//! (register with a name, rename, remove after a confirmation) and the key option of the
//! sign-in's second step. The browser's side, `navigator.credentials.create()` and `.get()`,
//! is in the static script; it reads a ceremony's options from a `data-options` attribute or
//! a same-origin JSON answer and posts the authenticator's answer in an ordinary form, so
//! every change passes [`Signed::submit`] and the API's own handlers.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::auth_routes::{self, PasswordStep};
use crate::api::extract::{ClientMeta, JsonBody};
use crate::api::webauthn::{self as keys, KeyView, RegisterKey, RenameKey, SignInCeremony};
use crate::api::AppState;
use crate::identity::webauthn::{MAX_CREDENTIAL_BYTES, MAX_NAME_CHARS};

/// The "Security keys" section of the security page.
pub async fn section(state: &AppState, signed: &Signed) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/auth/mfa/webauthn/keys")?;
    let list = keys::list(State(state.clone()), Extension(signed.principal.clone()))
        .await?
        .0;
    Ok(html! {
        h2 { "Security keys" }
        p { "A security key or this device's own authenticator (fingerprint, face, PIN) as a second factor. "
            "Register several, so that losing one does not lock you out." }
        @if list.keys.is_empty() {
            p id="keys-empty" { "No security key is registered." }
        } @else {
            table id="security-keys" {
                thead { tr { th { "Name" } th { "Registered" } th { "Last used" } th { span.visually-hidden { "Actions" } } } }
                tbody {
                    @for key in &list.keys {
                        tr data-key=(key.id) {
                            td.key-name { (key.name) }
                            td { (layout::time(key.created_at)) }
                            td { (layout::maybe_time(key.last_used_at)) }
                            td {
                                form.inline method="post" action=(format!("/ui/settings/security/keys/{}/rename", key.id)) {
                                    (layout::csrf(signed))
                                    label.visually-hidden for=(format!("rename-{}", key.id)) { "New name" }
                                    input id=(format!("rename-{}", key.id)) name="name" type="text" required
                                        maxlength=(MAX_NAME_CHARS) value=(key.name);
                                    button type="submit" { "Rename" }
                                }
                                " "
                                a.danger href=(format!("/ui/settings/security/keys/{}/remove", key.id)) { "Remove" }
                            }
                        }
                    }
                }
            }
        }
        form.stack id="register-key-form" method="post" action="/ui/settings/security/keys"
            data-webauthn="create" data-options-url="/ui/settings/security/keys/options" {
            (layout::csrf(signed))
            label for="key-name" { "Name of the new key" }
            input id="key-name" name="name" type="text" required maxlength=(MAX_NAME_CHARS)
                placeholder="YubiKey on my keyring";
            input type="hidden" name="challenge_id" value="";
            input type="hidden" name="credential" value="";
            button type="submit" id="register-key" { "Register a security key" }
        }
        p.error id="key-error" role="alert" hidden {}
    })
}

/// `POST /ui/settings/security/keys/options`: a registration's options, as JSON for the
/// script (the page's form token, from this origin).
pub async fn options(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Err(e) = signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/webauthn/registrations",
    ) {
        return e.into_json();
    }
    match keys::start_registration(State(state), Extension(signed.principal.clone())).await {
        Ok((status, ceremony)) => (status, ceremony).into_response(),
        Err(e) => WebError::from(e).into_json(),
    }
}

#[derive(Deserialize)]
pub struct RegisterForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    challenge_id: String,
    #[serde(default)]
    credential: String,
}

/// `POST /ui/settings/security/keys`: the authenticator's answer; the recovery codes, once,
/// when this is the first second factor.
pub async fn register(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<RegisterForm>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/auth/mfa/webauthn/keys",
    )?;
    let unusable = || {
        WebError::new(
            StatusCode::BAD_REQUEST,
            "the browser sent no usable answer from the security key; try again",
        )
    };
    if form.credential.len() > MAX_CREDENTIAL_BYTES {
        return Err(unusable());
    }
    let challenge_id = form.challenge_id.parse().map_err(|_| unusable())?;
    let credential = serde_json::from_str(&form.credential).map_err(|_| unusable())?;
    let (_, registered) = keys::register(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(RegisterKey {
            challenge_id,
            name: form.name,
            credential,
        }),
    )
    .await?;
    let Some(codes) = registered.0.recovery_codes else {
        return Ok(Redirect::to("/ui/settings/security?done=key-registered").into_response());
    };
    let body = html! {
        h1 { "The security key is registered" }
        p { "Sign-in now asks for it after your password. Keep these recovery codes somewhere safe: "
            "each signs you in once if you lose your keys. They are shown only this once." }
        ul.codes id="recovery-codes" {
            @for c in &codes { li { code { (c) } } }
        }
        p { a href="/ui/settings/security" { "Done" } }
    };
    Ok(layout::page("Recovery codes", &signed, Section::Settings, body).into_response())
}

#[derive(Deserialize)]
pub struct RenameForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// `POST /ui/settings/security/keys/{id}/rename`
pub async fn rename(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<RenameForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/auth/mfa/webauthn/keys/{id}",
    )?;
    let _renamed = keys::rename(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        JsonBody(RenameKey { name: form.name }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/security?done=key-renamed"))
}

async fn own_key(state: &AppState, signed: &Signed, id: uuid::Uuid) -> Result<KeyView, WebError> {
    keys::list(State(state.clone()), Extension(signed.principal.clone()))
        .await?
        .0
        .keys
        .into_iter()
        .find(|k| k.id == id)
        .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, "no such security key of yours"))
}

/// `GET /ui/settings/security/keys/{id}/remove`: the confirmation.
pub async fn confirm_remove(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::DELETE, "/v1/auth/mfa/webauthn/keys/{id}")?;
    let key = own_key(&state, &signed, id).await?;
    let body = html! {
        h1 { "Remove the security key “" (key.name) "”?" }
        p { "Sign-in refuses it from then on. Register it again to use it again." }
        form method="post" action=(format!("/ui/settings/security/keys/{id}/remove")) {
            (layout::csrf(&signed))
            button.danger type="submit" id="confirm-remove-key" { "Remove security key" }
            " "
            a href="/ui/settings/security" { "Cancel" }
        }
    };
    Ok(layout::page(
        "Remove security key",
        &signed,
        Section::Settings,
        body,
    ))
}

/// `POST /ui/settings/security/keys/{id}/remove`
pub async fn remove(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TokenForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::DELETE,
        "/v1/auth/mfa/webauthn/keys/{id}",
    )?;
    keys::remove(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/security?done=key-removed"))
}

/// The sign-in's second step: a key challenge when the user has keys (the password is
/// checked again by the API, with its throttle). Answers the key's part of the page and
/// whether the user also has TOTP.
pub async fn sign_in_part(
    state: &AppState,
    meta: &ClientMeta,
    email: &str,
    password: &str,
    ticket: &str,
) -> (Markup, bool) {
    let answer = auth_routes::login_webauthn(
        State(state.clone()),
        meta.clone(),
        JsonBody(PasswordStep {
            email: email.to_owned(),
            password: password.to_owned(),
        }),
    )
    .await;
    let ceremony: Option<SignInCeremony> = match answer {
        Ok(response) => super::json_body(response).await.ok(),
        Err(_) => None,
    };
    let Some(ceremony) = ceremony else {
        // No key (or the plane cannot be a relying party): codes only.
        return (html! {}, true);
    };
    let part = html! {
        section id="security-key" {
            h2 { "Security key" }
            form id="key-form" method="post" action="/ui/sign-in" data-webauthn="get"
                data-options=(ceremony.options.to_string()) {
                input type="hidden" name="ticket" value=(ticket);
                input type="hidden" name="challenge_id" value=(ceremony.challenge_id);
                input type="hidden" name="assertion" value="";
                button type="button" id="use-key" { "Use your security key" }
            }
            p.error id="key-error" role="alert" hidden {}
        }
    };
    (part, ceremony.totp_enabled)
}

impl WebError {
    /// The error as the script reads it: `{"error": "…"}` with the status.
    fn into_json(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}
