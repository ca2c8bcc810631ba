//! Settings → Members (the list, and inviting someone) and Settings → API keys (the list,
//! creating one, shown once, and revoking).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use chrono::Utc;
use http::{HeaderMap, Method, StatusCode};
use maud::{html, Markup};
use serde::Deserialize;

use super::guard::{self, parse_id, Signed, TokenForm};
use super::layout::{self, Section};
use super::settings::{tabs, Done};
use super::WebError;
use crate::api::api_keys::{self, CreateApiKey};
use crate::api::extract::JsonBody;
use crate::api::members::{self, InvitationRequest, RoleChange};
use crate::api::AppState;
use crate::identity::auth::{Role, Scope};

use super::all_rows;

/// `GET /ui/settings/members`
pub async fn members(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/members")?;
    let list = members::list(
        State(state.clone()),
        Extension(signed.principal.clone()),
        all_rows(),
    )
    .await?
    .0;
    let may_manage = signed.may(Method::PATCH, "/v1/members/{id}")
        && signed.may(Method::DELETE, "/v1/members/{id}");
    let invitations = if signed.may(Method::GET, "/v1/invitations") {
        members::list_invitations(
            State(state.clone()),
            Extension(signed.principal.clone()),
            all_rows(),
        )
        .await?
        .0
        .invitations
    } else {
        Vec::new()
    };
    let may_revoke = signed.may(Method::DELETE, "/v1/invitations/{id}");
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/members"))
        (layout::notice(done.done.as_deref()))
        h2 { "Members" }
        table id="members" {
            thead { tr { th { "Email" } th { "Role" } th { "Second factor" } th { "Member since" } @if may_manage { th { span.visually-hidden { "Actions" } } } } }
            tbody {
                @for m in &list.members {
                    tr data-member=(m.id) {
                        td { (m.email) }
                        td { (m.role) @if m.resource_scope.is_some() { " (scoped)" } }
                        td { @if m.mfa_enabled { "TOTP" } @else { "—" } }
                        td { (layout::time(m.created_at)) }
                        @if may_manage {
                            td {
                                // Not on one's own row: the API refuses changing oneself.
                                @if m.id != signed.principal.user_id {
                                    form.inline method="post" action=(format!("/ui/settings/members/{}/role", m.id)) {
                                        (layout::csrf(&signed))
                                        label.visually-hidden for=(format!("role-{}", m.id)) { "New role for " (m.email) }
                                        select id=(format!("role-{}", m.id)) name="role" {
                                            @for role in Role::ALL {
                                                @if signed.principal.role >= role {
                                                    option value=(role.as_str()) selected[role.as_str() == m.role] { (role.as_str()) }
                                                }
                                            }
                                        }
                                        button type="submit" { "Change role" }
                                        " "
                                        a.button href=(format!("/ui/settings/members/{}/access", m.id)) aria-label=(format!("Role and resource scope of {}", m.email)) { "Access…" }
                                        " "
                                        a.button.danger href=(format!("/ui/settings/members/{}/remove", m.id)) { "Remove" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if !invitations.is_empty() {
            h2 { "Open invitations" }
            table id="invitations" {
                thead { tr { th { "Email" } th { "Role" } th { "Expires" } @if may_revoke { th { span.visually-hidden { "Action" } } } } }
                tbody {
                    @for i in &invitations {
                        tr data-invitation=(i.id) {
                            td { (i.email) }
                            td { (i.role) }
                            td { (layout::time(i.expires_at)) }
                            @if may_revoke {
                                td {
                                    form method="post" action=(format!("/ui/settings/invitations/{}/revoke", i.id)) {
                                        (layout::csrf(&signed))
                                        button.danger type="submit" aria-label=(format!("Revoke the invitation of {}", i.email)) { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if signed.may(Method::POST, "/v1/invitations") {
            h2 { "Invite someone" }
            form.stack method="post" action="/ui/settings/members" {
                (layout::csrf(&signed))
                label for="email" { "Email" }
                input id="email" name="email" type="email" required maxlength="320";
                label for="role" { "Role" }
                select id="role" name="role" {
                    @for role in Role::ALL {
                        @if signed.principal.role >= role {
                            option value=(role.as_str()) selected[role == Role::Viewer] { (role.as_str()) }
                        }
                    }
                }
                button type="submit" id="invite" { "Invite" }
            }
        }
    };
    Ok(layout::page("Members", &signed, Section::Settings, body))
}

#[derive(Deserialize)]
pub struct Invite {
    #[serde(default)]
    csrf: String,
    email: String,
    role: String,
}

/// `POST /ui/settings/members`: the answer shows the invitation's token once.
pub async fn invite(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<Invite>,
) -> Result<Response, WebError> {
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::POST,
        "/v1/invitations",
    )?;
    let answer = members::invite(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(InvitationRequest {
            email: form.email,
            role: form.role,
        }),
    )
    .await?;
    let created: serde_json::Value = super::json_body(answer).await?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let body = html! {
        h1 { "Invitation for " (text(&created["invitation"]["email"])) }
        @if created["emailed"] == true {
            p { "It was emailed. " }
        }
        p { "The invitation token, shown only this once (single use, until "
            (text(&created["invitation"]["expires_at"])) "):" }
        pre.command id="invitation-token" { code { (text(&created["token"])) } }
        p { "The new member accepts it with " code { "POST /v1/invitations/accept" } " or the link in the email." }
        p { a href="/ui/settings/members" { "Back to the members" } }
    };
    Ok((
        StatusCode::CREATED,
        layout::page("Invitation", &signed, Section::Settings, body),
    )
        .into_response())
}

/// `GET /ui/settings/api-keys`
pub async fn api_keys(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/api-keys")?;
    let list = api_keys::list(
        State(state),
        Extension(signed.principal.clone()),
        all_rows(),
    )
    .await?
    .0;
    let may_write = signed.may(Method::POST, "/v1/api-keys");
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/api-keys"))
        (layout::notice(done.done.as_deref()))
        h2 { "API keys" }
        @if list.api_keys.is_empty() {
            p { "No API keys." }
        } @else {
            table id="api-keys" {
                thead { tr { th { "Name" } th { "Scopes" } th { "Allowed from" } th { "Created" } th { "Last used" } th { "Expires" } @if may_write { th { span.visually-hidden { "Action" } } } } }
                tbody {
                    @for k in &list.api_keys {
                        tr data-key=(k.id) {
                            td { (k.name) }
                            td { (k.scopes.join(", ")) }
                            td { @if k.ip_allowlist.is_empty() { "anywhere" } @else { (k.ip_allowlist.join(", ")) } }
                            td { (layout::time(k.created_at)) }
                            td { (layout::maybe_time(k.last_used_at)) }
                            td { (layout::maybe_time(k.expires_at)) }
                            @if may_write {
                                td {
                                    form method="post" action=(format!("/ui/settings/api-keys/{}/revoke", k.id)) {
                                        (layout::csrf(&signed))
                                        button.danger type="submit" aria-label=(format!("Revoke the API key {}", k.name)) { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if may_write {
            h2 { "New API key" }
            form.stack method="post" action="/ui/settings/api-keys" {
                (layout::csrf(&signed))
                label for="name" { "Name" }
                input id="name" name="name" type="text" required maxlength="200";
                fieldset {
                    legend { "Scopes" }
                    @for scope in Scope::ALL {
                        @if signed.principal.grants(scope) {
                            label { input type="checkbox" name="scope" value=(scope.as_str()); " " (scope.as_str()) }
                        }
                    }
                }
                label for="ip_allowlist" { "Allowed from (addresses or CIDR networks, one per line; empty: anywhere)" }
                textarea id="ip_allowlist" name="ip_allowlist" rows="2" maxlength="4096" {}
                label for="expires_in_days" { "Expires after (days; empty: never)" }
                input id="expires_in_days" name="expires_in_days" type="number" min="1" max="3650";
                button type="submit" id="create-api-key" { "Create API key" }
            }
        }
    };
    Ok(layout::page("API keys", &signed, Section::Settings, body))
}

/// `POST /ui/settings/api-keys`: the answer shows the secret once. Read from the raw form:
/// the scopes are a repeated field.
pub async fn create_api_key(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, WebError> {
    let mut token = String::new();
    let mut request = CreateApiKey {
        name: String::new(),
        scopes: Vec::new(),
        ip_allowlist: Vec::new(),
        expires_at: None,
    };
    for (name, value) in form_urlencoded::parse(&body) {
        match &*name {
            "csrf" => token = value.into_owned(),
            "name" => request.name = value.into_owned(),
            "scope" => request.scopes.push(value.into_owned()),
            "ip_allowlist" => {
                request.ip_allowlist = layout::lines(&value).map(str::to_owned).collect()
            }
            "expires_in_days" if !value.trim().is_empty() => {
                let days: i64 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|d| (1..=3650).contains(d))
                    .ok_or_else(|| {
                        WebError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "the expiry is a number of days from 1 to 3650",
                        )
                    })?;
                request.expires_at = Some(Utc::now() + chrono::Duration::days(days));
            }
            _ => {}
        }
    }
    guard::check_form(&state, &headers, &signed, Some(&token))?;
    signed.require(Method::POST, "/v1/api-keys")?;
    let (_, created) = api_keys::create(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(request),
    )
    .await?;
    let created = created.0;
    let body = html! {
        h1 { "API key " (created.key.name) " created" }
        p { "Copy it now: it is shown only this once. Send it as " code { "Authorization: Bearer …" } "." }
        (layout::copyable("api-key-secret", "the API key", &created.secret))
        p { "Scopes: " (created.key.scopes.join(", ")) }
        p { a href="/ui/settings/api-keys" { "Back to the API keys" } }
    };
    Ok((
        StatusCode::CREATED,
        layout::page("API key created", &signed, Section::Settings, body),
    )
        .into_response())
}

/// `POST /ui/settings/api-keys/{id}/revoke`
pub async fn revoke_api_key(
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
        "/v1/api-keys/{id}",
    )?;
    api_keys::revoke(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/api-keys?done=key-revoked"))
}

#[derive(Deserialize)]
pub struct NewRole {
    #[serde(default)]
    csrf: String,
    role: String,
}

/// `POST /ui/settings/members/{id}/role`
pub async fn change_role(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<NewRole>,
) -> Result<Redirect, WebError> {
    let id = parse_id(&id)?;
    signed.submit(
        &state,
        &headers,
        &form.csrf,
        Method::PATCH,
        "/v1/members/{id}",
    )?;
    // The list shows the new role; the answer itself is not needed.
    let _changed = members::change_role(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
        JsonBody(RoleChange {
            role: Some(form.role),
            ..RoleChange::default()
        }),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/members?done=role-changed"))
}

/// `GET /ui/settings/members/{id}/remove`: the confirmation step.
pub async fn confirm_remove(
    State(state): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Result<Markup, WebError> {
    let id = parse_id(&id)?;
    signed.require(Method::DELETE, "/v1/members/{id}")?;
    let list = members::list(
        State(state),
        Extension(signed.principal.clone()),
        all_rows(),
    )
    .await?
    .0;
    let member = list
        .members
        .iter()
        .find(|m| m.id == id)
        .ok_or_else(|| WebError::new(StatusCode::NOT_FOUND, "no such member"))?;
    let body = html! {
        h1 { "Remove " (member.email) " from the account?" }
        p { "Their sessions and API keys end at once. Their past actions stay in the audit log." }
        (layout::confirm_form(&signed, &format!("/ui/settings/members/{id}/remove"), "confirm-remove",
            "Remove member", "/ui/settings/members"))
    };
    Ok(layout::page(
        "Remove member",
        &signed,
        Section::Settings,
        body,
    ))
}

/// `POST /ui/settings/members/{id}/remove`
pub async fn remove(
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
        "/v1/members/{id}",
    )?;
    members::remove(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/members?done=member-removed"))
}

/// `POST /ui/settings/invitations/{id}/revoke`
pub async fn revoke_invitation(
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
        "/v1/invitations/{id}",
    )?;
    members::revoke_invitation(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        crate::api::extract::Path(id),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/members?done=invitation-revoked"))
}

/// `GET /ui/settings/account`
pub async fn account(
    State(state): State<AppState>,
    signed: Signed,
    Query(done): Query<Done>,
) -> Result<Markup, WebError> {
    signed.require(Method::GET, "/v1/account")?;
    let a = crate::api::account::show(State(state), Extension(signed.principal.clone()))
        .await?
        .0;
    let may_change = signed.may(Method::PATCH, "/v1/account");
    let body = html! {
        h1 { "Settings" }
        (tabs(&signed, "/ui/settings/account"))
        (layout::notice(done.done.as_deref()))
        h2 { "Account" }
        @if may_change {
            form.stack method="post" action="/ui/settings/account" {
                (layout::csrf(&signed))
                label for="name" { "Name" }
                input id="name" name="name" type="text" required maxlength="200" value=(a.name);
                label {
                    input id="require_mfa" name="require_mfa" type="checkbox" value="on" checked[a.require_mfa];
                    " Every member signs in with a second factor"
                }
                label {
                    input id="require_webauthn" name="require_webauthn" type="checkbox" value="on" checked[a.require_webauthn];
                    " … and it must be a security key (TOTP is refused to members who have a key)"
                }
                label {
                    input id="four_eyes_approval" name="four_eyes_approval" type="checkbox" value="on" checked[a.four_eyes_approval];
                    " A rollout is approved by someone other than the person who started it"
                }
                label for="audit_retention_days" { "Keep audit events for (days, 30 to 2557)" }
                input id="audit_retention_days" name="audit_retention_days" type="number" min="30" max="2557" required value=(a.audit_retention_days);
                label for="deploy_log_retention_days" { "Keep deployment logs for (days, 1 to 2557)" }
                input id="deploy_log_retention_days" name="deploy_log_retention_days" type="number" min="1" max="2557" required value=(a.deploy_log_retention_days);
                button type="submit" id="save-account" { "Save" }
            }
        } @else {
            dl.facts {
                dt { "Name" } dd { (a.name) }
                dt { "Second factor required" } dd { @if a.require_mfa { "yes" } @else { "no" } }
                dt { "Security key required" } dd { @if a.require_webauthn { "yes" } @else { "no" } }
                dt { "Four-eyes rollout approval" } dd { @if a.four_eyes_approval { "yes" } @else { "no" } }
                dt { "Audit events kept" } dd { (a.audit_retention_days) " days" }
                dt { "Deployment logs kept" } dd { (a.deploy_log_retention_days) " days" }
            }
        }
    };
    Ok(layout::page("Account", &signed, Section::Settings, body))
}

#[derive(Deserialize)]
pub struct AccountForm {
    #[serde(default)]
    csrf: String,
    name: String,
    /// A checkbox: present (`on`) when ticked, absent otherwise.
    #[serde(default)]
    require_mfa: Option<String>,
    #[serde(default)]
    require_webauthn: Option<String>,
    #[serde(default)]
    four_eyes_approval: Option<String>,
    audit_retention_days: String,
    deploy_log_retention_days: String,
}

/// `POST /ui/settings/account`
pub async fn update_account(
    State(state): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<AccountForm>,
) -> Result<Redirect, WebError> {
    signed.submit(&state, &headers, &form.csrf, Method::PATCH, "/v1/account")?;
    let days = |text: &str| {
        text.trim().parse::<i32>().map_err(|_| {
            WebError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "retention is a number of days",
            )
        })
    };
    let change = crate::api::account::AccountChange {
        name: Some(form.name),
        require_mfa: Some(form.require_mfa.is_some()),
        require_webauthn: Some(form.require_webauthn.is_some()),
        audit_retention_days: Some(days(&form.audit_retention_days)?),
        deploy_log_retention_days: Some(days(&form.deploy_log_retention_days)?),
        // The network allowlist is set through the API (its lock-out guard needs the
        // caller's list in full); this form leaves it as it is.
        ip_allowlist: None,
        four_eyes_approval: Some(form.four_eyes_approval.is_some()),
    };
    // The page shows the new settings; the answer itself is not needed.
    let _saved = crate::api::account::update(
        State(state),
        signed.meta.clone(),
        Extension(signed.principal.clone()),
        JsonBody(change),
    )
    .await?;
    Ok(Redirect::to("/ui/settings/account?done=saved"))
}
