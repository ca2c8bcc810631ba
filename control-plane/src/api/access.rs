//! The one authorization check. Every route is listed here with the rule it obeys; the
//! middleware looks the matched route up, authenticates the caller and checks the rule
//! before any handler runs. A route missing from this table is refused (and a unit test fails),
//! so a new route cannot ship unguarded by accident.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::Method;

use super::cross_site;
use super::error::{ApiError, ErrorCode};
use super::extract::ClientMeta;
use super::AppState;
use crate::identity::auth::{self, Scope};

/// What a route demands of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No authentication (health, metrics, signup, login).
    Public,
    /// A signed-in user (cookie session), not an API key: managing one's own sessions.
    Session,
    /// Any caller that authenticated, session or API key, whatever its scopes: who am I.
    Authenticated,
    /// A signed-in user whose role grants the scope: API keys cannot manage API keys.
    SessionWith(Scope),
    /// A session or API key allowed the scope.
    Scoped(Scope),
}

/// The rule for a route, by method and path template as the router matched it.
pub fn rule_for(method: &Method, path: &str) -> Option<Rule> {
    use Rule::*;
    let m = method.as_str();
    Some(match (m, path) {
        ("GET", "/healthz" | "/livez" | "/readyz" | "/metrics" | "/openapi.json") => Public,
        (
            "POST",
            "/v1/auth/signup"
            | "/v1/auth/login"
            | "/v1/auth/password-reset"
            | "/v1/auth/password-reset/confirm"
            | "/v1/invitations/accept",
        ) => Public,
        ("POST", "/v1/auth/logout") => Session,
        ("GET", "/v1/auth/me") => Authenticated,
        (
            "POST",
            "/v1/auth/mfa/totp" | "/v1/auth/mfa/totp/confirm" | "/v1/auth/mfa/totp/disable",
        ) => Session,
        // Security keys: each user manages only their own (another's key answers 404).
        ("POST", "/v1/auth/login/webauthn") => Public,
        ("POST", "/v1/auth/mfa/webauthn/registrations" | "/v1/auth/mfa/webauthn/keys") => Session,
        ("GET", "/v1/auth/mfa/webauthn/keys") => Session,
        ("PATCH" | "DELETE", "/v1/auth/mfa/webauthn/keys/{id}") => Session,
        ("GET", "/v1/auth/sessions") => Session,
        ("DELETE", "/v1/auth/sessions/{id}") => Session,
        ("POST", "/v1/auth/sessions/sign-out-everywhere") => Session,
        ("GET", "/v1/api-keys") => SessionWith(Scope::ApiKeysRead),
        ("POST", "/v1/api-keys") => SessionWith(Scope::ApiKeysWrite),
        ("DELETE", "/v1/api-keys/{id}") => SessionWith(Scope::ApiKeysWrite),
        ("GET", "/v1/audit" | "/v1/audit/export") => Scoped(Scope::AuditRead),
        // A key may watch the sinks' status; changing where the audit log goes takes a
        // signed-in admin, so a leaked key cannot send the account's log elsewhere.
        ("GET", "/v1/audit/sinks") => Scoped(Scope::AuditSinks),
        ("POST", "/v1/audit/sinks") | ("DELETE", "/v1/audit/sinks/{id}") => {
            SessionWith(Scope::AuditSinks)
        }
        ("GET", "/v1/members") => Scoped(Scope::MembersRead),
        // Custom roles: anyone who may read the members may read what their roles mean;
        // defining them is member management.
        ("GET", "/v1/roles") => Scoped(Scope::MembersRead),
        ("POST", "/v1/roles") | ("PATCH" | "DELETE", "/v1/roles/{id}") => {
            SessionWith(Scope::MembersWrite)
        }
        ("PATCH" | "DELETE", "/v1/members/{id}") => SessionWith(Scope::MembersWrite),
        ("GET" | "POST", "/v1/invitations") => SessionWith(Scope::MembersWrite),
        ("DELETE", "/v1/invitations/{id}") => SessionWith(Scope::MembersWrite),
        ("GET", "/v1/account") => Scoped(Scope::AccountRead),
        ("PATCH", "/v1/account") => SessionWith(Scope::AccountWrite),
        // Single sign-on: readable like the account's settings (never the client secret);
        // changed by a signed-in admin, as the other settings.
        ("GET", "/v1/account/sso") => Scoped(Scope::AccountRead),
        ("PUT" | "DELETE", "/v1/account/sso") => SessionWith(Scope::AccountWrite),
        ("DELETE", "/v1/account") | ("POST", "/v1/account/transfer-ownership") => {
            SessionWith(Scope::AccountOwner)
        }
        ("GET", "/v1/servers" | "/v1/servers/{id}" | "/v1/servers/events") => {
            Scoped(Scope::ServersRead)
        }
        ("POST", "/v1/servers" | "/v1/servers/{id}/enrollment-token") => {
            Scoped(Scope::ServersWrite)
        }
        ("DELETE", "/v1/servers/{id}" | "/v1/servers/{id}/agent-certificate") => {
            Scoped(Scope::ServersWrite)
        }
        ("GET", "/v1/projects" | "/v1/projects/{id}" | "/v1/projects/{id}/dns") => {
            Scoped(Scope::ProjectsRead)
        }
        ("PUT" | "DELETE", "/v1/projects/{id}/dns") => Scoped(Scope::ProjectsWrite),
        ("POST", "/v1/projects") => Scoped(Scope::ProjectsWrite),
        ("PATCH" | "DELETE", "/v1/projects/{id}") => Scoped(Scope::ProjectsWrite),
        ("GET", "/v1/deployments" | "/v1/deployments/{id}" | "/v1/deployments/{id}/logs") => {
            Scoped(Scope::DeploymentsRead)
        }
        ("POST", "/v1/deployments" | "/v1/deployments/{id}/rollback") => {
            Scoped(Scope::DeploymentsWrite)
        }
        (
            "GET",
            "/v1/rollouts"
            | "/v1/rollouts/{id}"
            | "/v1/rollouts/{id}/events"
            | "/v1/rollouts/{id}/targets",
        ) => Scoped(Scope::RolloutsRead),
        (
            "POST",
            "/v1/rollouts"
            | "/v1/rollouts/{id}/pause"
            | "/v1/rollouts/{id}/resume"
            | "/v1/rollouts/{id}/abort",
        ) => Scoped(Scope::RolloutsWrite),
        ("POST", "/v1/rollouts/{id}/approve") => Scoped(Scope::RolloutsApprove),
        _ => return None,
    })
}

