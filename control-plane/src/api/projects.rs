//! Projects: what to deploy and how. The environment is a secret: sealed with the field key,
//! written to the server as `shared/.env` (0600), never returned by the API (only its names).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use sensei_shared::release;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path, QueryParams};
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::auth::Principal;
use crate::jobs;

const MAX_ENV_VARS: usize = 500;
const MAX_HOOKS: usize = 50;

#[derive(Deserialize, Serialize, ToSchema, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct HookSet {
    #[serde(default)]
    pub build: Vec<String>,
    #[serde(default)]
    pub pre_switch: Vec<String>,
    #[serde(default)]
    pub post_switch: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub repo_url: String,
    /// Absolute path on the server, e.g. `/srv/app`.
    pub deploy_path: String,
    /// Successful releases kept (1–100, default 5).
    pub keep_releases: Option<i32>,
    /// Relative paths kept across releases; a trailing `/` marks a directory.
    #[serde(default)]
    pub shared_paths: Vec<String>,
    #[serde(default)]
    pub hooks: HookSet,
    /// Run in the new release before the switch; a non-zero exit fails the deploy.
    pub health_check: Option<String>,
    /// Longest a hook may run, in seconds (default 600).
    pub hook_timeout_secs: Option<i32>,
    /// Secret: stored encrypted, never returned.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateProject {
    pub name: Option<String>,
    pub repo_url: Option<String>,
    pub deploy_path: Option<String>,
    pub keep_releases: Option<i32>,
    pub shared_paths: Option<Vec<String>>,
    pub hooks: Option<HookSet>,
    /// `""` removes the health check.
    pub health_check: Option<String>,
    pub hook_timeout_secs: Option<i32>,
    /// Replaces the whole environment.
    pub env: Option<BTreeMap<String, String>>,
    /// Variables to add or replace, keeping the others (values write-only, as `env`).
    #[serde(default)]
    pub env_set: BTreeMap<String, String>,
    /// Variable names to remove, keeping the others.
    #[serde(default)]
    pub env_unset: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ProjectView {
    pub id: Uuid,
    pub name: String,
    pub repo_url: String,
    pub deploy_path: String,
    pub keep_releases: i32,
    pub shared_paths: Vec<String>,
    pub hooks: HookSet,
    pub health_check: Option<String>,
    pub hook_timeout_secs: i32,
    /// Names of the environment variables; values are never returned.
    pub env_names: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// On `PATCH` only: unfinished rollouts of this project, which keep deploying the
    /// configuration they started with (abort and start them again to use the new one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollouts_keeping_their_configuration: Vec<Uuid>,
}

#[derive(Serialize, ToSchema)]
pub struct ProjectList {
    pub projects: Vec<ProjectView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// The project as it will be stored, validated with the release engine's own rules.
struct Checked {
    name: String,
    repo_url: String,
    deploy_path: String,
    keep_releases: i32,
    shared_paths: Vec<String>,
    hooks: HookSet,
    health_check: Option<String>,
    hook_timeout_secs: i32,
}

fn check(c: &Checked) -> Result<(), ApiError> {
    if c.name.trim().is_empty() || c.name.chars().count() > 200 {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidName,
            "name must be 1 to 200 characters",
        ));
    }
    release::check_repo_url(&c.repo_url)
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidRepoUrl, e.0))?;
    release::check_deploy_path(&c.deploy_path)
        .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidDeployPath, e.0))?;
    if !(1..=100).contains(&c.keep_releases) {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidKeepReleases,
            "keep_releases must be between 1 and 100",
        ));
    }
    for p in &c.shared_paths {
        release::check_shared_path(p)
            .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidSharedPath, e.0))?;
    }
    let hooks = c
        .hooks
        .build
        .iter()
        .chain(&c.hooks.pre_switch)
        .chain(&c.hooks.post_switch);
    if hooks.clone().count() > MAX_HOOKS {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidHooks,
            format!("at most {MAX_HOOKS} hook commands"),
        ));
    }
    for h in hooks.chain(c.health_check.iter()) {
        if h.trim().is_empty() || h.len() > 4096 || h.contains('\0') {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidHooks,
                "hook commands are non-empty text of at most 4096 bytes",
            ));
        }
    }
    if !(1..=86_400).contains(&c.hook_timeout_secs) {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidHookTimeout,
            "hook_timeout_secs must be between 1 and 86400",
        ));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if env.len() > MAX_ENV_VARS {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidEnv,
            format!("at most {MAX_ENV_VARS} variables"),
        ));
    }
    for (k, v) in env {
        release::check_env_name(k)
            .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidEnv, e.0))?;
        if v.contains('\0') || v.len() > 65_536 {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidEnv,
                format!("value of {k} is not storable text"),
            ));
        }
    }
    Ok(())
}

