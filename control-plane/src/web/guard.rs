//! Who is looking at a page, and whether a form may change anything.
//!
//! A page is for a signed-in person: the session cookie the API sets, nothing else (an
//! `Authorization` header is not something a browser sends by itself, so the dashboard
//! ignores API keys entirely). A form that changes something must pass two checks: the
//! browser says it comes from the control plane's own origin (the API's rule, shared through
//! [`cross_site::from_own_origin`]), and it carries the session's form token, which a page on
//! another origin cannot read.

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use http::request::Parts;
use http::{HeaderMap, Method, StatusCode};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::WebError;
use crate::api::access;
use crate::api::cross_site;
use crate::api::extract::ClientMeta;
use crate::api::AppState;
use crate::identity::auth::{self, AuthError, Principal};

/// The name of the hidden field holding the form token.
pub const CSRF_FIELD: &str = "csrf";

/// A form that carries nothing but its token (a button).
#[derive(serde::Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    pub csrf: String,
}

/// An id from a page's path; anything else is a page that does not exist.
pub fn parse_id(text: &str) -> Result<Uuid, WebError> {
    text.parse()
        .map_err(|_| WebError::new(StatusCode::NOT_FOUND, "no such page"))
}

/// A signed-in person looking at a page.
#[derive(Clone)]
pub struct Signed {
    pub principal: Principal,
    pub meta: ClientMeta,
    /// The token this session's forms carry.
    pub csrf: String,
}

impl Signed {
    /// Whether the API would let this person call `method path` (a template from the
    /// access table): the dashboard shows a button only when this holds.
    pub fn may(&self, method: Method, path: &str) -> bool {
        access::permit(&self.principal, &method, path).is_ok()
    }

    /// Refuses, as the API would, a call this person may not make.
    /// A form this person sent to change something: it must come from the dashboard with
    /// the session's form token ([`check_form`]), and the access table must let them call
    /// the API route the form stands for.
    pub fn submit(
        &self,
        state: &AppState,
        headers: &HeaderMap,
        csrf: &str,
        method: Method,
        path: &str,
    ) -> Result<(), WebError> {
        check_form(state, headers, self, Some(csrf))?;
        self.require(method, path)
    }

    pub fn require(&self, method: Method, path: &str) -> Result<(), WebError> {
        access::permit(&self.principal, &method, path).map_err(|e| {
            if e.code() == "mfa_setup_required" {
                // The API's message names its own route; this one names the page.
                WebError::forbidden(
                    "this account requires multi-factor sign-in: set up a second factor under \
                     Settings → Security (/ui/settings/security) first",
                )
            } else {
                WebError::from(e)
            }
        })
    }

    /// The session this page is shown to (a [`Signed`] is only ever made from one).
    pub fn session_id(&self) -> Uuid {
        self.principal.session_id().unwrap_or_default()
    }
}

/// What the form-token key is derived from, with the field key's keyed hash. That hash also
/// keys inputs people type (a lower-cased email; `email NUL password` and `email NUL code`
/// of failed sign-ins, whose hashes admins see in the audit log), so this label is one none of
/// those can be: it has upper-case letters and no NUL. Anyone who could make the keyed hash of
/// this label appear could forge every form token.
const FORM_TOKEN_KEY_LABEL: &[u8] = b"Sensei Dashboard Form-Token Key, v1";

/// The form token of a session: HMAC-SHA256 of its id under a key derived from the field
/// key, so it needs no storage, differs per session, ends with the session, and cannot be
/// computed without the field key.
pub fn csrf_token(state: &AppState, session_id: Uuid) -> String {
    let key = state.keys.keyed_input_hash(FORM_TOKEN_KEY_LABEL);
    // An HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()) else {
        return String::new();
    };
    mac.update(session_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

impl FromRequestParts<AppState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let meta = ClientMeta::from_parts(parts);
        let Some(cookie) = auth::session_cookie(&parts.headers) else {
            return Err(to_sign_in());
        };
        // Only the cookie is looked at, whatever else the request carries.
        let mut only_cookie = HeaderMap::new();
        if let Ok(value) = format!("{}={cookie}", auth::SESSION_COOKIE).parse() {
            only_cookie.insert(http::header::COOKIE, value);
        }
        match auth::authenticate(&state.pool, &only_cookie, meta.ip).await {
            Ok(principal) => {
                let Some(session) = principal.session_id() else {
                    return Err(to_sign_in());
                };
                tracing::Span::current()
                    .record("account_id", tracing::field::display(principal.account_id));
                Ok(Self {
                    csrf: csrf_token(state, session),
                    principal,
                    meta,
                })
            }
            Err(AuthError::NotSignedIn | AuthError::SessionInvalid) => Err(to_sign_in()),
            Err(e) => Err(WebError::from(crate::api::error::ApiError::from(e)).into_response()),
        }
    }
}

fn to_sign_in() -> Response {
    Redirect::to("/ui/sign-in").into_response()
}

/// The browser must say the form comes from this origin. Also the sign-in form's guard,
/// before any session exists: another site cannot sign a visitor in to its own account.
pub fn same_origin(state: &AppState, headers: &HeaderMap) -> Result<(), WebError> {
    if cross_site::from_own_origin(headers, &state.public_origin) {
        Ok(())
    } else {
        Err(WebError::forbidden(format!(
            "this form does not come from the dashboard: changes are accepted only from {}",
            state.public_origin.render()
        )))
    }
}

/// Both checks for a signed-in person's form: the origin, and the session's form token
/// (compared in constant time).
pub fn check_form(
    state: &AppState,
    headers: &HeaderMap,
    signed: &Signed,
    token: Option<&str>,
) -> Result<(), WebError> {
    same_origin(state, headers)?;
    let given = token.unwrap_or("").as_bytes();
    // An empty expected token (which `csrf_token` never makes) must not match an empty field.
    if !signed.csrf.is_empty() && bool::from(given.ct_eq(signed.csrf.as_bytes())) {
        Ok(())
    } else {
        Err(WebError::new(
            StatusCode::FORBIDDEN,
            "this form has expired or was not made by the dashboard; reload the page and try again",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_label_is_no_input_the_other_keyed_hashes_take() {
        // Lower-cased emails have no upper-case ASCII; sign-in inputs are joined by NUL.
        assert!(FORM_TOKEN_KEY_LABEL.iter().any(u8::is_ascii_uppercase));
        assert!(!FORM_TOKEN_KEY_LABEL.contains(&0));
    }
}
