//! Rollouts: the list and starting one (servers chosen by labels, the strategy's knobs), and
//! one rollout with its progress followed live and the operator's commands (pause, resume,
//! approve, abort).

use axum::extract::{Path, State};
use axum::response::Redirect;
use axum::{Extension, Form};
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::deploys::Names;
use super::fleet::parse_labels;
use super::guard::{self, parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::WebError;
use crate::api::extract::{JsonBody, QueryParams};
use crate::api::idempotency::IdempotencyKey;
use crate::api::page::PageQuery;
use crate::api::rollouts::{self, CreateRollout, RolloutView, Selector};
use crate::api::AppState;
use sensei_shared::rollout::{OnHalt, Strategy};

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
    let can_start = signed.may(Method::POST, "/v1/rollouts") && !names.projects.is_empty();
    let defaults = Strategy::default();
    let body = html! {
        h1 { "Rollouts" }
        @if found.rollouts.is_empty() {
            p { "No rollouts yet." }
        } @else {
            table id="rollouts" {
                thead { tr { th { "Rollout" } th { "Project" } th { "Ref" } th { "State" } th { "Batches" } th { "Started" } } }
                tbody {
                    @for r in &found.rollouts {
                        tr {
                            td { a href=(format!("/ui/rollouts/{}", r.id)) { (layout::short(&r.id.to_string())) } }
                            @match (&r.upgrade_agent, r.project_id) {
                                (Some(upgrade), _) => {
                                    td { "Agent upgrade" }
                                    td { code { (upgrade.version) } }
                                }
                                (None, project) => {
                                    td { (project.map(|p| names.of(p)).unwrap_or_default()) }
                                    td { code { (r.git_ref.as_deref().unwrap_or_default()) } }
                                }
                            }
                            td { (layout::status(&r.state)) }
                            td { (r.current_batch.map(|b| b + 1).unwrap_or(0)) " / " (r.batch_count) }
                            td { (layout::time(r.created_at)) }
                        }
                    }
                }
            }
        }
        @if can_start {
            h2 { "Start a rollout" }
            form.stack method="post" action="/ui/rollouts" id="rollout-form" {
                (layout::csrf(&signed))
                label for="project_id" { "Project" }
                select id="project_id" name="project_id" required {
                    @for (id, name) in &names.projects { option value=(id) { (name) } }
                }
                label for="ref" { "Branch, tag or commit" }
                input id="ref" name="ref" type="text" required maxlength="255" value="main";
                label for="selector" { "Servers whose labels include all of these, one key=value per line" }
                textarea id="selector" name="selector" rows="2" required maxlength="4096" {}
                fieldset {
                    legend { "Strategy" }
                    label for="canary" { "Canary servers, deployed first and alone (0: none)" }
                    input id="canary" name="canary" type="number" min="0" required value=(defaults.canary);
                    label for="batch_size" { "Servers per batch after the canary (empty: a percentage)" }
                    input id="batch_size" name="batch_size" type="number" min="1";
                    label for="batch_percent" { "Or a batch as a percentage of the servers" }
                    input id="batch_percent" name="batch_percent" type="number" min="1" max="100" value=(defaults.batch_percent.unwrap_or(10));
                    label for="max_failures" { "Failed servers tolerated before halting" }
                    input id="max_failures" name="max_failures" type="number" min="0" required value=(defaults.max_failures);
                    label for="pause_seconds" { "Wait between batches, in seconds" }
                    input id="pause_seconds" name="pause_seconds" type="number" min="0" required value=(defaults.pause_seconds);
                    label for="unreachable_after_seconds" { "A server that does not take its job within this many seconds is unreachable" }
                    input id="unreachable_after_seconds" name="unreachable_after_seconds" type="number" min="1" required value=(defaults.unreachable_after_seconds);
                    label for="min_agent_version" { "Skip agents older than this version (empty: any version)" }
                    input id="min_agent_version" name="min_agent_version" type="text" maxlength="64" placeholder="1.4.0";
                    label { input id="manual_approval" name="manual_approval" type="checkbox" value="on"; " Wait for approval after the canary" }
                }
                fieldset {
                    legend { "When it halts" }
                    label { input type="radio" name="on_halt" value="stop" checked; " Stop: servers already switched stay on the new release" }
                    label { input type="radio" name="on_halt" value="rollback"; " Roll back the servers already switched" }
                }
                button type="submit" id="start-rollout" { "Start rollout" }
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
        super::all_rows(),
    )
    .await?
    .0;
    let names = Names::load(&state, &signed).await?;
    let key = state_key(&r);
    let body = html! {
        @match (&r.upgrade_agent, r.project_id) {
            (Some(upgrade), _) => h1 { "Agent upgrade to " code { (upgrade.version) } },
            (None, project) => h1 {
                "Rollout of " (project.map(|p| names.of(p)).unwrap_or_default())
                " at " code { (r.git_ref.as_deref().unwrap_or_default()) }
            },
        }
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

#[derive(Deserialize)]
pub struct NewRollout {
    #[serde(default)]
    csrf: String,
    project_id: String,
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    selector: String,
    canary: String,
    #[serde(default)]
    batch_size: String,
    #[serde(default)]
    batch_percent: String,
    max_failures: String,
    pause_seconds: String,
    unreachable_after_seconds: String,
    #[serde(default)]
    min_agent_version: String,
    #[serde(default)]
    manual_approval: Option<String>,
    #[serde(default)]
    on_halt: String,
}

/// A whole number from a form field; empty is `None`.
fn count(text: &str, what: &str) -> Result<Option<u32>, WebError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} must be a whole number, 0 or more"),
        )
    })
}

