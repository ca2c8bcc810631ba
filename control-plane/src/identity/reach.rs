//! What a member may act on, beyond what: custom roles (an account's own sets of permissions)
//! and resource scopes (these projects only, servers with these labels only).
//!
//! The route table still decides *whether* a caller may use a route ([`super::auth::Principal::allows`]
//! reads the custom role's permissions the way it reads a built-in role's). A resource scope
//! then narrows *which rows* the route reaches: every handler that names a server, project,
//! deployment or rollout adds [`Reach::project_filter`] and [`Reach::server_filter`] to its
//! query, so a row out of reach is "not found", exactly like another account's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::Scope;

/// Projects one scope may name: more is a sign of a scope that should not be one.
pub const MAX_SCOPE_PROJECTS: usize = 100;
/// Labels one scope may require (the same bound a server's labels have).
pub const MAX_SCOPE_LABELS: usize = 32;
/// Custom roles per account.
pub const MAX_CUSTOM_ROLES: i64 = 50;

/// The permissions a custom role may hold. Administering the account (members, the account
/// itself, where the audit log goes, ownership) stays with the built-in admin and owner roles:
/// a role that can edit roles or members could grant itself anything.
pub const DELEGABLE: [Scope; 14] = [
    Scope::ServersRead,
    Scope::ServersWrite,
    Scope::ProjectsRead,
    Scope::ProjectsWrite,
    Scope::DeploymentsRead,
    Scope::DeploymentsWrite,
    Scope::RolloutsRead,
    Scope::RolloutsWrite,
    Scope::RolloutsApprove,
    Scope::AuditRead,
    Scope::MembersRead,
    Scope::AccountRead,
    Scope::ApiKeysRead,
    Scope::ApiKeysWrite,
];

/// A custom role, as a principal carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomRole {
    pub id: Uuid,
    pub name: String,
    pub permissions: Vec<Scope>,
}

/// Parses a custom role's permission names: every one known and delegable, none twice.
pub fn parse_permissions(names: &[String]) -> Result<Vec<Scope>, String> {
    if names.is_empty() {
        return Err("a role needs at least one permission".into());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let scope = Scope::parse(name.trim()).ok_or_else(|| {
            format!("unknown permission {name:?}; see GET /v1/roles for the list")
        })?;
        if !DELEGABLE.contains(&scope) {
            return Err(format!(
                "{name} cannot be given to a custom role: it stays with the admin and owner roles"
            ));
        }
        if !out.contains(&scope) {
            out.push(scope);
        }
    }
    Ok(out)
}

/// The resources a member may reach. Absent parts reach everything of their kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceScope {
    /// Only these projects (and their deployments and rollouts); absent: every project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<Vec<Uuid>>,
    /// Only servers carrying every one of these labels; absent: every server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_labels: Option<BTreeMap<String, String>>,
}

