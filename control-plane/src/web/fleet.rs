//! The fleet: every server and its agent, one server's details and recent deployments,
//! adding a server, and, each after a confirmation page, revoking an agent's certificate,
//! issuing a new enrollment token and deleting a server.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::deploys::{deployment_table, Names};
use super::guard::{parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::deployments::{self, DeploymentFilter};
use crate::api::extract::{JsonBody, QueryParams};
use crate::api::servers::{self, CreateServer, Enrollment, ServerView};
use crate::api::AppState;

#[derive(Deserialize, Default)]
pub struct FleetFilter {
    /// `key=value`
    #[serde(default)]
    label: String,
    /// `connected`, `offline` or empty for all.
    #[serde(default)]
    status: String,
    #[serde(default)]
    cursor: String,
    /// What was just done (a fixed notice).
    #[serde(default)]
    done: Option<String>,
}

fn labels(value: &serde_json::Value) -> Markup {
    html! {
        @if let Some(map) = value.as_object() {
            ul.labels {
                @for (k, v) in map {
                    li { code { (k) "=" (v.as_str().unwrap_or_default()) } }
                }
            }
        }
    }
}

/// `GET /ui/servers`
pub async fn list(
    State(state): State<AppState>,
    signed: Signed,
    Query(filter): Query<FleetFilter>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/servers")?;
    let label = filter.label.trim();
    // Built before the call: the serializer is not `Send`, and must not live across it.
    let query = {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("limit", "500");
        if !label.is_empty() {
            query.append_pair("label", label);
        }
        // Filtered by the API, so that each page holds the servers of that status.
        match filter.status.as_str() {
            "connected" => {
                query.append_pair("connected", "true");
            }
            "offline" => {
                query.append_pair("connected", "false");
            }
            _ => {}
        }
        if !filter.cursor.is_empty() {
            query.append_pair("cursor", &filter.cursor);
        }
        query.finish()
    };
    let found = servers::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        RawQuery(Some(query)),
    )
    .await?
    .0;
    let shown = &found.servers;
    let next = found.next_cursor.as_ref().map(|cursor| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("label", label)
            .append_pair("status", &filter.status)
            .append_pair("cursor", cursor);
        format!("/ui/servers?{}", q.finish())
    });
    let body = html! {
        (layout::notice(filter.done.as_deref()))
        div.heading {
            h1 { "Fleet" }
            @if signed.may(Method::POST, "/v1/servers") {
                a.button href="/ui/servers/new" id="add-server" { "Add a server" }
            }
        }
        form.filters method="get" action="/ui/servers" role="search" {
            label for="label" { "Label" }
            input id="label" name="label" type="text" placeholder="env=prod" maxlength="127" value=(label);
            label for="status" { "Status" }
            select id="status" name="status" {
                @for (value, text) in [("", "All"), ("connected", "Connected"), ("offline", "Not connected")] {
                    option value=(value) selected[filter.status == value] { (text) }
                }
            }
            button type="submit" { "Filter" }
        }
        @if shown.is_empty() {
            p { "No servers match." }
        } @else {
            // The script follows the agents' presence and updates the rows it finds.
            table id="servers" data-presence="/v1/servers/events" {
                thead { tr { th { "Name" } th { "Labels" } th { "Transport" } th { "Status" } th { "Last seen" } th { "Agent version" } th { "OS" } th { "Arch" } } }
                tbody {
                    @for s in shown {
                        tr data-server=(s.id) {
                            td { a href=(format!("/ui/servers/{}", s.id)) { (s.name) } }
                            td { (labels(&s.labels)) }
                            td { (s.transport) }
                            td data-field="presence" { (layout::status(s.presence())) }
                            td data-field="last_seen_at" { (layout::maybe_time(s.agent.last_seen_at)) }
                            td { (s.agent.version.as_deref().unwrap_or("—")) }
                            td { (s.agent.os.as_deref().unwrap_or("—")) }
                            td { (s.agent.arch.as_deref().unwrap_or("—")) }
                        }
                    }
                }
            }
        }
        @if let Some(next) = next { p { a href=(next) rel="next" { "Next page" } } }
    };
    Ok(layout::page("Fleet", &signed, Section::Fleet, body))
}

