//! Settings: the person's sessions (sign one out, or all), and the audit log.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method};
use maud::{html, Markup};
use serde::Deserialize;

use super::auth::carry_cookies;
use super::guard::{parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::audit_routes::{self, AuditFilter};
use crate::api::auth_routes;
use crate::api::extract::QueryParams;
use crate::api::AppState;

/// Audit events per page.
const AUDIT_PAGE: i64 = 50;

/// The settings' own navigation: the tabs this person may read.
pub fn tabs(signed: &Signed, current: &str) -> Markup {
    let tabs = [
        ("/ui/settings/sessions", "Sessions", "/v1/auth/sessions"),
        ("/ui/settings/security", "Security", "/v1/auth/me"),
        ("/ui/settings/members", "Members", "/v1/members"),
        ("/ui/settings/roles", "Roles", "/v1/roles"),
        ("/ui/settings/api-keys", "API keys", "/v1/api-keys"),
        ("/ui/settings/account", "Account", "/v1/account"),
        ("/ui/settings/sso", "Single sign-on", "/v1/account/sso"),
        ("/ui/settings/audit", "Audit log", "/v1/audit"),
    ];
    html! {
        nav.tabs aria-label="Settings" {
            ul {
                @for (href, label, api) in tabs {
                    @if signed.may(Method::GET, api) {
                        li {
                            @if href == current { a href=(href) aria-current="page" { (label) } }
                            @else { a href=(href) { (label) } }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct Done {
    #[serde(default)]
    pub done: Option<String>,
}

/// `GET /ui/settings/sessions`
pub async fn sessions(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/auth/sessions")?;
    let list = auth_routes::list_sessions(State(state), Extension(signed.principal.clone()))
        .await?
        .0;
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/sessions"))
        (layout::notice(done.done.as_deref()))
        h2 { "Sessions" }
        table id="sessions" {
            thead { tr { th { "Signed in" } th { "Last active" } th { "Address" } th { "Browser" } th { span.visually-hidden { "Action" } } } }
            tbody {
                @for s in &list.sessions {
                    tr data-session=(s.id) {
                        td { (layout::time(s.created_at)) @if s.current { " " strong { "(this browser)" } } }
                        td { (layout::time(s.last_seen_at)) }
                        td { (s.ip) }
                        td.wrap { (s.user_agent) }
                        td {
                            form method="post" action=(format!("/ui/settings/sessions/{}/sign-out", s.id)) {
                                (layout::csrf(&signed))
                                button type="submit" aria-label=(format!("Sign out the session from {} started {}", s.ip, s.created_at.format("%Y-%m-%d %H:%M"))) { "Sign out" }
                            }
                        }
                    }
                }
            }
        }
        form method="post" action="/ui/settings/sessions/sign-out-everywhere" {
            (layout::csrf(&signed))
            button.danger type="submit" id="sign-out-everywhere" { "Sign out everywhere" }
        }
    };
    Ok(layout::page("Sessions", &signed, Section::Settings, body))
}

/// `POST /ui/settings/sessions/{id}/sign-out`
pub async fn sign_out_session(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TokenForm>,
) -> Result<Response, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::DELETE,
        "/v1/auth/sessions/{id}",
    )?;
    let answer = auth_routes::revoke_session(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    // Signing out this very browser clears its cookie: then there is nothing left to show.
    let to = if id == signed.session_id() {
        "/ui/sign-in"
    } else {
        "/ui/settings/sessions?done=signed-out"
    };
    Ok(carry_cookies(&answer, Redirect::to(to).into_response()))
}

/// `POST /ui/settings/sessions/sign-out-everywhere`
pub async fn sign_out_everywhere(
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
        "/v1/auth/sessions/sign-out-everywhere",
    )?;
    let answer = auth_routes::sign_out_everywhere(
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

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    #[serde(default)]
    action: String,
    before: Option<i64>,
}

/// `GET /ui/settings/audit`: newest first, filtered by action, a page at a time.
pub async fn audit(
    State(state): State<AppState>,
    signed: Signed,
    Query(q): Query<AuditQuery>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/audit")?;
    let action = q.action.trim().chars().take(100).collect::<String>();
    let filter = AuditFilter {
        action: (!action.is_empty()).then(|| action.clone()),
        limit: Some(AUDIT_PAGE),
        before: q.before,
        ..Default::default()
    };
    let page = audit_routes::list(
        State(state),
        Extension(signed.principal.clone()),
        QueryParams(filter),
    )
    .await?
    .0;
    let next = page.next_before.map(|before| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("action", &action)
            .append_pair("before", &before.to_string());
        format!("/ui/settings/audit?{}", q.finish())
    });
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_default();
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/audit"))
        h2 { "Audit log" }
        form.filters method="get" action="/ui/settings/audit" role="search" {
            label for="action" { "Action" }
            input id="action" name="action" type="text" placeholder="user.logged_in" maxlength="100" value=(action);
            button type="submit" { "Filter" }
        }
        table id="audit" {
            thead { tr { th { "When" } th { "Action" } th { "Actor" } th { "Target" } th { "Result" } th { "Address" } } }
            tbody {
                @for e in &page.events {
                    tr {
                        td { (text(&e["timestamp"])) }
                        td { code { (text(&e["event"])) } }
                        td { (e["actor"]["email"].as_str().or(e["actor"]["type"].as_str()).unwrap_or("—")) }
                        td { (text(&e["resource"]["type"])) " " code { (layout::short(&text(&e["resource"]["id"]))) } }
                        td { (text(&e["result"])) }
                        td { (text(&e["actor"]["ip"])) }
                    }
                }
            }
        }
        @if page.events.is_empty() { p { "No events match." } }
        @if let Some(next) = next { p { a href=(next) rel="next" id="older-events" { "Older events" } } }
    };
    Ok(layout::page("Audit log", &signed, Section::Settings, body))
}
