//! Settings: the person's sessions (sign one out, or all), and the audit log.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method, StatusCode};
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
    /// A user's or API key's id.
    #[serde(default)]
    actor: String,
    /// The id of the object acted on.
    #[serde(default)]
    target: String,
    /// `datetime-local` fields (`2026-12-04T05:40`), read as UTC.
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before: Option<i64>,
}

impl AuditQuery {
    /// The API's filter for these fields: a malformed id or time is the person's mistake,
    /// said as such, never silently ignored.
    fn filter(&self) -> Result<AuditFilter, WebError> {
        let id = |text: &str, what: &str| -> Result<Option<uuid::Uuid>, WebError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            text.parse().map(Some).map_err(|_| {
                WebError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "the {what} is an id such as 3f0c2a9e-…, not {:?}",
                        text.chars().take(40).collect::<String>()
                    ),
                )
            })
        };
        let time = |text: &str, what: &str| -> Result<Option<DateTime<Utc>>, WebError> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            let parsed = DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .or_else(|_| {
                    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M")
                        .or_else(|_| {
                            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
                        })
                        .map(|t| t.and_utc())
                });
            parsed.map(Some).map_err(|_| {
                WebError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("{what} is a time such as 2026-12-04T05:40 (UTC)"),
                )
            })
        };
        let action = self.action.trim();
        Ok(AuditFilter {
            action: (!action.is_empty()).then(|| action.chars().take(100).collect()),
            actor: id(&self.actor, "actor")?,
            target: id(&self.target, "target")?,
            since: time(&self.since, "From")?,
            until: time(&self.until, "Until")?,
            limit: Some(AUDIT_PAGE),
            before: self.before,
        })
    }

    /// The query string of these filters (for the next page and the export).
    fn pairs(&self) -> form_urlencoded::Serializer<'static, String> {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("action", &self.action),
            ("actor", &self.actor),
            ("target", &self.target),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if !v.trim().is_empty() {
                q.append_pair(k, v.trim());
            }
        }
        q
    }
}

/// `GET /ui/settings/audit`: newest first, filtered by action, actor, target and time, a page
/// at a time; the same filters export as JSON lines.
pub async fn audit(
    State(state): State<AppState>,
    signed: Signed,
    Query(q): Query<AuditQuery>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/audit")?;
    let filter = q.filter()?;
    let page = audit_routes::list(
        State(state),
        Extension(signed.principal.clone()),
        QueryParams(filter),
    )
    .await?
    .0;
    let next = page.next_before.map(|before| {
        let mut pairs = q.pairs();
        pairs.append_pair("before", &before.to_string());
        format!("/ui/settings/audit?{}", pairs.finish())
    });
    let export = format!("/ui/settings/audit/export?{}", q.pairs().finish());
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_default();
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/audit"))
        h2 { "Audit log" }
        form.filters method="get" action="/ui/settings/audit" role="search" {
            label for="action" { "Action" }
            input id="action" name="action" type="text" placeholder="user.logged_in" maxlength="100" value=(q.action);
            label for="actor" { "Actor (user or API key id)" }
            input id="actor" name="actor" type="text" maxlength="36" value=(q.actor);
            label for="target" { "Target id" }
            input id="target" name="target" type="text" maxlength="36" value=(q.target);
            label for="since" { "From (UTC)" }
            input id="since" name="since" type="datetime-local" value=(q.since);
            label for="until" { "Until (UTC)" }
            input id="until" name="until" type="datetime-local" value=(q.until);
            button type="submit" { "Filter" }
        }
        p { a href=(export) id="export-audit" download="audit.jsonl" { "Export these events as JSON lines" } }
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

/// `GET /ui/settings/audit/export`: the API's JSON-lines export of the same filters (a viewer
/// gets their own events, an admin the account's), as a download.
pub async fn audit_export(
    State(state): State<AppState>,
    signed: Signed,
    Query(q): Query<AuditQuery>,
) -> Result<axum::response::Response, WebError> {
    signed.require(Method::GET, "/v1/audit/export")?;
    let filter = AuditFilter {
        limit: None,
        before: None,
        ..q.filter()?
    };
    let mut answer = audit_routes::export(
        State(state),
        Extension(signed.principal.clone()),
        QueryParams(filter),
    )
    .await?;
    answer.headers_mut().insert(
        http::header::CONTENT_DISPOSITION,
        http::HeaderValue::from_static("attachment; filename=\"audit.jsonl\""),
    );
    Ok(answer)
}