const SELECT: &str = "SELECT id, name, repo_url, deploy_path, keep_releases, shared_paths, hooks, \
     health_check, hook_timeout_secs, env_names, created_at, updated_at FROM projects \
     WHERE account_id = $1 AND deleted_at IS NULL";

fn view(r: &tokio_postgres::Row) -> ProjectView {
    ProjectView {
        id: r.get(0),
        name: r.get(1),
        repo_url: r.get(2),
        deploy_path: r.get(3),
        keep_releases: r.get(4),
        shared_paths: r.get(5),
        hooks: serde_json::from_value(r.get(6)).unwrap_or_default(),
        health_check: r.get(7),
        hook_timeout_secs: r.get(8),
        env_names: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
        rollouts_keeping_their_configuration: Vec::new(),
    }
}

async fn load(state: &AppState, account: Uuid, id: Uuid) -> Result<ProjectView, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(&format!("{SELECT} AND id = $2"), &[&account, &id])
        .await?
        .ok_or_else(|| ApiError::not_found("project"))?;
    Ok(view(&row))
}

fn seal_env(
    state: &AppState,
    env: &BTreeMap<String, String>,
) -> Result<(Option<String>, Vec<String>), ApiError> {
    if env.is_empty() {
        return Ok((None, Vec::new()));
    }
    let plain = serde_json::to_vec(env).map_err(|_| ApiError::internal("encoding env"))?;
    Ok((
        Some(state.keys.encrypt(&plain)),
        env.keys().cloned().collect(),
    ))
}

/// A project outside the caller's resource scope is "not found", as another account's is.
pub(super) fn in_reach(principal: &Principal, id: Uuid) -> Result<(), ApiError> {
    if principal.reach.reaches_project(id) {
        Ok(())
    } else {
        Err(ApiError::not_found("project"))
    }
}

/// Changing a project (its hooks, paths, environment, DNS, or deleting it) reaches every
/// server it is deployed to, so a member limited to some servers may not: the next deploy by
/// someone else, to a server outside their scope, would run what they wrote.
pub(super) fn may_change(principal: &Principal, id: Uuid) -> Result<(), ApiError> {
    in_reach(principal, id)?;
    if principal.reach.server_filter().is_some() {
        return Err(ApiError::outside_scope(
            "changing a project (it reaches servers beyond your server labels)",
        ));
    }
    Ok(())
}

/// Creates a project.
#[utoipa::path(post, path = "/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = ProjectView), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<CreateProject>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    let c = Checked {
        name: req.name.trim().to_owned(),
        repo_url: req.repo_url.trim().to_owned(),
        deploy_path: req.deploy_path.trim().trim_end_matches('/').to_owned(),
        keep_releases: req.keep_releases.unwrap_or(5),
        shared_paths: req.shared_paths,
        hooks: req.hooks,
        health_check: req.health_check.filter(|h| !h.trim().is_empty()),
        hook_timeout_secs: req.hook_timeout_secs.unwrap_or(600),
    };
    if !principal.reach.may_create_projects() {
        return Err(ApiError::outside_scope(
            "a new project (your scope names the projects you may reach)",
        ));
    }
    check(&c)?;
    check_env(&req.env)?;
    let (sealed, names) = seal_env(&state, &req.env)?;
    let id = Uuid::new_v4();
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO projects (id, account_id, name, repo_url, deploy_path, keep_releases, shared_paths, \
         hooks, health_check, hook_timeout_secs, env_ciphertext, env_names) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)",
        &[&id, &principal.account_id, &c.name, &c.repo_url, &c.deploy_path, &c.keep_releases,
          &c.shared_paths, &json!(c.hooks), &c.health_check, &c.hook_timeout_secs, &sealed, &names],
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "project.created",
            ("project", id),
            json!({"name": c.name, "env_names": names.join(" ")}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(load(&state, principal.account_id, id).await?),
    ))
}

