//! Projects: the list, and creating one (its environment and hooks are set through the API
//! or the CLI for now).

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::Signed;
use super::layout::{self, Section};
use super::WebError;
use crate::api::extract::{JsonBody, QueryParams};
use crate::api::page::PageQuery;
use crate::api::projects::{self, CreateProject};
use crate::api::AppState;

/// `GET /ui/projects`
pub async fn list(State(state): State<AppState>, signed: Signed) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/projects")?;
    let found = projects::list(
        State(state),
        Extension(signed.principal.clone()),
        QueryParams(PageQuery {
            limit: Some(500),
            cursor: None,
        }),
    )
    .await?
    .0;
    let body = html! {
        h1 { "Projects" }
        @if found.projects.is_empty() {
            p { "No projects yet." }
        } @else {
            table id="projects" {
                thead { tr { th { "Name" } th { "Repository" } th { "Deploy path" } th { "Releases kept" } th { "Environment" } th { "Created" } } }
                tbody {
                    @for p in &found.projects {
                        tr {
                            td { (p.name) }
                            td { code.wrap { (p.repo_url) } }
                            td { code { (p.deploy_path) } }
                            td { (p.keep_releases) }
                            td { (p.env_names.join(", ")) }
                            td { (layout::time(p.created_at)) }
                        }
                    }
                }
            }
        }
        @if signed.may(Method::POST, "/v1/projects") {
            h2 { "New project" }
            form.stack method="post" action="/ui/projects" {
                (layout::csrf(&signed))
                label for="name" { "Name" }
                input id="name" name="name" type="text" required maxlength="200";
                label for="repo_url" { "Git repository URL" }
                input id="repo_url" name="repo_url" type="text" required maxlength="2048";
                label for="deploy_path" { "Deploy path on the servers (absolute)" }
                input id="deploy_path" name="deploy_path" type="text" required maxlength="1024" placeholder="/srv/app";
                label for="health_check" { "Health check command (optional)" }
                input id="health_check" name="health_check" type="text" maxlength="4096";
                button type="submit" id="create-project" { "Create project" }
            }
        }
    };
    Ok(layout::page("Projects", &signed, Section::Projects, body))
}

#[derive(Deserialize)]
pub struct NewProject {
    #[serde(default)]
    csrf: String,
    name: String,
    repo_url: String,
    deploy_path: String,
    #[serde(default)]
    health_check: String,
}

/// `POST /ui/projects`
pub async fn create(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<NewProject>,
) -> Result<Response, WebError> {
    signed.submit(&state, &headers, &form.csrf, Method::POST, "/v1/projects")?;
    let health_check = form.health_check.trim();
    let request = CreateProject {
        name: form.name,
        repo_url: form.repo_url,
        deploy_path: form.deploy_path,
        keep_releases: None,
        shared_paths: Vec::new(),
        hooks: Default::default(),
        health_check: (!health_check.is_empty()).then(|| health_check.to_owned()),
        hook_timeout_secs: None,
        env: Default::default(),
    };
    // The list shows the new project; the answer itself holds nothing more to show.
    let _created = projects::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(request),
    )
    .await?;
    Ok(Redirect::to("/ui/projects").into_response())
}
