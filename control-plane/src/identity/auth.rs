//! Who is calling: roles, scopes, and turning a session cookie or an API key into a
//! [`Principal`].

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use http::HeaderMap;
use uuid::Uuid;

use crate::identity::allowlist;
use crate::identity::reach::{parse_permissions, CustomRole, Reach};
use crate::identity::tokens::{Token, TokenKind};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "sensei_session";
/// A session not used for this long is over.
pub const SESSION_IDLE_DAYS: i64 = 14;

/// A member's role in an account, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Developer,
    Admin,
    Owner,
}

impl Role {
    /// Every built-in role, weakest first.
    pub const ALL: [Role; 5] = [
        Role::Viewer,
        Role::Operator,
        Role::Developer,
        Role::Admin,
        Role::Owner,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "developer" => Role::Developer,
            "admin" => Role::Admin,
            "owner" => Role::Owner,
            _ => return None,
        })
    }

    /// Everything this role may do.
    pub fn grants(self, scope: Scope) -> bool {
        use Scope::*;
        let needed = match scope {
            ServersRead | ProjectsRead | DeploymentsRead | RolloutsRead | AuditRead
            | MembersRead | AccountRead => Role::Viewer,
            DeploymentsWrite | RolloutsWrite | RolloutsApprove => Role::Operator,
            ServersWrite | ProjectsWrite => Role::Developer,
            ApiKeysRead | ApiKeysWrite | MembersWrite | AccountWrite | AuditSinks => Role::Admin,
            AccountOwner => Role::Owner,
        };
        self >= needed
    }
}

/// A permission an API key can carry, named `resource:access`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Scope {
    ServersRead,
    ServersWrite,
    ProjectsRead,
    ProjectsWrite,
    DeploymentsRead,
    DeploymentsWrite,
    RolloutsRead,
    RolloutsWrite,
    /// Approving a rollout's paused batch: its own permission so that an account can give
    /// it to some people only, and require that it is not the person who started it.
    RolloutsApprove,
    AuditRead,
    ApiKeysRead,
    ApiKeysWrite,
    MembersRead,
    MembersWrite,
    AccountRead,
    AccountWrite,
    /// Deleting the account, transferring ownership.
    AccountOwner,
    /// The account's SIEM sinks: a key may read their status; only a session changes them.
    AuditSinks,
}