/// Lists the account's projects.
#[utoipa::path(get, path = "/v1/projects", tag = "projects", params(PageQuery),
    responses((status = 200, body = ProjectList), (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    QueryParams(query): QueryParams<PageQuery>,
) -> Result<Json<ProjectList>, ApiError> {
    let page = query.page()?;
    let client = state.pool.get().await?;
    let rows = client
        .query(
            &format!(
                "{SELECT} AND ($2::uuid[] IS NULL OR id = ANY($2)){}",
                Page::keyset_sql("created_at", "id", Order::OldestFirst, 3)
            ),
            &[
                &principal.account_id,
                &principal.reach.project_filter(),
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
            ],
        )
        .await?;
    let (projects, next_cursor) = page
        .finish(rows.iter().map(view).collect(), |p: &ProjectView| {
            Cursor::at(p.created_at, p.id)
        });
    Ok(Json(ProjectList {
        projects,
        next_cursor,
    }))
}

/// One project (environment names only).
#[utoipa::path(get, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Json<ProjectView>, ApiError> {
    in_reach(&principal, id)?;
    Ok(Json(load(&state, principal.account_id, id).await?))
}

/// Changes a project. Changing `env` replaces the whole environment and is audited as
/// `project.env_updated` (names only).
#[utoipa::path(patch, path = "/v1/projects/{id}", tag = "projects", request_body = UpdateProject,
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 200, body = ProjectView), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    JsonBody(req): JsonBody<UpdateProject>,
) -> Result<Json<ProjectView>, ApiError> {
    may_change(&principal, id)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    // Read under the row lock: a concurrent update (an `env set` while someone edits the
    // hooks) waits here instead of writing back a stale copy of the other fields.
    let current = view(
        &tx.query_opt(
            &format!("{SELECT} AND id = $2 FOR UPDATE"),
            &[&principal.account_id, &id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("project"))?,
    );
    let settings_given = req.name.is_some()
        || req.repo_url.is_some()
        || req.deploy_path.is_some()
        || req.keep_releases.is_some()
        || req.shared_paths.is_some()
        || req.hooks.is_some()
        || req.health_check.is_some()
        || req.hook_timeout_secs.is_some();
    if settings_given {
        let c = Checked {
            name: req
                .name
                .map(|n| n.trim().to_owned())
                .unwrap_or(current.name),
            repo_url: req
                .repo_url
                .map(|n| n.trim().to_owned())
                .unwrap_or(current.repo_url),
            deploy_path: req
                .deploy_path
                .map(|p| p.trim().trim_end_matches('/').to_owned())
                .unwrap_or(current.deploy_path),
            keep_releases: req.keep_releases.unwrap_or(current.keep_releases),
            shared_paths: req.shared_paths.unwrap_or(current.shared_paths),
            hooks: req.hooks.unwrap_or(current.hooks),
            health_check: match req.health_check {
                Some(h) if h.trim().is_empty() => None,
                Some(h) => Some(h),
                None => current.health_check,
            },
            hook_timeout_secs: req.hook_timeout_secs.unwrap_or(current.hook_timeout_secs),
        };
        check(&c)?;
        tx.execute(
            "UPDATE projects SET name=$3, repo_url=$4, deploy_path=$5, keep_releases=$6, shared_paths=$7, \
             hooks=$8, health_check=$9, hook_timeout_secs=$10, updated_at=now() \
             WHERE id=$1 AND account_id=$2 AND deleted_at IS NULL",
            &[&id, &principal.account_id, &c.name, &c.repo_url, &c.deploy_path, &c.keep_releases,
              &c.shared_paths, &json!(c.hooks), &c.health_check, &c.hook_timeout_secs],
        )
        .await?;
        audit::append(
            &tx,
            state.keys.audit_keys(),
            &actor_event(
                &principal,
                &meta,
                "project.updated",
                ("project", id),
                json!({}),
            ),
        )
        .await?;
    }
    let env = if let Some(env) = req.env {
        if !req.env_set.is_empty() || !req.env_unset.is_empty() {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidField,
                "send either env (the whole environment) or env_set/env_unset (changes to it)",
            ));
        }
        Some(env)
    } else if !req.env_set.is_empty() || !req.env_unset.is_empty() {
        if let Some(both) = req.env_unset.iter().find(|n| req.env_set.contains_key(*n)) {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidEnv,
                format!("{both} is both in env_set and in env_unset"),
            ));
        }
        // A change to some variables: the rest are only known sealed, so it is merged here,
        // on the row this transaction has locked.
        let sealed: Option<String> = tx
            .query_one("SELECT env_ciphertext FROM projects WHERE id = $1", &[&id])
            .await?
            .get(0);
        let mut env: BTreeMap<String, String> = match sealed {
            Some(sealed) => {
                let plain = state.keys.decrypt(&sealed).map_err(|_| {
                    ApiError::internal("the project's environment cannot be decrypted with the configured field keys")
                })?;
                serde_json::from_slice(&plain)
                    .map_err(|_| ApiError::internal("the stored environment is not readable"))?
            }
            None => BTreeMap::new(),
        };
        for name in &req.env_unset {
            env.remove(name);
        }
        env.extend(req.env_set);
        Some(env)
    } else {
        None
    };
    if let Some(env) = &env {
        check_env(env)?;
        let (sealed, names) = seal_env(&state, env)?;
        tx.execute(
            "UPDATE projects SET env_ciphertext=$2, env_names=$3 WHERE id=$1",
            &[&id, &sealed, &names],
        )
        .await?;
        audit::append(
            &tx,
            state.keys.audit_keys(),
            &actor_event(
                &principal,
                &meta,
                "project.env_updated",
                ("project", id),
                json!({"env_names": names.join(" ")}),
            ),
        )
        .await?;
    }
    tx.commit().await?;
    let mut view = load(&state, principal.account_id, id).await?;
    view.rollouts_keeping_their_configuration = state
        .pool
        .get()
        .await?
        .query(
            "SELECT id FROM rollouts WHERE project_id = $1 AND finished_at IS NULL \
             AND repo_url IS NOT NULL ORDER BY created_at",
            &[&id],
        )
        .await?
        .iter()
        .map(|r| r.get("id"))
        .collect();
    Ok(Json(view))
}