#[derive(Deserialize, Default)]
pub struct Done {
    #[serde(default)]
    done: Option<String>,
}

/// `GET /ui/servers/{id}`
pub async fn show(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    let server = load(&state, &signed, id).await?;
    let recent = if signed.may(Method::GET, "/v1/deployments") {
        let filter = DeploymentFilter {
            server_id: Some(id),
            limit: Some(20),
            ..Default::default()
        };
        Some(
            deployments::list(
                State(state.clone()),
                Extension(signed.principal.clone()),
                QueryParams(filter),
            )
            .await?
            .0
            .deployments,
        )
    } else {
        None
    };
    let names = Names::load(&state, &signed).await?;
    let a = &server.agent;
    let can_revoke = server.transport == "agent"
        && a.certificate_fingerprint.is_some()
        && signed.may(Method::DELETE, "/v1/servers/{id}/agent-certificate");
    let body = html! {
        (layout::notice(done.done.as_deref()))
        h1 { (server.name) }
        dl.facts data-server=(server.id)
            data-presence=[(server.transport == "agent").then(|| format!("/v1/servers/events?server_id={id}"))] {
            dt { "Host" } dd { (server.host) }
            dt { "Transport" } dd { (server.transport) }
            dt { "Labels" } dd { (labels(&server.labels)) }
            dt { "Status" } dd id="presence" data-field="presence" { (layout::status(server.presence())) }
            dt { "Last seen" } dd data-field="last_seen_at" { (layout::maybe_time(a.last_seen_at)) }
            @if server.transport == "agent" {
                dt { "Agent version" } dd { (a.version.as_deref().unwrap_or("—")) }
                dt { "Operating system" } dd id="agent-os" { (a.os.as_deref().unwrap_or("— (not reported yet)")) }
                dt { "Architecture" } dd id="agent-arch" { (a.arch.as_deref().unwrap_or("—")) }
                dt { "Certificate fingerprint" } dd { code id="cert-fingerprint" { (a.certificate_fingerprint.as_deref().unwrap_or("none (not enrolled, or revoked)")) } }
                dt { "Certificate serial" } dd { code id="cert-serial" { (a.certificate_serial.as_deref().unwrap_or("—")) } }
                dt { "Certificate expires" } dd { (layout::maybe_time(a.expires_at)) }
                dt { "CA fingerprint" } dd { code { (server.ca_fingerprint) } }
            } @else {
                dt { "SSH user" } dd { (server.username.as_deref().unwrap_or("—")) }
                dt { "SSH port" } dd { (server.port) }
                dt { "Authentication" } dd { (server.auth.as_deref().unwrap_or("—")) }
                dt { "Platform key fingerprint" } dd { code id="ssh-fingerprint" { (server.fingerprint.as_deref().unwrap_or("—")) } }
                dt { "Pinned host key" } dd { code.wrap { (server.host_key.as_deref().unwrap_or("—")) } }
            }
        }
        p.actions {
            @if server.transport == "agent" && signed.may(Method::POST, "/v1/servers/{id}/enrollment-token") {
                a.button href=(format!("/ui/servers/{id}/enrollment-token")) id="new-token" { "New enrollment token" }
                " "
            }
            @if can_revoke {
                a.button.danger href=(format!("/ui/servers/{id}/revoke-certificate")) id="revoke" { "Revoke agent certificate" }
                " "
            }
            @if signed.may(Method::DELETE, "/v1/servers/{id}") {
                a.button.danger href=(format!("/ui/servers/{id}/delete")) id="delete-server" { "Delete server" }
            }
        }
        @if let Some(recent) = recent {
            h2 { "Recent deployments" }
            (deployment_table(&recent, &names))
        }
    };
    Ok(layout::page(&server.name, &signed, Section::Fleet, body))
}

/// `GET /ui/servers/{id}/revoke-certificate`: the confirmation step.
pub async fn confirm_revoke(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::DELETE, "/v1/servers/{id}/agent-certificate")?;
    let server = load(&state, &signed, id).await?;
    let body = html! {
        h1 { "Revoke the agent certificate of " (server.name) "?" }
        p { "The agent is disconnected at once and cannot connect again with this certificate. "
            "Deployments to this server fail until an agent enrolls again with a new token." }
        p { "Certificate: " code { (server.agent.certificate_fingerprint.as_deref().unwrap_or("—")) } }
        (layout::confirm_form(&signed, &format!("/ui/servers/{id}/revoke-certificate"), "confirm-revoke",
            "Revoke agent certificate", &format!("/ui/servers/{id}")))
    };
    Ok(layout::page(
        "Revoke certificate",
        &signed,
        Section::Fleet,
        body,
    ))
}

