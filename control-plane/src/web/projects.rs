//! Projects: the list and creating one; one project's settings (hooks, shared paths, health
//! check, releases kept) changed on its page; its environment by name, values write-only;
//! deleting it after a confirmation page.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::extract::JsonBody;
use crate::api::projects::{self, CreateProject, HookSet, ProjectView, UpdateProject};
use crate::api::AppState;

/// `GET /ui/projects`
pub async fn list(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/projects")?;
    let found = projects::list(
        State(state),
        Extension(signed.principal.clone()),
        super::all_rows(),
    )
    .await?
    .0;
    let body = html! {
        (layout::notice(done.done.as_deref()))
        h1 { "Projects" }
        @if found.projects.is_empty() {
            p { "No projects yet." }
        } @else {
            table id="projects" {
                thead { tr { th { "Name" } th { "Repository" } th { "Deploy path" } th { "Releases kept" } th { "Environment" } th { "Created" } } }
                tbody {
                    @for p in &found.projects {
                        tr {
                            td { a href=(format!("/ui/projects/{}", p.id)) { (p.name) } }
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

/// `?done=` after an action on a project's page.
#[derive(Deserialize, Default)]
pub struct Done {
    #[serde(default)]
    done: Option<String>,
}

async fn load(state: &AppState, signed: &Signed, id: uuid::Uuid) -> Result<ProjectView, WebError> {
    signed.require(Method::GET, "/v1/projects/{id}")?;
    Ok(projects::show(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?
    .0)
}

/// A list of commands or paths as a text area's content, one per line.
fn one_per_line(items: &[String]) -> String {
    items.join("\n")
}

/// `GET /ui/projects/{id}`
pub async fn show(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    let p = load(&state, &signed, id).await?;
    let can_edit = signed.may(Method::PATCH, "/v1/projects/{id}");
    let can_delete = signed.may(Method::DELETE, "/v1/projects/{id}");
    let hooks = [
        (
            "build",
            "Build commands (in the new release, before anything else)",
            &p.hooks.build,
        ),
        (
            "pre_switch",
            "Before the switch (the new release is complete, not yet live)",
            &p.hooks.pre_switch,
        ),
        (
            "post_switch",
            "After the switch (the new release is live)",
            &p.hooks.post_switch,
        ),
    ];
    let body = html! {
        (layout::notice(done.done.as_deref()))
        h1 { (p.name) }
        dl.facts id="project" {
            dt { "Repository" } dd { code.wrap { (p.repo_url) } }
            dt { "Deploy path" } dd { code { (p.deploy_path) } }
            dt { "Releases kept" } dd id="keep-releases" { (p.keep_releases) }
            dt { "Shared paths" } dd id="shared-paths" { (p.shared_paths.join(", ")) }
            dt { "Health check" } dd { code id="health-check" { (p.health_check.as_deref().unwrap_or("—")) } }
            dt { "Hook time limit" } dd { (p.hook_timeout_secs) " s" }
            @for (key, text, commands) in &hooks {
                dt { (text) } dd { @for c in commands.iter() { code.wrap data-hook=(key) { (c) } br; } }
            }
            dt { "Updated" } dd { (layout::time(p.updated_at)) }
        }
        h2 { "Environment" }
        p { "Values are write-only: they are stored encrypted, reach the servers in the release's "
            code { ".env" } ", and are never shown again. Setting a name that exists replaces its value." }
        @if p.env_names.is_empty() {
            p { "No variables." }
        } @else {
            table id="env" {
                thead { tr { th { "Name" } @if can_edit { th { "Remove" } } } }
                tbody {
                    @for name in &p.env_names {
                        tr data-env=(name) {
                            td { code { (name) } }
                            @if can_edit {
                                td {
                                    form method="post" action=(format!("/ui/projects/{id}/env/unset")) {
                                        (layout::csrf(&signed))
                                        input type="hidden" name="name" value=(name);
                                        button.danger type="submit" aria-label=(format!("Remove {name}")) { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if can_edit {
            form.inline method="post" action=(format!("/ui/projects/{id}/env")) id="env-form" {
                (layout::csrf(&signed))
                label for="env-name" { "Name" }
                input id="env-name" name="name" type="text" required maxlength="255" autocomplete="off";
                label for="env-value" { "Value" }
                input id="env-value" name="value" type="password" maxlength="8192" autocomplete="off";
                button type="submit" id="set-env" { "Set variable" }
            }
            h2 { "Settings" }
            form.stack method="post" action=(format!("/ui/projects/{id}")) id="project-form" {
                (layout::csrf(&signed))
                label for="name" { "Name" }
                input id="name" name="name" type="text" required maxlength="200" value=(p.name);
                label for="repo_url" { "Git repository URL" }
                input id="repo_url" name="repo_url" type="text" required maxlength="2048" value=(p.repo_url);
                label for="deploy_path" { "Deploy path on the servers (absolute)" }
                input id="deploy_path" name="deploy_path" type="text" required maxlength="1024" value=(p.deploy_path);
                label for="keep_releases" { "Successful releases kept (1–100)" }
                input id="keep_releases" name="keep_releases" type="number" min="1" max="100" required value=(p.keep_releases);
                label for="shared_paths" { "Shared paths kept across releases, one per line (a trailing / marks a directory)" }
                textarea id="shared_paths" name="shared_paths" rows="3" maxlength="4096" { (one_per_line(&p.shared_paths)) }
                @for (key, text, commands) in &hooks {
                    label for=(key) { (text) ", one command per line" }
                    textarea id=(key) name=(key) rows="3" maxlength="4096" { (one_per_line(commands)) }
                }
                label for="health_check" { "Health check command (empty: none)" }
                input id="health_check" name="health_check" type="text" maxlength="4096" value=(p.health_check.as_deref().unwrap_or(""));
                label for="hook_timeout_secs" { "Longest a hook may run, in seconds" }
                input id="hook_timeout_secs" name="hook_timeout_secs" type="number" min="1" required value=(p.hook_timeout_secs);
                button type="submit" id="save-project" { "Save" }
            }
        }
        @if can_delete {
            p { a.button.danger href=(format!("/ui/projects/{id}/delete")) id="delete-project" { "Delete project" } }
        }
    };
    Ok(layout::page(&p.name, &signed, Section::Projects, body))
}

#[derive(Deserialize)]
pub struct EditProject {
    #[serde(default)]
    csrf: String,
    name: String,
    repo_url: String,
    deploy_path: String,
    keep_releases: String,
    #[serde(default)]
    shared_paths: String,
    #[serde(default)]
    build: String,
    #[serde(default)]
    pre_switch: String,
    #[serde(default)]
    post_switch: String,
    #[serde(default)]
    health_check: String,
    hook_timeout_secs: String,
}

fn number(text: &str, what: &str) -> Result<i32, WebError> {
    text.trim().parse().map_err(|_| {
        WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} must be a whole number"),
        )
    })
}

fn line_list(text: &str) -> Vec<String> {
    layout::lines(text).map(str::to_owned).collect()
}

/// Calls the API's update with a change; the project's page shows the result.
async fn update(
    state: AppState,
    signed: &Signed,
    id: uuid::Uuid,
    change: UpdateProject,
) -> Result<(), WebError> {
    // The project's page shows the result; the answer holds nothing more.
    let _changed = projects::update(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        JsonBody(change),
    )
    .await?;
    Ok(())
}

/// `POST /ui/projects/{id}`: the settings form (every field, as the page showed them).
pub async fn edit(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<EditProject>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/projects/{id}",
    )?;
    let change = UpdateProject {
        name: Some(form.name),
        repo_url: Some(form.repo_url),
        deploy_path: Some(form.deploy_path),
        keep_releases: Some(number(&form.keep_releases, "releases kept")?),
        shared_paths: Some(line_list(&form.shared_paths)),
        hooks: Some(HookSet {
            build: line_list(&form.build),
            pre_switch: line_list(&form.pre_switch),
            post_switch: line_list(&form.post_switch),
        }),
        // The API reads "" as no health check.
        health_check: Some(form.health_check.trim().to_owned()),
        hook_timeout_secs: Some(number(&form.hook_timeout_secs, "the hook time limit")?),
        ..Default::default()
    };
    update(state, &signed, id, change).await?;
    Ok(Redirect::to(&format!("/ui/projects/{id}?done=saved")))
}

#[derive(Deserialize)]
pub struct EnvForm {
    #[serde(default)]
    csrf: String,
    name: String,
    #[serde(default)]
    value: String,
}

/// `POST /ui/projects/{id}/env`: sets one variable, keeping the others.
pub async fn set_env(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<EnvForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/projects/{id}",
    )?;
    let change = UpdateProject {
        env_set: [(form.name.trim().to_owned(), form.value)].into(),
        ..Default::default()
    };
    update(state, &signed, id, change).await?;
    Ok(Redirect::to(&format!("/ui/projects/{id}?done=env-set")))
}

/// `POST /ui/projects/{id}/env/unset`: removes one variable, keeping the others.
pub async fn unset_env(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<EnvForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/projects/{id}",
    )?;
    let change = UpdateProject {
        env_unset: vec![form.name],
        ..Default::default()
    };
    update(state, &signed, id, change).await?;
    Ok(Redirect::to(&format!("/ui/projects/{id}?done=env-unset")))
}

/// `GET /ui/projects/{id}/delete`: the confirmation step.
pub async fn confirm_delete(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::DELETE, "/v1/projects/{id}")?;
    let p = load(&state, &signed, id).await?;
    let body = html! {
        h1 { "Delete the project " (p.name) "?" }
        p { "Its environment is erased here, and every server it was deployed to gets a job that "
            "erases the copy in its shared directory. The releases on the servers and the "
            "application they run are left alone; its deployment history stays." }
        (layout::confirm_form(&signed, &format!("/ui/projects/{id}/delete"), "confirm-delete-project",
            "Delete project", &format!("/ui/projects/{id}")))
    };
    Ok(layout::page(
        "Delete project",
        &signed,
        Section::Projects,
        body,
    ))
}

/// `POST /ui/projects/{id}/delete`
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
        "/v1/projects/{id}",
    )?;
    projects::delete(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/projects?done=project-deleted"))
}
