//! Signing in through the account's identity provider (OpenID Connect): the page that offers
//! "Sign in with <provider>", the start that sends the browser there, and the callback it
//! comes back to. The API's `sso` module does the work; this is the browser's side.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use http::{HeaderMap, HeaderValue, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::{layout, WebError};
use crate::api::extract::ClientMeta;
use crate::api::sso::{self, Callback, STATE_COOKIE};
use crate::api::AppState;

/// Bounds on what the pages accept from a query.
const MAX_ORG: usize = 40;
const MAX_CODE: usize = 4096;
const MAX_STATE: usize = 512;
const MAX_PROVIDER_ERROR: usize = 300;

#[derive(Deserialize, Default)]
pub struct OrgQuery {
    #[serde(default)]
    org: String,
}

/// The form on the sign-in page that names the account.
pub fn sign_in_form() -> Markup {
    html! {
        section.sso aria-labelledby="sso-heading" {
            h2 id="sso-heading" { "Single sign-on" }
            form.stack method="get" action="/ui/sso" {
                label for="org" { "Your organisation's name in Sensei" }
                input id="org" name="org" type="text" required maxlength=(MAX_ORG)
                    autocomplete="organization" placeholder="acme";
                button type="submit" id="sso-continue" { "Continue with single sign-on" }
            }
        }
    }
}

fn refusal_page(status: StatusCode, message: &str) -> Response {
    (
        status,
        layout::bare(
            "Single sign-on",
            html! {
                h1 { "Single sign-on" }
                p.error role="alert" id="sso-error" { (message) }
                p { a href="/ui/sign-in" { "Back to sign-in" } }
            },
        ),
    )
        .into_response()
}

/// `GET /ui/sso?org=<slug>`: "Sign in with <provider>" for that account.
pub async fn page(
    State(state): State<AppState>,
    Query(q): Query<OrgQuery>,
) -> Result<Response, WebError> {
    let org = q.org.trim().to_lowercase();
    let found = if org.is_empty() || org.len() > MAX_ORG {
        None
    } else {
        sso::by_slug(&state, &org).await?
    };
    let Some(account) = found else {
        return Ok(refusal_page(
            StatusCode::NOT_FOUND,
            "no account signs in with single sign-on under that name",
        ));
    };
    let start = format!(
        "/ui/sso/start?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("org", &account.slug)
            .finish()
    );
    Ok(layout::bare(
        "Sign in",
        html! {
            h1 { "Sign in" }
            // A link, not a form: the start redirects to the provider's origin, which the
            // pages' `form-action 'self'` would not let a form submission reach.
            p { a.button href=(start) id="sso-start" { "Sign in with " (account.display_name) } }
            p { a href="/ui/sign-in" { "Sign in with a password instead" } }
        },
    )
    .into_response())
}

/// Whether the browser says this navigation started on one of our own pages (or was typed):
/// another site cannot start a sign-in into an account of its choosing for a visitor.
fn started_here(headers: &HeaderMap) -> bool {
    match headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
    {
        Some(site) => site == "same-origin" || site == "none",
        // Browsers too old to send it: the state cookie still binds the callback to them.
        None => true,
    }
}

/// `GET /ui/sso/start?org=<slug>`: to the provider, with the state cookie set.
pub async fn start(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<OrgQuery>,
) -> Result<Response, WebError> {
    if !started_here(&headers) {
        return Ok(refusal_page(
            StatusCode::FORBIDDEN,
            "a sign-in must start on this control plane's own sign-in page",
        ));
    }
    if q.org.len() > MAX_ORG {
        return Ok(refusal_page(StatusCode::NOT_FOUND, "no such organisation"));
    }
    let begun = match sso::begin(&state, &q.org).await {
        Ok(begun) => begun,
        Err(e) => return Ok(refusal_page(e.status(), e.message())),
    };
    let mut response = Redirect::to(&begun.authorize_url).into_response();
    // SameSite=Lax: the provider's redirect back is a top-level navigation, which carries it.
    if let Ok(cookie) = HeaderValue::from_str(&format!(
        "{STATE_COOKIE}={}; Path=/ui/sso; HttpOnly; Secure; SameSite=Lax; Max-Age={}",
        begun.state_cookie,
        sso::FLOW_SECS
    )) {
        response
            .headers_mut()
            .append(http::header::SET_COOKIE, cookie);
    }
    Ok(response)
}

#[derive(Deserialize, Default)]
pub struct CallbackQuery {
    #[serde(default)]
    code: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

fn state_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == STATE_COOKIE)
        .map(|(_, value)| value)
}

fn clear_state_cookie(mut response: Response) -> Response {
    response.headers_mut().append(
        http::header::SET_COOKIE,
        HeaderValue::from_static("sensei_sso=; Path=/ui/sso; HttpOnly; Secure; SameSite=Lax; Max-Age=0"),
    );
    response
}

/// `GET /ui/sso/callback`: where the provider sends the browser back.
pub async fn callback(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    if !q.error.is_empty() {
        let said: String = format!("{}: {}", q.error, q.error_description)
            .chars()
            .take(MAX_PROVIDER_ERROR)
            .collect();
        return clear_state_cookie(refusal_page(
            StatusCode::UNAUTHORIZED,
            &format!("the identity provider did not sign you in ({said})"),
        ));
    }
    if q.code.is_empty() || q.code.len() > MAX_CODE || q.state.len() > MAX_STATE {
        return clear_state_cookie(refusal_page(
            StatusCode::BAD_REQUEST,
            "this is not an answer from the identity provider; start again",
        ));
    }
    let callback = Callback {
        state_cookie: state_cookie(&headers),
        state: &q.state,
        code: &q.code,
    };
    match sso::complete(&state, &meta, callback).await {
        Ok(signed_in) => {
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().append(
                http::header::SET_COOKIE,
                crate::api::auth_routes::session_cookie_header(&signed_in.session_cookie),
            );
            clear_state_cookie(response)
        }
        Err(refused) => clear_state_cookie(refusal_page(refused.status, &refused.message)),
    }
}