/// Route middleware: authenticates and authorizes, then hands the handler a
/// [`auth::Principal`] in the request extensions.
pub async fn authorize(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(path) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    else {
        return Ok(next.run(req).await);
    };
    // The path exists but not with this method (every documented route has a rule, which a
    // unit test checks): answer as the router would, before anyone is authenticated.
    let Some(rule) = rule_for(req.method(), &path) else {
        return Err(ApiError::new(
            http::StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::MethodNotAllowed,
            format!(
                "{} is not allowed on {path}; see /openapi.json",
                req.method()
            ),
        ));
    };
    let credential = cross_site::Credential::of(req.headers(), rule == Rule::Public);
    cross_site::check(
        req.method(),
        req.headers(),
        credential,
        &state.public_origin,
    )?;
    if rule == Rule::Public {
        return Ok(next.run(req).await);
    }
    let (mut parts, body) = req.into_parts();
    let meta = ClientMeta::from_parts(&parts);
    let principal = auth::authenticate(&state.pool, &parts.headers, meta.ip).await?;
    tracing::Span::current().record("account_id", tracing::field::display(principal.account_id));
    check_rule(rule, &principal)?;
    parts.extensions.insert(principal);
    Ok(next.run(Request::from_parts(parts, body)).await)
}

/// Whether an authenticated caller passes `rule`: the check [`authorize`] makes before a
/// handler runs.
pub fn check_rule(rule: Rule, principal: &auth::Principal) -> Result<(), ApiError> {
    let is_session = principal.session_id().is_some();
    // An account that requires MFA lets a member without it do one thing: set it up.
    if principal.mfa_setup_required && !matches!(rule, Rule::Session | Rule::Authenticated) {
        return Err(ApiError::forbidden(
            ErrorCode::MfaSetupRequired,
            "this account requires multi-factor sign-in: set up TOTP at /v1/auth/mfa/totp or a \
             security key at /v1/auth/mfa/webauthn/registrations first",
        ));
    }
    match rule {
        Rule::Public => {}
        Rule::Session if !is_session => {
            return Err(ApiError::forbidden(
                ErrorCode::SessionRequired,
                "this route is for signed-in users, not API keys",
            ))
        }
        Rule::Session | Rule::Authenticated => {}
        Rule::SessionWith(_) if !is_session => {
            return Err(ApiError::forbidden(
                ErrorCode::SessionRequired,
                "only a signed-in user may do this, not an API key",
            ))
        }
        Rule::SessionWith(scope) | Rule::Scoped(scope) => {
            if !principal.allows(scope) {
                let who = if is_session {
                    format!("your role ({})", principal.role_name())
                } else {
                    "this API key".to_owned()
                };
                return Err(ApiError::forbidden(
                    ErrorCode::InsufficientScope,
                    format!("{who} does not allow {}", scope.as_str()),
                ));
            }
        }
    }
    Ok(())
}

/// Whether `principal` may call the route `method path` (a path template as in the table):
/// the dashboard asks this before it calls a handler on someone's behalf and before it shows
/// a button, so a page offers exactly what the API would allow.
pub fn permit(principal: &auth::Principal, method: &Method, path: &str) -> Result<(), ApiError> {
    match rule_for(method, path) {
        Some(Rule::Public) => Ok(()),
        Some(rule) => check_rule(rule, principal),
        // Not in the table: refused, as the middleware refuses it.
        None => Err(ApiError::forbidden(
            ErrorCode::InsufficientScope,
            format!("{method} {path} has no access rule"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_route_has_a_rule() {
        let doc: serde_json::Value =
            serde_json::from_str(super::super::openapi_document()).expect("openapi json");
        let paths = doc["paths"].as_object().expect("paths");
        assert!(!paths.is_empty());
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                let m: Method = method.to_uppercase().parse().expect("method");
                assert!(
                    rule_for(&m, path).is_some(),
                    "{method} {path} has no access rule"
                );
            }
        }
    }
}