impl ResourceScope {
    /// Bounds a scope before it is stored.
    pub fn check(&self) -> Result<(), String> {
        if self.projects.is_none() && self.server_labels.is_none() {
            return Err("a resource scope names projects, server_labels or both; \
                        send null to reach the whole account"
                .into());
        }
        if let Some(projects) = &self.projects {
            if projects.is_empty() || projects.len() > MAX_SCOPE_PROJECTS {
                return Err(format!("projects: 1 to {MAX_SCOPE_PROJECTS} project ids"));
            }
        }
        if let Some(labels) = &self.server_labels {
            if labels.is_empty() || labels.len() > MAX_SCOPE_LABELS {
                return Err(format!("server_labels: 1 to {MAX_SCOPE_LABELS} labels"));
            }
            // The rules a server's own labels follow, so a scope can name any label a server
            // can carry, and nothing PostgreSQL's JSON would refuse (NUL) gets that far.
            let key_ok = |k: &str| {
                (1..=63).contains(&k.len())
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            };
            for (k, v) in labels {
                if !key_ok(k) || v.len() > 63 || v.chars().any(char::is_control) {
                    return Err(format!(
                        "server_labels {:?}: keys are 1 to 63 letters, digits, '-', '_', '.', \
                         '/'; values at most 63 printable characters",
                        k.chars().take(63).collect::<String>()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A principal's reach: the whole account, or a resource scope within it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach(pub Option<ResourceScope>);

impl Reach {
    pub fn everything() -> Self {
        Reach(None)
    }

    pub fn is_everything(&self) -> bool {
        self.0.is_none()
    }

    /// For SQL: `($n::uuid[] IS NULL OR project_id = ANY($n))`.
    pub fn project_filter(&self) -> Option<Vec<Uuid>> {
        self.0.as_ref().and_then(|s| s.projects.clone())
    }

    /// For SQL: `($n::jsonb IS NULL OR labels @> $n)`.
    pub fn server_filter(&self) -> Option<serde_json::Value> {
        self.0
            .as_ref()
            .and_then(|s| s.server_labels.as_ref())
            .map(|labels| serde_json::json!(labels))
    }

    pub fn reaches_project(&self, id: Uuid) -> bool {
        self.project_filter().is_none_or(|ids| ids.contains(&id))
    }

    /// Whether a server with these labels (a JSON object of strings) is in reach.
    pub fn reaches_server(&self, labels: &serde_json::Value) -> bool {
        let Some(wanted) = self.0.as_ref().and_then(|s| s.server_labels.as_ref()) else {
            return true;
        };
        wanted
            .iter()
            .all(|(k, v)| labels.get(k).and_then(|l| l.as_str()) == Some(v.as_str()))
    }

    /// Whether this reach may create projects: a member scoped to some projects may not make
    /// new ones (they would fall outside their own scope at once).
    pub fn may_create_projects(&self) -> bool {
        self.project_filter().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn permissions_are_known_delegable_and_deduplicated() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_permissions(&names(&[
                "servers:read",
                "servers:read",
                "rollouts:approve"
            ])),
            Ok(vec![Scope::ServersRead, Scope::RolloutsApprove])
        );
        assert!(parse_permissions(&names(&[])).is_err());
        assert!(parse_permissions(&names(&["servers:fly"])).is_err());
        for admin_only in [
            "members:write",
            "account:write",
            "account:owner",
            "audit:sinks",
        ] {
            let e = parse_permissions(&names(&[admin_only])).expect_err(admin_only);
            assert!(e.contains("admin and owner"), "{e}");
        }
    }

    #[test]
    fn a_scope_narrows_projects_and_servers() {
        let p = Uuid::new_v4();
        let reach = Reach(Some(ResourceScope {
            projects: Some(vec![p]),
            server_labels: Some(BTreeMap::from([("env".into(), "staging".into())])),
        }));
        assert!(reach.reaches_project(p));
        assert!(!reach.reaches_project(Uuid::new_v4()));
        assert!(reach.reaches_server(&json!({"env": "staging", "role": "web"})));
        assert!(!reach.reaches_server(&json!({"env": "production"})));
        assert!(!reach.reaches_server(&json!({})));
        assert!(!reach.may_create_projects());
        let all = Reach::everything();
        assert!(all.reaches_project(p) && all.reaches_server(&json!({})));
        assert!(all.project_filter().is_none() && all.server_filter().is_none());
    }

    #[test]
    fn scopes_are_bounded() {
        assert!(ResourceScope::default().check().is_err());
        let too_many = ResourceScope {
            projects: Some((0..=MAX_SCOPE_PROJECTS).map(|_| Uuid::new_v4()).collect()),
            server_labels: None,
        };
        assert!(too_many.check().is_err());
        let empty = ResourceScope {
            projects: Some(vec![]),
            server_labels: None,
        };
        assert!(empty.check().is_err());
        for (k, v) in [("env", "a\u{0}b"), ("", "x"), ("bad key", "x"), ("é", "x")] {
            let labels = ResourceScope {
                projects: None,
                server_labels: Some(BTreeMap::from([(k.to_owned(), v.to_owned())])),
            };
            assert!(labels.check().is_err(), "{k:?}={v:?}");
        }
    }
}