impl NewRollout {
    /// The strategy the form describes; the API validates it as any other.
    fn strategy(&self) -> Result<Strategy, WebError> {
        let defaults = Strategy::default();
        let batch_size = count(&self.batch_size, "the batch size")?;
        Ok(Strategy {
            canary: count(&self.canary, "the canary count")?.unwrap_or(defaults.canary),
            batch_size,
            // A batch size wins; the percentage is only sent without one.
            batch_percent: match batch_size {
                Some(_) => None,
                None => count(&self.batch_percent, "the batch percentage")?,
            },
            max_failures: count(&self.max_failures, "the failures tolerated")?
                .unwrap_or(defaults.max_failures),
            pause_seconds: count(&self.pause_seconds, "the wait between batches")?
                .unwrap_or(defaults.pause_seconds),
            manual_approval: self.manual_approval.is_some(),
            on_halt: if self.on_halt == "rollback" {
                OnHalt::Rollback
            } else {
                OnHalt::Stop
            },
            unreachable_after_seconds: count(
                &self.unreachable_after_seconds,
                "the unreachable time",
            )?
            .unwrap_or(defaults.unreachable_after_seconds),
            min_agent_version: Some(self.min_agent_version.trim().to_owned())
                .filter(|v| !v.is_empty()),
            upgrade_deadline_seconds: None,
        })
    }
}

/// `POST /ui/rollouts`: starts a rollout and shows it.
pub async fn create(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<NewRollout>,
) -> Result<Redirect, WebError> {
    signed.submit(&state, &headers, &form.csrf, Method::POST, "/v1/rollouts")?;
    let labels = parse_labels(&form.selector)?;
    if labels.is_empty() {
        // An empty selector would match every server: the form asks for one on purpose.
        return Err(WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "choose the servers by at least one label (key=value)",
        ));
    }
    let request =
        CreateRollout {
            project_id: Some(form.project_id.parse().map_err(|_| {
                WebError::new(StatusCode::UNPROCESSABLE_ENTITY, "choose a project")
            })?),
            git_ref: Some(form.git_ref.clone()),
            upgrade_agent: None,
            selector: Some(Selector { labels }),
            server_ids: None,
            strategy: Some(form.strategy()?),
        };
    let answer = rollouts::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        IdempotencyKey(None),
        JsonBody(request),
    )
    .await?;
    let id = super::created_id(answer, "rollout").await?;
    Ok(Redirect::to(&format!("/ui/rollouts/{id}")))
}
