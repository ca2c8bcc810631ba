//! Rollouts: the list, and one rollout with its progress followed live and the operator's
//! commands (pause, resume, approve, abort).

use axum::extract::{Path, State};
use axum::response::Redirect;
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};

use super::deploys::Names;
use super::guard::{self, parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::extract::QueryParams;
use crate::api::page::PageQuery;
use crate::api::rollouts::{self, RolloutView};
use crate::api::AppState;

/// The commands, their routes, and the rollout states each applies in (as the key
/// [`state_key`] makes; the page's script recomputes it from each event).
const COMMANDS: [(&str, &str, &str, &str); 4] = [
    ("pause", "Pause", "/v1/rollouts/{id}/pause", "running"),
    (
        "resume",
        "Resume",
        "/v1/rollouts/{id}/resume",
        "paused:operator",
    ),
    (
        "approve",
        "Approve",
        "/v1/rollouts/{id}/approve",
        "paused:approval",
    ),
    (
        "abort",
        "Abort",
        "/v1/rollouts/{id}/abort",
        "running paused:operator paused:approval",
    ),
];

/// The state as the commands care about it: a pause awaiting approval is not an operator's.
fn state_key(r: &RolloutView) -> String {
    match (r.state.as_str(), r.paused_reason.as_deref()) {
        ("paused", Some(reason)) if reason.contains("approval") => "paused:approval".into(),
        ("paused", _) => "paused:operator".into(),
        (other, _) => other.to_owned(),
    }
}

fn counts(r: &RolloutView) -> Markup {
    html! {
        ul.counts id="target-counts" {
            @for (status, n) in &r.target_counts {
                li data-count=(status) { (status) ": " (n) }
            }
        }
    }
}

/// `GET /ui/rollouts`
pub async fn list(State(state): State<AppState>, signed: Signed) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/rollouts")?;
    let found = rollouts::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        QueryParams(PageQuery {
            limit: Some(100),
            cursor: None,
        }),
    )
    .await?
    .0;
    let names = Names::load(&state, &signed).await?;
    let body = html! {
        h1 { "Rollouts" }
        @if found.rollouts.is_empty() {
            p { "No rollouts yet. Start one with " code { "sensei rollout" } " or " code { "POST /v1/rollouts" } "." }
        } @else {
            table id="rollouts" {
                thead { tr { th { "Rollout" } th { "Project" } th { "Ref" } th { "State" } th { "Batches" } th { "Started" } } }
                tbody {
                    @for r in &found.rollouts {
                        tr {
                            td { a href=(format!("/ui/rollouts/{}", r.id)) { (layout::short(&r.id.to_string())) } }
                            td { (names.of(r.project_id)) }
                            td { code { (r.git_ref) } }
                            td { (layout::status(&r.state)) }
                            td { (r.current_batch.map(|b| b + 1).unwrap_or(0)) " / " (r.batch_count) }
                            td { (layout::time(r.created_at)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page("Rollouts", &signed, Section::Rollouts, body))
}

/// `GET /ui/rollouts/{id}`
pub async fn show(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::GET, "/v1/rollouts/{id}")?;
    let r = rollouts::show(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?
    .0;
    let targets = rollouts::targets(
        State(state.clone()),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        QueryParams(PageQuery {
            limit: Some(500),
            cursor: None,
        }),
    )
    .await?
    .0;
    let names = Names::load(&state, &signed).await?;
    let key = state_key(&r);
    let body = html! {
        h1 { "Rollout of " (names.of(r.project_id)) " at " code { (r.git_ref) } }
        div id="rollout" data-follow=(format!("/v1/rollouts/{id}/events")) {
            dl.facts {
                dt { "State" } dd id="rollout-state" { (layout::status(&r.state)) }
                dt { "Why" } dd id="rollout-reason" { (r.paused_reason.as_deref().or(r.halted_reason.as_deref()).unwrap_or("—")) }
                dt { "Batch" } dd id="rollout-batch" { (r.current_batch.map(|b| b + 1).unwrap_or(0)) " of " (r.batch_count) }
                dt { "Commit" } dd { code { (r.commit.as_deref().unwrap_or("—")) } }
                dt { "Started" } dd { (layout::time(r.created_at)) }
                dt { "Finished" } dd { (layout::maybe_time(r.finished_at)) }
                dt { "Targets" } dd { (counts(&r)) }
            }
            div.actions {
                @for (command, label, api, when) in COMMANDS {
                    @if signed.may(Method::POST, api) {
                        form method="post" action=(format!("/ui/rollouts/{id}/{command}"))
                            data-when=(when) hidden[!when.split(' ').any(|w| w == key)] {
                            (layout::csrf(&signed))
                            @if command == "abort" {
                                button.danger type="submit" id=(format!("rollout-{command}")) { (label) }
                            } @else {
                                button type="submit" id=(format!("rollout-{command}")) { (label) }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Servers" }
        table id="targets" {
            thead { tr { th { "Server" } th { "Batch" } th { "Status" } th { "Deployment" } th { "Error" } } }
            tbody {
                @for t in &targets.targets {
                    // The script updates the status and error cells from each event.
                    tr data-target=(t.server_id) {
                        td { a href=(format!("/ui/servers/{}", t.server_id)) { (names.of(t.server_id)) } }
                        td { (t.batch + 1) }
                        td data-field="status" { (layout::status(&t.status)) }
                        td { @if let Some(d) = t.deployment_id { a href=(format!("/ui/deployments/{d}")) { (layout::short(&d.to_string())) } } @else { "—" } }
                        td data-field="error" { (t.error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    };
    Ok(layout::page("Rollout", &signed, Section::Rollouts, body))
}

/// `POST /ui/rollouts/{id}/{command}`
pub async fn steer(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path((id, command)): Path<(String, String)>,
    Form(form): Form<TokenForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    guard::check_form(&state, &headers, &signed, Some(&form.csrf))?;
    let Some((_, _, api, _)) = COMMANDS.iter().find(|c| c.0 == command) else {
        return Err(WebError::new(StatusCode::NOT_FOUND, "no such command"));
    };
    signed.require(Method::POST, api)?;
    let args = (
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    );
    // The rollout's page shows the new state; the answer itself is not needed.
    let _steered = match command.as_str() {
        "pause" => rollouts::pause(args.0, args.1, args.2, args.3).await?,
        "resume" => rollouts::resume(args.0, args.1, args.2, args.3).await?,
        "approve" => rollouts::approve(args.0, args.1, args.2, args.3).await?,
        _ => rollouts::abort(args.0, args.1, args.2, args.3).await?,
    };
    Ok(Redirect::to(&format!("/ui/rollouts/{id}")))
}