impl Scope {
    pub const ALL: [Scope; 18] = [
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
        Scope::ApiKeysRead,
        Scope::ApiKeysWrite,
        Scope::MembersRead,
        Scope::MembersWrite,
        Scope::AccountRead,
        Scope::AccountWrite,
        Scope::AccountOwner,
        Scope::AuditSinks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ServersRead => "servers:read",
            Scope::ServersWrite => "servers:write",
            Scope::ProjectsRead => "projects:read",
            Scope::ProjectsWrite => "projects:write",
            Scope::DeploymentsRead => "deployments:read",
            Scope::DeploymentsWrite => "deployments:write",
            Scope::RolloutsRead => "rollouts:read",
            Scope::RolloutsWrite => "rollouts:write",
            Scope::RolloutsApprove => "rollouts:approve",
            Scope::AuditRead => "audit:read",
            Scope::ApiKeysRead => "api_keys:read",
            Scope::ApiKeysWrite => "api_keys:write",
            Scope::MembersRead => "members:read",
            Scope::MembersWrite => "members:write",
            Scope::AccountRead => "account:read",
            Scope::AccountWrite => "account:write",
            Scope::AccountOwner => "account:owner",
            Scope::AuditSinks => "audit:sinks",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// How the caller proved who they are.
#[derive(Debug, Clone)]
pub enum Credential {
    Session { session_id: Uuid },
    ApiKey { key_id: Uuid, scopes: Vec<Scope> },
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub account_id: Uuid,
    /// The user acting, or who created the API key in use.
    pub user_id: Uuid,
    pub email: String,
    pub role: Role,
    pub credential: Credential,
    /// The account requires MFA and this user has not set it up: only the routes that set
    /// it up (and sign out) are open to them.
    pub mfa_setup_required: bool,
    /// The account's custom role this member holds instead of a built-in one; `role` is then
    /// the rank the owner guards compare (viewer).
    pub custom_role: Option<CustomRole>,
    /// Which servers, projects, deployments and rollouts this member's routes reach.
    pub reach: Reach,
}

impl Principal {
    /// Whether this caller may use `scope`: the role must grant it and, for an API key, the
    /// key must carry it too (a key only ever narrows its creator's role).
    pub fn allows(&self, scope: Scope) -> bool {
        self.grants(scope)
            && match &self.credential {
                Credential::Session { .. } => true,
                Credential::ApiKey { scopes, .. } => scopes.contains(&scope),
            }
    }

    /// Whether this member's role, built-in or custom, grants `scope` (whatever the
    /// credential in use): what they may hand on to an API key.
    pub fn grants(&self, scope: Scope) -> bool {
        match &self.custom_role {
            // Admins and owners hold their built-in role whatever a stale row says: a custom
            // role can never take an owner's powers away (and lock the account's ownership).
            Some(custom) if self.role < Role::Admin => custom.permissions.contains(&scope),
            _ => self.role.grants(scope),
        }
    }

    /// The role's name as members see it: the custom role's, or the built-in one's.
    pub fn role_name(&self) -> &str {
        match &self.custom_role {
            Some(custom) if self.role < Role::Admin => &custom.name,
            _ => self.role.as_str(),
        }
    }

    pub fn session_id(&self) -> Option<Uuid> {
        match self.credential {
            Credential::Session { session_id } => Some(session_id),
            Credential::ApiKey { .. } => None,
        }
    }

    /// The audit actor for this caller.
    pub fn actor(&self) -> crate::audit::Actor {
        match &self.credential {
            Credential::Session { .. } => crate::audit::Actor::User {
                id: self.user_id,
                email: self.email.clone(),
            },
            Credential::ApiKey { key_id, .. } => crate::audit::Actor::ApiKey { id: *key_id },
        }
    }
}

/// The value of our session cookie in a `Cookie` header, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value)
}

/// The bearer token in `Authorization`, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Why a request's credentials were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Neither a session cookie nor an API key.
    #[error("sign in first, or send an API key as `Authorization: Bearer …`")]
    NotSignedIn,
    /// Unknown, revoked, idle too long, or not ours.
    #[error("session expired or signed out; sign in again")]
    SessionInvalid,
    /// Unknown, revoked, or not ours.
    #[error("API key is not valid (unknown or revoked)")]
    ApiKeyInvalid,
    #[error("API key expired at {}", .at.to_rfc3339())]
    ApiKeyExpired { at: DateTime<Utc> },
    /// The key's allowlist does not hold the caller's address.
    #[error("this API key may not be used from {ip}")]
    IpNotAllowed { ip: IpAddr },
    /// The account's allowlist does not hold the caller's address.
    #[error("this account may not be used from {ip}")]
    AccountIpNotAllowed { ip: IpAddr },
    /// The database holds a value this version cannot read (logged, never shown).
    #[error("{0}")]
    Stored(String),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Refuses a caller outside the account's own allowlist (the row carries
/// `account_allowlist`).
fn account_admits(row: &tokio_postgres::Row, client_ip: IpAddr) -> Result<(), AuthError> {
    let networks: Vec<String> = row.try_get("account_allowlist")?;
    if allowlist::permits(&allowlist::stored(&networks), client_ip) {
        Ok(())
    } else {
        Err(AuthError::AccountIpNotAllowed { ip: client_ip })
    }
}

/// A role the database holds, read strictly.
fn stored_role(text: &str) -> Result<Role, AuthError> {
    Role::parse(text).ok_or_else(|| AuthError::Stored("unknown role in database".into()))
}

/// The columns [`member_grants`] reads, for a query that joins `users u`.
const GRANT_COLUMNS: &str = "u.role, u.resource_scope, r.id AS custom_role_id, \
     r.name AS custom_role_name, r.permissions AS custom_permissions";

/// A member's custom role and reach, from a row carrying [`GRANT_COLUMNS`], read strictly: a
/// stored permission or scope this version cannot read is an error, never a wider grant.
fn member_grants(row: &tokio_postgres::Row) -> Result<(Option<CustomRole>, Reach), AuthError> {
    let custom = match row.try_get::<_, Option<Uuid>>("custom_role_id")? {
        Some(id) => {
            let names: Vec<String> = row.try_get("custom_permissions")?;
            Some(CustomRole {
                id,
                name: row.try_get("custom_role_name")?,
                permissions: parse_permissions(&names).map_err(AuthError::Stored)?,
            })
        }
        None => None,
    };
    let scope: Option<serde_json::Value> = row.try_get("resource_scope")?;
    let reach = match scope {
        Some(v) => Reach(Some(serde_json::from_value(v).map_err(|e| {
            AuthError::Stored(format!("unreadable resource scope in database: {e}"))
        })?)),
        None => Reach::everything(),
    };
    Ok((custom, reach))
}

/// Authenticates a request by its API key (preferred when present) or session cookie.
pub async fn authenticate(
    pool: &Pool,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Principal, AuthError> {
    if let Some(text) = bearer(headers) {
        return authenticate_api_key(pool, text, client_ip).await;
    }
    match session_cookie(headers) {
        Some(text) => authenticate_session(pool, text, client_ip).await,
        None => Err(AuthError::NotSignedIn),
    }
}

async fn authenticate_session(
    pool: &Pool,
    text: &str,
    client_ip: IpAddr,
) -> Result<Principal, AuthError> {
    let token = Token::parse(TokenKind::Session, text).ok_or(AuthError::SessionInvalid)?;
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT s.secret_hash, s.revoked_at IS NOT NULL AS revoked, \
                    s.last_seen_at < now() - make_interval(days => $2) AS idle, \
                    s.last_seen_at < now() - interval '1 minute' AS stale, \
                    u.id AS user_id, u.account_id, u.email, {GRANT_COLUMNS}, \
                    user_needs_second_factor_setup(u.id) AS mfa_setup_required, \
                    a.ip_allowlist AS account_allowlist \
             FROM sessions s JOIN users u ON u.id = s.user_id \
             LEFT JOIN roles r ON r.id = u.custom_role_id \
             JOIN accounts a ON a.id = u.account_id WHERE s.id = $1"
            ),
            &[&token.id, &(SESSION_IDLE_DAYS as i32)],
        )
        .await?
        .ok_or(AuthError::SessionInvalid)?;
    let hash: Vec<u8> = row.try_get("secret_hash")?;
    let revoked: bool = row.try_get("revoked")?;
    let idle: bool = row.try_get("idle")?;
    let stale: bool = row.try_get("stale")?;
    if !token.matches(&hash) || revoked || idle {
        return Err(AuthError::SessionInvalid);
    }
    account_admits(&row, client_ip)?;
    if stale {
        // Touch at most once a minute: a write per request would cost more than the
        // precision is worth.
        client
            .execute(
                "UPDATE sessions SET last_seen_at = now() WHERE id = $1",
                &[&token.id],
            )
            .await?;
    }
    let (custom_role, reach) = member_grants(&row)?;
    Ok(Principal {
        account_id: row.try_get("account_id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        role: stored_role(row.try_get("role")?)?,
        credential: Credential::Session {
            session_id: token.id,
        },
        mfa_setup_required: row.try_get("mfa_setup_required")?,
        custom_role,
        reach,
    })
}

async fn authenticate_api_key(
    pool: &Pool,
    text: &str,
    client_ip: IpAddr,
) -> Result<Principal, AuthError> {
    let token = Token::parse(TokenKind::ApiKey, text).ok_or(AuthError::ApiKeyInvalid)?;
    let client = pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT k.secret_hash, k.revoked_at IS NOT NULL AS revoked, k.expires_at, k.scopes, \
                    k.ip_allowlist, k.account_id, u.id AS user_id, u.email, {GRANT_COLUMNS}, \
                    user_needs_second_factor_setup(u.id) AS mfa_setup_required, \
                    a.ip_allowlist AS account_allowlist \
             FROM api_keys k JOIN users u ON u.id = k.created_by AND u.account_id = k.account_id \
             LEFT JOIN roles r ON r.id = u.custom_role_id \
             JOIN accounts a ON a.id = k.account_id WHERE k.id = $1"),
            &[&token.id],
        )
        .await?
        .ok_or(AuthError::ApiKeyInvalid)?;
    let hash: Vec<u8> = row.try_get("secret_hash")?;
    let revoked: bool = row.try_get("revoked")?;
    if !token.matches(&hash) || revoked {
        return Err(AuthError::ApiKeyInvalid);
    }
    let expires_at: Option<DateTime<Utc>> = row.try_get("expires_at")?;
    if let Some(at) = expires_at.filter(|at| *at <= Utc::now()) {
        return Err(AuthError::ApiKeyExpired { at });
    }
    let own: Vec<String> = row.try_get("ip_allowlist")?;
    if !allowlist::permits(&allowlist::stored(&own), client_ip) {
        return Err(AuthError::IpNotAllowed { ip: client_ip });
    }
    account_admits(&row, client_ip)?;
    client
        .execute(
            "UPDATE api_keys SET last_used_at = now() WHERE id = $1 \
             AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
            &[&token.id],
        )
        .await?;
    let scopes: Vec<String> = row.try_get("scopes")?;
    let (custom_role, reach) = member_grants(&row)?;
    Ok(Principal {
        account_id: row.try_get("account_id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        role: stored_role(row.try_get("role")?)?,
        credential: Credential::ApiKey {
            key_id: token.id,
            scopes: scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
        },
        mfa_setup_required: row.try_get("mfa_setup_required")?,
        custom_role,
        reach,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_cumulative() {
        assert!(Role::Viewer.grants(Scope::ServersRead));
        assert!(!Role::Viewer.grants(Scope::DeploymentsWrite));
        assert!(Role::Operator.grants(Scope::DeploymentsWrite));
        assert!(!Role::Operator.grants(Scope::ServersWrite));
        assert!(Role::Developer.grants(Scope::ProjectsWrite));
        assert!(!Role::Developer.grants(Scope::ApiKeysWrite));
        assert!(Role::Owner.grants(Scope::ApiKeysWrite));
    }

    #[test]
    fn api_key_narrows_but_never_widens() {
        let key = |role, scopes| Principal {
            account_id: Uuid::nil(),
            user_id: Uuid::nil(),
            email: String::new(),
            role,
            credential: Credential::ApiKey {
                key_id: Uuid::nil(),
                scopes,
            },
            mfa_setup_required: false,
            custom_role: None,
            reach: Reach::everything(),
        };
        let narrow = key(Role::Owner, vec![Scope::ServersRead]);
        assert!(narrow.allows(Scope::ServersRead));
        assert!(!narrow.allows(Scope::ServersWrite));
        // The creator was demoted to viewer after making a write key: the key loses write.
        let demoted = key(Role::Viewer, vec![Scope::ServersWrite, Scope::ServersRead]);
        assert!(!demoted.allows(Scope::ServersWrite));
        assert!(demoted.allows(Scope::ServersRead));
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
        assert_eq!(Scope::parse("servers:admin"), None);
    }

    #[test]
    fn finds_session_cookie_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; sensei_session=ss_x_y; b=2".parse().expect("header"),
        );
        assert_eq!(session_cookie(&h), Some("ss_x_y"));
        h.insert(
            http::header::AUTHORIZATION,
            "Bearer sk_abc".parse().expect("header"),
        );
        assert_eq!(bearer(&h), Some("sk_abc"));
    }
}
