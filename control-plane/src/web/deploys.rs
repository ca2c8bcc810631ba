//! Deployments: the history, one deployment with its live log, and the deploy form.

use std::collections::HashMap;

use axum::extract::{Path, Query, RawQuery, State};
use axum::response::Redirect;
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;
use uuid::Uuid;

use super::guard::{parse_id, Signed};
use super::layout::{self, Section};
use super::WebError;
use crate::api::deployments::{
    self, CreateDeployment, DeploymentFilter, DeploymentView, LogQuery, RollbackRequest,
};
use crate::api::extract::{JsonBody, OptionalJsonBody, QueryParams};
use crate::api::idempotency::IdempotencyKey;
use crate::api::{projects, servers, AppState};

/// The account's project and server names, to show names instead of ids (only those the
/// person may read).
#[derive(Default)]
pub struct Names {
    pub projects: Vec<(Uuid, String)>,
    pub servers: Vec<(Uuid, String)>,
    by_id: HashMap<Uuid, String>,
}

impl Names {
    pub async fn load(state: &AppState, signed: &Signed) -> Result<Self, WebError> {
        let mut names = Self::default();
        if signed.may(Method::GET, "/v1/projects") {
            let found = projects::list(
                State(state.clone()),
                Extension(signed.principal.clone()),
                super::all_rows(),
            )
            .await?
            .0;
            names.projects = found.projects.into_iter().map(|p| (p.id, p.name)).collect();
        }
        if signed.may(Method::GET, "/v1/servers") {
            let found = servers::list(
                State(state.clone()),
                Extension(signed.principal.clone()),
                RawQuery(Some("limit=500".into())),
            )
            .await?
            .0;
            names.servers = found.servers.into_iter().map(|s| (s.id, s.name)).collect();
        }
        names.by_id = names
            .projects
            .iter()
            .chain(names.servers.iter())
            .cloned()
            .collect();
        Ok(names)
    }

    pub fn of(&self, id: Uuid) -> String {
        self.by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| layout::short(&id.to_string()).to_owned())
    }
}

