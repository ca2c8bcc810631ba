//! Signing in through the account's identity provider (OpenID Connect): the page that offers
//! "Sign in with <provider>", the start that sends the browser there, and the callback it
//! comes back to. The API's `sso` module does the work; this is the browser's side.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{Signed, TokenForm};
use super::layout::{self, Section};
use super::settings::{tabs, Done};
use super::WebError;
use crate::api::extract::{ClientMeta, JsonBody};
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
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some(site) => site == "same-origin" || site == "none",
        // Browsers too old to send it: the state cookie still binds the callback to them.
        None => true,
    }
}

/// `GET /ui/sso/start?org=<slug>`: to the provider, with the state cookie set.
pub async fn start(
    State(state): State<AppState>,
    meta: ClientMeta,
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
    match sso::begin(&state, &meta, &q.org, None).await {
        Ok(begun) => Ok(to_provider(begun)),
        Err(e) => Ok(refusal_page(e.status(), e.message())),
    }
}

/// `GET /ui/sso/connect`: a signed-in member connects their identity at the account's
/// provider to themselves, then signs in through it from now on.
pub async fn connect(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    // Strictly our own page: a forged connect would tie someone else's identity at the
    // provider to this member, and let that someone sign in as them.
    let same_origin =
        headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) == Some("same-origin");
    if !same_origin {
        return Ok(refusal_page(
            StatusCode::FORBIDDEN,
            "connecting must start on this control plane's own settings page",
        ));
    }
    if let Err(e) =
        crate::api::auth_routes::require_recent_sign_in(&state.pool, &signed.principal).await
    {
        return Ok(refusal_page(e.status(), e.message()));
    }
    let Some(slug) = sso::stored_slug(&state, signed.principal.account_id).await? else {
        return Ok(refusal_page(
            StatusCode::NOT_FOUND,
            "this account has no single sign-on",
        ));
    };
    match sso::begin(&state, &signed.meta, &slug, Some(signed.principal.user_id)).await {
        Ok(begun) => Ok(to_provider(begun)),
        Err(e) => Ok(refusal_page(e.status(), e.message())),
    }
}

/// To the provider, with the started sign-in in the state cookie.
fn to_provider(begun: sso::Begun) -> Response {
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
    response
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
        HeaderValue::from_static(
            "sensei_sso=; Path=/ui/sso; HttpOnly; Secure; SameSite=Lax; Max-Age=0",
        ),
    );
    response
}