/// Deletes a project (its deployment history stays).
#[utoipa::path(delete, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = Uuid, Path, description = "project id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    may_change(&principal, id)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE projects SET deleted_at = now(), env_ciphertext = NULL \
             WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL",
            &[&id, &principal.account_id],
        )
        .await?;
    if n == 0 {
        return Err(ApiError::not_found("project"));
    }
    // Its environment is erased here; the servers a deploy of it reached get one job that
    // erases theirs (`shared/.env`). Queued first: that locks the servers before any
    // deployment row, in the order server deletion locks them. A server that cannot take a
    // job now (revoked, deleted) is skipped: nothing reaches it any more.
    let deployed_to = jobs::queue::servers_deployed_to(&tx, id).await?;
    let forgets = jobs::queue::enqueue_many(
        &tx,
        &jobs::queue::NewJob {
            account_id: principal.account_id,
            created_by: Some(principal.user_id),
            project_id: Some(id),
            kind: jobs::JobKind::ForgetEnv,
            git_ref: None,
            rollback_of: None,
            rollout_id: None,
            expected_commit: None,
            rollback_to: None,
            timeout: state.dispatch_timeout,
            upgrade_version: None,
        },
        &deployed_to,
    )
    .await?;
    // Nothing of a deleted project runs any more: its queued jobs fail now, and its
    // unfinished rollouts stop (they queue no further batch).
    let failed = jobs::record::fail_for_deleted_project(&tx, id).await?;
    let stopped = tx
        .execute(
            "UPDATE rollouts SET state = 'aborted', finished_at = now(), updated_at = now() \
             WHERE project_id = $1 AND finished_at IS NULL",
            &[&id],
        )
        .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "project.deleted",
            ("project", id),
            json!({
                "queued_jobs_failed": failed,
                "rollouts_aborted": stopped,
                "env_removal_jobs": forgets.len(),
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    for (server, _) in &forgets {
        state.agents.wakes.wake(*server);
    }
    Ok(StatusCode::NO_CONTENT)
}