/// `POST /ui/servers/{id}/revoke-certificate`
pub async fn revoke(
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
        "/v1/servers/{id}/agent-certificate",
    )?;
    servers::revoke_certificate(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to(&format!("/ui/servers/{id}?done=revoked")))
}

/// `GET /ui/servers/new`
pub async fn new_form(signed: Signed) -> Result<Markup, WebError> {
    signed.require(Method::POST, "/v1/servers")?;
    let body = html! {
        h1 { "Add a server" }
        form.stack method="post" action="/ui/servers/new" {
            (layout::csrf(&signed))
            label for="name" { "Name" }
            input id="name" name="name" type="text" required maxlength="200";
            label for="host" { "Host name or address" }
            input id="host" name="host" type="text" required maxlength="255";
            fieldset {
                legend { "How Sensei reaches it" }
                label { input type="radio" name="transport" value="agent" checked; " Agent (recommended)" }
                label { input type="radio" name="transport" value="ssh"; " SSH" }
            }
            label for="labels" { "Labels, one key=value per line" }
            textarea id="labels" name="labels" rows="3" maxlength="4096" {}
            fieldset {
                legend { "SSH only" }
                label for="username" { "User" }
                input id="username" name="username" type="text" maxlength="64";
                label for="port" { "Port" }
                input id="port" name="port" type="number" min="1" max="65535" value="22";
                label for="host_key" { "Host key (optional: pinned at first connection otherwise)" }
                input id="host_key" name="host_key" type="text" maxlength="8192";
            }
            button type="submit" id="create-server" { "Add server" }
        }
    };
    Ok(layout::page("Add a server", &signed, Section::Fleet, body))
}

#[derive(Deserialize)]
pub struct NewServer {
    #[serde(default)]
    csrf: String,
    name: String,
    host: String,
    #[serde(default)]
    transport: String,
    #[serde(default)]
    labels: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    host_key: String,
}

pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, WebError> {
    let mut labels = BTreeMap::new();
    for line in layout::lines(text) {
        let (k, v) = line.split_once('=').ok_or_else(|| {
            WebError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("label {line:?}: write key=value"),
            )
        })?;
        labels.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(labels)
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// `POST /ui/servers/new`: the answer shows the enrollment command or the public key, once.
pub async fn create(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<NewServer>,
) -> Result<Response, WebError> {
    signed.submit(&state, &headers, &form.csrf, Method::POST, "/v1/servers")?;
    let ssh = form.transport == "ssh";
    let port = if ssh {
        Some(form.port.trim().parse::<u16>().map_err(|_| {
            WebError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the port is a number from 1 to 65535",
            )
        })?)
    } else {
        None
    };
    let request = CreateServer {
        name: form.name,
        host: form.host,
        port,
        username: if ssh { non_empty(&form.username) } else { None },
        transport: if ssh { "ssh".into() } else { "agent".into() },
        auth: None,
        password: None,
        host_key: if ssh { non_empty(&form.host_key) } else { None },
        labels: parse_labels(&form.labels)?,
        enrollment_ttl_seconds: None,
    };
    let (_, created) = servers::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(request),
    )
    .await?;
    let created = created.0;
    let id = created.server.id;
    let body = html! {
        h1 { "Server " (created.server.name) " added" }
        @if let Some(e) = &created.enrollment {
            (enrollment(e, &created.server.ca_fingerprint))
        }
        @if let Some(key) = &created.public_key {
            p { "Add this line to the SSH user's " code { "~/.ssh/authorized_keys" }
                " on the server. It is shown only this once; its fingerprint stays on the server's page." }
            (layout::copyable("public-key", "the public key", key))
        }
        p { a href=(format!("/ui/servers/{id}")) { "Go to the server" } }
    };
    Ok((
        StatusCode::CREATED,
        layout::page("Server added", &signed, Section::Fleet, body),
    )
        .into_response())
}