/// `GET /ui/sso/callback/{slug}`: where the account's provider sends the browser back.
pub async fn callback(
    State(state): State<AppState>,
    meta: ClientMeta,
    headers: HeaderMap,
    axum::extract::Path(slug): axum::extract::Path<String>,
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
        slug: &slug,
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

/// The roles a provider may hand out, for the form's choices.
const GRANTABLE_ROLES: [&str; 4] = ["viewer", "operator", "developer", "admin"];

/// `GET /ui/settings/sso`: the account's provider; a form for those who may change it.
pub async fn settings(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/account/sso")?;
    let current = match sso::show(State(state.clone()), Extension(signed.principal.clone())).await {
        Ok(settings) => Some(settings.0),
        Err(e) if e.status() == StatusCode::NOT_FOUND => None,
        Err(e) => return Err(e.into()),
    };
    let may_change = signed.may(Method::PUT, "/v1/account/sso");
    let text = |f: fn(&sso::SsoSettings) -> String| current.as_ref().map(f).unwrap_or_default();
    let role_map = text(|s| {
        s.role_map
            .iter()
            .map(|(value, role)| format!("{value}={role}"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let default_role = current
        .as_ref()
        .map(|s| s.default_role.clone())
        .unwrap_or_else(|| "viewer".into());
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/sso"))
        (layout::notice(done.done.as_deref()))
        h2 { "Single sign-on" }
        p { "Register Sensei at your identity provider as a web application with the redirect URI "
            code id="redirect-uri" { (sso::redirect_uri(&state, current.as_ref().map(|s| s.slug.as_str()).unwrap_or("<slug>"))) } ". "
            "docs/access.md explains the fields for Okta, Entra ID, Google and Keycloak." }
        @if let Some(s) = &current {
            dl.facts {
                dt { "Sign-in link" } dd { code id="sign-in-url" { (s.sign_in_url) } }
                dt { "Issuer" } dd { code id="issuer" { (s.issuer) } }
                dt { "Required" } dd { @if s.require_sso { "yes: members sign in only through the provider" } @else { "no" } }
                @if let Some(fp) = &s.ca_fingerprint { dt { "Provider CA" } dd { code { (fp) } } }
            }
        } @else {
            p id="sso-off" { "Single sign-on is not set up." }
        }
        @if let Some(s) = &current {
            p {
                "Members who already have a password connect their identity at "
                (s.display_name) " once, then sign in through it: "
                a.button href="/ui/sso/connect" id="connect-sso" { "Connect my " (s.display_name) " identity" }
            }
        }
        @if may_change {
            form.stack method="post" action="/ui/settings/sso" {
                (layout::csrf(&signed))
                label for="slug" { "Name people type to sign in (a-z, 0-9, -)" }
                input id="slug" name="slug" type="text" required maxlength="40" value=(text(|s| s.slug.clone()));
                label for="display_name" { "Provider name on the button" }
                input id="display_name" name="display_name" type="text" required maxlength="60" value=(text(|s| s.display_name.clone()));
                label for="issuer_url" { "Issuer (https://…)" }
                input id="issuer_url" name="issuer" type="url" required maxlength="512" value=(text(|s| s.issuer.clone()));
                label for="client_id" { "Client id" }
                input id="client_id" name="client_id" type="text" required maxlength="512" value=(text(|s| s.client_id.clone()));
                label for="client_secret" { "Client secret" @if current.is_some() { " (leave empty to keep the stored one)" } }
                input id="client_secret" name="client_secret" type="password" autocomplete="off" maxlength="1024";
                label for="scopes" { "Scopes (separated by spaces)" }
                input id="scopes" name="scopes" type="text" maxlength="2000" value=(current.as_ref().map(|s| s.scopes.join(" ")).unwrap_or_else(|| "openid email profile".into()));
                label for="allowed_domains" { "Email domains whose people may join (separated by spaces)" }
                input id="allowed_domains" name="allowed_domains" type="text" maxlength="4000" value=(text(|s| s.allowed_domains.join(" ")));
                label for="default_role" { "Role of a new member" }
                select id="default_role" name="default_role" {
                    @for role in GRANTABLE_ROLES {
                        option value=(role) selected[role == default_role] { (role) }
                    }
                }
                label for="role_claim" { "Claim that maps to roles (e.g. groups)" }
                input id="role_claim" name="role_claim" type="text" maxlength="100" value=(text(|s| s.role_claim.clone().unwrap_or_default()));
                label for="role_map" { "Claim value=role, one a line" }
                textarea id="role_map" name="role_map" rows="3" maxlength="8000" { (role_map) }
                label for="ca_pem" { "CA certificate of the provider (PEM). Empty keeps the stored one; none stored: the public web PKI" }
                textarea id="ca_pem" name="ca_pem" rows="3" maxlength="65536" {}
                label {
                    input id="require_sso" name="require_sso" type="checkbox" value="on" checked[current.as_ref().is_some_and(|s| s.require_sso)];
                    " Require single sign-on (owners keep a password with a second factor)"
                }
                button type="submit" id="save-sso" { "Save" }
            }
            @if current.is_some() {
                form method="post" action="/ui/settings/sso/remove" {
                    (layout::csrf(&signed))
                    button.danger type="submit" id="remove-sso" { "Remove single sign-on" }
                }
            }
        }
    };
    Ok(layout::page(
        "Single sign-on",
        &signed,
        Section::Settings,
        body,
    ))
}

#[derive(Deserialize)]
pub struct SettingsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    slug: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    issuer: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    scopes: String,
    #[serde(default)]
    allowed_domains: String,
    #[serde(default)]
    default_role: String,
    #[serde(default)]
    role_claim: String,
    #[serde(default)]
    role_map: String,
    #[serde(default)]
    ca_pem: String,
    #[serde(default)]
    require_sso: Option<String>,
}

/// `POST /ui/settings/sso`
pub async fn save_settings(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<SettingsForm>,
) -> Result<Redirect, WebError> {
    signed.submit(&state, &headers, &form.csrf, Method::PUT, "/v1/account/sso")?;
    let words = |text: &str| -> Vec<String> {
        text.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut role_map = std::collections::BTreeMap::new();
    for line in form
        .role_map
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let Some((value, role)) = line.rsplit_once('=') else {
            return Err(WebError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "each role mapping line is claim value=role",
            ));
        };
        role_map.insert(value.trim().to_owned(), role.trim().to_owned());
    }
    // An empty CA field keeps the stored one (the page never shows the certificate itself).
    let ca_pem = if form.ca_pem.trim().is_empty() {
        sso::stored_ca_pem(&state, signed.principal.account_id).await?
    } else {
        Some(form.ca_pem)
    };
    let change = sso::SsoChange {
        slug: form.slug,
        display_name: form.display_name,
        issuer: form.issuer,
        client_id: form.client_id,
        client_secret: (!form.client_secret.is_empty()).then_some(form.client_secret),
        scopes: Some(words(&form.scopes)),
        allowed_domains: words(&form.allowed_domains),
        default_role: Some(form.default_role),
        role_claim: Some(form.role_claim),
        role_map: Some(role_map),
        ca_pem,
        require_sso: form.require_sso.is_some(),
    };
    let _saved = sso::set(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(change),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/sso?done=saved"))
}

/// `POST /ui/settings/sso/remove`
pub async fn remove_settings(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Result<Redirect, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::DELETE,
        "/v1/account/sso",
    )?;
    sso::remove(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/sso?done=saved"))
}
