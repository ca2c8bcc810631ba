//! Settings → Roles (the built-in roles, the account's custom roles: define, change, delete)
//! and a member's access page (their role, built-in or custom, and their resource scope).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::Redirect;
use axum::Extension;
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use uuid::Uuid;

use super::guard::{self, parse_id, Signed};
use super::layout::{self, Section};
use super::settings::{tabs, Done};
use super::WebError;
use crate::api::extract::JsonBody;
use crate::api::members::{self, RoleChange};
use crate::api::roles::{self, CreateRole, UpdateRole};
use crate::api::AppState;
use crate::identity::auth::Role;
use crate::identity::reach::ResourceScope;

/// The permission checkboxes of a role form, `checked` ticked.
fn permission_boxes(delegable: &[String], checked: &[String], id_prefix: &str) -> Markup {
    html! {
        fieldset {
            legend { "Permissions" }
            @for p in delegable {
                label {
                    input type="checkbox" name="permission" value=(p)
                        id=(format!("{id_prefix}-{}", p.replace(':', "-")))
                        checked[checked.contains(p)];
                    " " (p)
                }
            }
        }
    }
}

/// `GET /ui/settings/roles`
pub async fn page(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/roles")?;
    let list = roles::list(State(state), Extension(signed.principal.clone()))
        .await?
        .0;
    let may_create = signed.may(Method::POST, "/v1/roles");
    let may_change = signed.may(Method::PATCH, "/v1/roles/{id}");
    let may_delete = signed.may(Method::DELETE, "/v1/roles/{id}");
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/roles"))
        (layout::notice(done.done.as_deref()))
        h2 { "Built-in roles" }
        table id="built-in-roles" {
            thead { tr { th { "Role" } th { "Permissions" } } }
            tbody {
                @for r in &list.built_in {
                    tr { td { (r.name) } td { (r.permissions.join(", ")) } }
                }
            }
        }
        h2 { "Custom roles" }
        @if list.custom.is_empty() {
            p { "This account has no custom roles yet." }
        } @else {
            table id="custom-roles" {
                thead { tr { th { "Role" } th { "Permissions" } th { "Members" } @if may_change || may_delete { th { span.visually-hidden { "Actions" } } } } }
                tbody {
                    @for r in &list.custom {
                        tr data-role=(r.id) {
                            td { (r.name) }
                            td { (r.permissions.join(", ")) }
                            td { (r.members) }
                            @if may_change || may_delete {
                                td {
                                    @if may_change {
                                        details {
                                            summary { "Change permissions" }
                                            form.stack method="post" action=(format!("/ui/settings/roles/{}", r.id)) {
                                                (layout::csrf(&signed))
                                                (permission_boxes(&list.delegable, &r.permissions, &format!("role-{}", r.id)))
                                                button type="submit" { "Save " (r.name) }
                                            }
                                        }
                                    }
                                    @if may_delete && r.members == 0 {
                                        form.inline method="post" action=(format!("/ui/settings/roles/{}/delete", r.id)) {
                                            (layout::csrf(&signed))
                                            button.danger type="submit" aria-label=(format!("Delete the role {}", r.name)) { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if may_create {
            h2 { "New role" }
            p { "Member management, the account's settings, audit sinks and ownership stay with the admin and owner roles." }
            form.stack method="post" action="/ui/settings/roles" {
                (layout::csrf(&signed))
                label for="role-name" { "Name" }
                input id="role-name" name="name" type="text" required maxlength="64";
                (permission_boxes(&list.delegable, &[], "new"))
                button type="submit" id="create-role" { "Create role" }
            }
        }
    };
    Ok(layout::page("Roles", &signed, Section::Settings, body))
}

/// A role form as sent: the permissions are a repeated field.
struct RoleForm {
    csrf: String,
    name: Option<String>,
    permissions: Vec<String>,
}

fn role_form(body: &[u8]) -> RoleForm {
    let mut form = RoleForm {
        csrf: String::new(),
        name: None,
        permissions: Vec::new(),
    };
    for (name, value) in form_urlencoded::parse(body) {
        match &*name {
            "csrf" => form.csrf = value.into_owned(),
            "name" => form.name = Some(value.into_owned()),
            "permission" => form.permissions.push(value.into_owned()),
            _ => {}
        }
    }
    form
}

/// `POST /ui/settings/roles`
pub async fn create(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Redirect, WebError> {
    let form = role_form(&body);
    signed.submit(&state, &headers, &form.csrf, Method::POST, "/v1/roles")?;
    let _created = roles::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(CreateRole {
            name: form.name.unwrap_or_default(),
            permissions: form.permissions,
        }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/roles?done=created"))
}

/// `POST /ui/settings/roles/{id}`: the role's new permissions.
pub async fn update(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    let form = role_form(&body);
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/roles/{id}",
    )?;
    let _updated = roles::update(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        JsonBody(UpdateRole {
            name: None,
            permissions: Some(form.permissions),
        }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/roles?done=saved"))
}

/// `POST /ui/settings/roles/{id}/delete`
pub async fn delete(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Form(form): axum::Form<guard::TokenForm>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::DELETE,
        "/v1/roles/{id}",
    )?;
    roles::delete(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/roles?done=role-deleted"))
}

/// `GET /ui/settings/members/{id}/access`: a member's role and resource scope.
pub async fn access(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::PATCH, "/v1/members/{id}")?;
    let member = members::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        super::all_rows(),
    )
    .await?
    .0
    .members
    .into_iter()
    .find(|m| m.id == id)
    .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, "no such member"))?;
    let roles = roles::list(State(state.clone()), Extension(signed.principal.clone()))
        .await?
        .0;
    let projects = crate::api::projects::list(
        State(state),
        Extension(signed.principal.clone()),
        super::all_rows(),
    )
    .await?
    .0
    .projects;
    let scope = member.resource_scope.clone().unwrap_or_default();
    let scoped_projects = scope.projects.clone().unwrap_or_default();
    let labels = scope
        .server_labels
        .as_ref()
        .map(|l| {
            l.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let body = html! {
        h1 { "Access of " (member.email) }
        p { a href="/ui/settings/members" { "← Members" } }
        form.stack method="post" action=(format!("/ui/settings/members/{id}/access")) {
            (layout::csrf(&signed))
            label for="access-role" { "Role" }
            select id="access-role" name="role" {
                @for role in Role::ALL {
                    @if signed.principal.role >= role {
                        option value=(role.as_str()) selected[role.as_str() == member.role] { (role.as_str()) }
                    }
                }
                @for r in &roles.custom {
                    option value=(r.name) selected[r.name == member.role] { (r.name) " (custom)" }
                }
            }
            fieldset {
                legend { "What this member reaches" }
                label {
                    input type="radio" name="reach" value="all" id="reach-all" checked[member.resource_scope.is_none()];
                    " The whole account"
                }
                label {
                    input type="radio" name="reach" value="limited" id="reach-limited" checked[member.resource_scope.is_some()];
                    " Only the projects ticked and the servers with the labels below"
                }
            }
            fieldset {
                legend { "Projects (none ticked: every project)" }
                @for p in &projects {
                    label {
                        input type="checkbox" name="project" value=(p.id) id=(format!("project-{}", p.id))
                            checked[scoped_projects.contains(&p.id)];
                        " " (p.name)
                    }
                }
            }
            label for="server-labels" { "Servers: labels each must carry, one key=value per line (empty: every server)" }
            textarea id="server-labels" name="server_labels" rows="3" maxlength="4096" { (labels) }
            button type="submit" id="save-access" { "Save access" }
        }
    };
    Ok(layout::page(
        "Member access",
        &signed,
        Section::Settings,
        body,
    ))
}

/// `POST /ui/settings/members/{id}/access`
pub async fn save_access(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    let mut csrf = String::new();
    let mut role = None;
    let mut limited = None;
    let mut projects: Vec<Uuid> = Vec::new();
    let mut labels = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(&body) {
        match &*name {
            "csrf" => csrf = value.into_owned(),
            "role" => role = Some(value.into_owned()),
            "reach" => limited = Some(value == "limited"),
            "project" => projects.push(value.parse().map_err(|_| {
                WebError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "a project id is malformed",
                )
            })?),
            "server_labels" => {
                for line in value.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let (k, v) = line.split_once('=').ok_or_else(|| {
                        WebError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "write server labels as key=value, one per line",
                        )
                    })?;
                    labels.insert(k.trim().to_owned(), v.trim().to_owned());
                }
            }
            _ => {}
        }
    }
    signed.submit(&state, &headers, &csrf, Method::PATCH, "/v1/members/{id}")?;
    // The whole account only when it is chosen: an empty list of ticks never widens a scope
    // by itself (a scoped project deleted since, or one this page could not list).
    let limited = limited.ok_or_else(|| {
        WebError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "choose the whole account or a limited reach",
        )
    })?;
    let scope = ResourceScope {
        projects: (!projects.is_empty()).then_some(projects),
        server_labels: (!labels.is_empty()).then_some(labels),
    };
    let _changed = members::change_role(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        JsonBody(RoleChange {
            role,
            // A limited reach with nothing in it is refused by the API (invalid_resource_scope).
            resource_scope: Some(limited.then_some(scope)),
        }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/members?done=role-changed"))
}