/// An enrollment token's command, shown once (after adding a server, or a new token).
fn enrollment(e: &Enrollment, ca_fingerprint: &str) -> Markup {
    html! {
        p { "Run this on the server to enroll its agent. The token is single use, expires at "
            (layout::time(e.enrollment_expires_at)) ", and is shown only this once." }
        (layout::copyable("enroll-command", "the enroll command", &e.enroll_command))
        p { "The command pins the control plane's CA by its fingerprint: "
            code { (ca_fingerprint) } }
    }
}

async fn load(state: &AppState, signed: &Signed, id: uuid::Uuid) -> Result<ServerView, WebError> {
    signed.require(Method::GET, "/v1/servers/{id}")?;
    Ok(servers::show(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?
    .0)
}

/// `GET /ui/servers/{id}/enrollment-token`: the confirmation step.
pub async fn confirm_new_token(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::POST, "/v1/servers/{id}/enrollment-token")?;
    let server = load(&state, &signed, id).await?;
    let body = html! {
        h1 { "A new enrollment token for " (server.name) "?" }
        p { "Use it to enroll the agent again, for example after reinstalling the server or "
            "revoking its certificate. A token issued earlier and not used yet stops working. "
            "The agent's current certificate keeps working until the agent enrolls with the new token." }
        (layout::confirm_form(&signed, &format!("/ui/servers/{id}/enrollment-token"), "confirm-new-token",
            "Issue a new token", &format!("/ui/servers/{id}")))
    };
    Ok(layout::page(
        "New enrollment token",
        &signed,
        Section::Fleet,
        body,
    ))
}

/// `POST /ui/servers/{id}/enrollment-token`: the command with the new token, once.
pub async fn new_token(
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
        Method::POST,
        "/v1/servers/{id}/enrollment-token",
    )?;
    let server = load(&state, &signed, id).await?;
    let (_, issued) = servers::new_enrollment_token(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        axum::body::Bytes::new(),
    )
    .await?;
    let body = html! {
        h1 { "New enrollment token for " (server.name) }
        (enrollment(&issued.0, &server.ca_fingerprint))
        p { a href=(format!("/ui/servers/{id}")) { "Go to the server" } }
    };
    Ok((
        StatusCode::CREATED,
        layout::page("New enrollment token", &signed, Section::Fleet, body),
    )
        .into_response())
}

/// `GET /ui/servers/{id}/delete`: the confirmation step, with the order that keeps the
/// server safe.
pub async fn confirm_delete(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::DELETE, "/v1/servers/{id}")?;
    let server = load(&state, &signed, id).await?;
    let body = html! {
        h1 { "Delete the server " (server.name) "?" }
        p { "Deleting is a soft revoke: Sensei erases what it holds to reach this server "
            "and keeps the row, marked deleted, for the audit log. It does not log in to the "
            "server to undo anything there, and the application keeps running." }
        @if server.transport == "ssh" {
            p { "So do it in two steps, in this order:" }
            ol id="delete-advice" {
                li { "On the server, remove from the SSH user's " code { "~/.ssh/authorized_keys" }
                     " the line of Sensei's key, the one with this fingerprint ("
                     code { "ssh-keygen -lf ~/.ssh/authorized_keys" } " lists them): "
                     code { (server.fingerprint.as_deref().unwrap_or("—")) } ". "
                     "From then on Sensei cannot log in, whatever happens to its copy of the key." }
                li { "Then delete the server here, which erases the stored private key and password." }
            }
        } @else {
            p { "So do it in two steps, in this order:" }
            ol id="delete-advice" {
                li { "On the server, stop the agent and remove it, with its certificate and key." }
                li { "Then delete the server here: its certificate is revoked at once (a running "
                     "agent is disconnected) and unused enrollment tokens are erased." }
            }
        }
        (layout::confirm_form(&signed, &format!("/ui/servers/{id}/delete"), "confirm-delete-server",
            "Delete server", &format!("/ui/servers/{id}")))
    };
    Ok(layout::page("Delete server", &signed, Section::Fleet, body))
}

/// `POST /ui/servers/{id}/delete`
pub async fn delete(
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
        "/v1/servers/{id}",
    )?;
    servers::delete(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/servers?done=server-deleted"))
}