/// The history table the deployments page and a server's page share.
pub fn deployment_table(list: &[DeploymentView], names: &Names) -> Markup {
    html! {
        @if list.is_empty() {
            p { "No deployments yet." }
        } @else {
            table.deployments {
                thead { tr { th { "Deployment" } th { "Project" } th { "Server" } th { "Ref" } th { "Status" } th { "Queued" } th { "Duration" } } }
                tbody {
                    @for d in list {
                        tr {
                            td { a href=(format!("/ui/deployments/{}", d.id)) { (d.kind) " " (layout::short(&d.id.to_string())) } }
                            td { (names.of(d.project_id)) }
                            td { a href=(format!("/ui/servers/{}", d.server_id)) { (names.of(d.server_id)) } }
                            td { code { (d.git_ref.as_deref().unwrap_or("—")) } }
                            td { (layout::status(&d.status)) }
                            td { (layout::time(d.created_at)) }
                            td { @if let Some(s) = d.duration_secs { (format!("{s:.1} s")) } @else { "—" } }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
pub struct HistoryFilter {
    #[serde(default)]
    status: String,
    #[serde(default)]
    cursor: String,
}

/// `GET /ui/deployments`
pub async fn list(
    State(state): State<AppState>,
    signed: Signed,
    Query(f): Query<HistoryFilter>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/deployments")?;
    let status = ["queued", "running", "succeeded", "failed"]
        .into_iter()
        .find(|s| *s == f.status);
    let filter = DeploymentFilter {
        status: status.map(str::to_owned),
        limit: Some(50),
        cursor: (!f.cursor.is_empty()).then(|| f.cursor.clone()),
        ..Default::default()
    };
    let found = deployments::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        QueryParams(filter),
    )
    .await?
    .0;
    let names = Names::load(&state, &signed).await?;
    let can_deploy = signed.may(Method::POST, "/v1/deployments")
        && !names.projects.is_empty()
        && !names.servers.is_empty();
    let next = found.next_cursor.as_ref().map(|c| {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("status", status.unwrap_or(""))
            .append_pair("cursor", c);
        format!("/ui/deployments?{}", q.finish())
    });
    let body = html! {
        h1 { "Deployments" }
        @if can_deploy {
            form.inline method="post" action="/ui/deployments" id="deploy-form" {
                (layout::csrf(&signed))
                label for="project_id" { "Project" }
                select id="project_id" name="project_id" required {
                    @for (id, name) in &names.projects { option value=(id) { (name) } }
                }
                label for="server_id" { "Server" }
                select id="server_id" name="server_id" required {
                    @for (id, name) in &names.servers { option value=(id) { (name) } }
                }
                label for="ref" { "Branch, tag or commit" }
                input id="ref" name="ref" type="text" required maxlength="255" value="main";
                button type="submit" id="deploy" { "Deploy" }
            }
        }
        form.filters method="get" action="/ui/deployments" role="search" {
            label for="status" { "Status" }
            select id="status" name="status" {
                @for (value, text) in [("", "All"), ("queued", "Queued"), ("running", "Running"), ("succeeded", "Succeeded"), ("failed", "Failed")] {
                    option value=(value) selected[status.unwrap_or("") == value] { (text) }
                }
            }
            button type="submit" { "Filter" }
        }
        (deployment_table(&found.deployments, &names))
        @if let Some(next) = next { p { a href=(next) rel="next" { "Older deployments" } } }
    };
    Ok(layout::page(
        "Deployments",
        &signed,
        Section::Deployments,
        body,
    ))
}

/// `GET /ui/deployments/{id}`: the facts, and the log, followed live while it runs.
pub async fn show(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::GET, "/v1/deployments/{id}")?;
    signed.require(Method::GET, "/v1/deployments/{id}/logs")?;
    let d = deployments::show(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?
    .0;
    let answer = deployments::logs(
        State(state.clone()),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        QueryParams(LogQuery {
            follow: false,
            after: None,
        }),
        HeaderMap::new(),
    )
    .await?;
    let log: serde_json::Value = super::json_body(answer).await?;
    let lines = log["lines"].as_array().cloned().unwrap_or_default();
    let last = lines.last().and_then(|l| l["id"].as_i64()).unwrap_or(0);
    let names = Names::load(&state, &signed).await?;
    let finished = matches!(d.status.as_str(), "succeeded" | "failed");
    let earlier =
        if d.status == "succeeded" && signed.may(Method::POST, "/v1/deployments/{id}/rollback") {
            Some(earlier_releases(&state, &signed, &d).await?)
        } else {
            None
        };
    let body = html! {
        h1 { (d.kind) " of " (names.of(d.project_id)) " to " (names.of(d.server_id)) }
        // The script refreshes the fields marked `data-field` from the API when the log
        // stream announces the end (commit, release and timings are known only then).
        dl.facts id="deployment" data-view=(format!("/v1/deployments/{id}")) {
            dt { "Status" } dd id="deployment-status" { (layout::status(&d.status)) }
            dt { "Ref" } dd { code { (d.git_ref.as_deref().unwrap_or("—")) } }
            dt { "Commit" } dd { code id="commit" data-field="commit" { (d.commit.as_deref().unwrap_or("—")) } }
            dt { "Release" } dd { code id="release" data-field="release_id" { (d.release_id.as_deref().unwrap_or("—")) } }
            dt { "Server" } dd { a href=(format!("/ui/servers/{}", d.server_id)) { (names.of(d.server_id)) } }
            dt { "Queued by" } dd { (d.queued_by.as_ref().and_then(|q| q.email.as_deref()).unwrap_or("the platform")) }
            dt { "Queued" } dd { (layout::time(d.created_at)) }
            dt { "Started" } dd data-field="started_at" { (layout::maybe_time(d.started_at)) }
            dt { "Finished" } dd data-field="finished_at" { (layout::maybe_time(d.finished_at)) }
            dt { "Duration" } dd data-field="duration_secs" { @if let Some(s) = d.duration_secs { (format!("{s:.1} s")) } @else { "—" } }
            dt { "Failed at" }
            dd id="failed-step" data-field="error" {
                @if let Some(e) = &d.error { (e.step) ": " (e.message) } @else { "—" }
            }
            @if let Some(r) = d.rollout_id {
                dt { "Rollout" } dd { a href=(format!("/ui/rollouts/{r}")) { (layout::short(&r.to_string())) } }
            }
        }
        @if let Some(earlier) = &earlier {
            form.inline method="post" action=(format!("/ui/deployments/{id}/rollback")) id="rollback-form" {
                (layout::csrf(&signed))
                label for="to_release" { "Roll this server back to" }
                select id="to_release" name="to_release" {
                    option value="" { "the good release before the current one" }
                    @for (release, commit, at) in earlier {
                        option value=(release) { (release) " (" (layout::short(commit)) ", " (at.format("%Y-%m-%d %H:%M UTC")) ")" }
                    }
                }
                button type="submit" id="rollback" { "Roll back" }
            }
        }
        h2 id="log-heading" { "Log" }
        // Followed while it runs, and also when the page holds only the first read of a long
        // log: the stream sends the rest, then the end.
        @let more = lines.len() as i64 >= deployments::LINES_PER_READ;
        @let follow = (!finished || more).then(|| format!("/v1/deployments/{id}/logs?follow=true&after={last}"));
        pre.log id="log" aria-labelledby="log-heading" aria-live="polite" tabindex="0"
            data-follow=[follow] {
            @for l in &lines {
                span class=(format!("line {}", l["stream"].as_str().unwrap_or("sensei"))) data-id=(l["id"].as_i64().unwrap_or(0)) {
                    (l["line"].as_str().unwrap_or_default()) "\n"
                }
            }
        }
    };
    Ok(layout::page(
        "Deployment",
        &signed,
        Section::Deployments,
        body,
    ))
}

/// The releases a rollback from this deployment may return to: those successful deploys of
/// its project made on its server, newest first, as many as the project keeps (older ones
/// were pruned from the server), without the one this deployment made.
async fn earlier_releases(
    state: &AppState,
    signed: &Signed,
    d: &DeploymentView,
) -> Result<Vec<(String, String, chrono::DateTime<chrono::Utc>)>, WebError> {
    if !signed.may(Method::GET, "/v1/projects/{id}") {
        return Ok(Vec::new());
    }
    let kept = projects::show(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(d.project_id),
    )
    .await?
    .0
    .keep_releases;
    let filter = DeploymentFilter {
        project_id: Some(d.project_id),
        server_id: Some(d.server_id),
        status: Some("succeeded".into()),
        kind: Some("deploy".into()),
        limit: Some(100),
        ..Default::default()
    };
    let found = deployments::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        QueryParams(filter),
    )
    .await?
    .0;
    let mut seen = std::collections::HashSet::new();
    Ok(found
        .deployments
        .into_iter()
        .filter_map(|e| Some((e.release_id?, e.commit.unwrap_or_default(), e.created_at)))
        .filter(|(release, _, _)| seen.insert(release.clone()))
        .take(usize::try_from(kept).unwrap_or(0))
        .filter(|(release, _, _)| Some(release) != d.release_id.as_ref())
        .collect())
}

#[derive(Deserialize)]
pub struct RollbackForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    to_release: String,
}

#[derive(Deserialize)]
pub struct DeployForm {
    #[serde(default)]
    csrf: String,
    project_id: String,
    server_id: String,
    #[serde(rename = "ref")]
    git_ref: String,
}

/// `POST /ui/deployments`: queues a deploy and shows it.
pub async fn create(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<DeployForm>,
) -> Result<Redirect, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/deployments",
    )?;
    let unknown = |_| {
        WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "choose a project and a server",
        )
    };
    let request = CreateDeployment {
        project_id: form.project_id.parse().map_err(unknown)?,
        server_id: form.server_id.parse().map_err(unknown)?,
        git_ref: form.git_ref,
    };
    let answer = deployments::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        IdempotencyKey(None),
        JsonBody(request),
    )
    .await?;
    let id = super::created_id(answer, "deploy").await?;
    Ok(Redirect::to(&format!("/ui/deployments/{id}")))
}

/// `POST /ui/deployments/{id}/rollback`: queues a rollback of the deployment's server to the
/// chosen release, or to the good release before the current one (the API's default), and
/// shows it.
pub async fn rollback(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<RollbackForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/deployments/{id}/rollback",
    )?;
    let answer = deployments::rollback(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        IdempotencyKey(None),
        crate::api::extract::Path(id),
        // The API checks the release is one this project made on this server.
        OptionalJsonBody(Some(RollbackRequest {
            to_release: layout::lines(&form.to_release).next().map(str::to_owned),
        })),
    )
    .await?;
    let new_id = super::created_id(answer, "rollback").await?;
    Ok(Redirect::to(&format!("/ui/deployments/{new_id}")))
}
