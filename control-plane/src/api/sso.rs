//! Single sign-on with OpenID Connect: the account's provider (`/v1/account/sso`), and the two
//! halves of a browser sign-in the dashboard drives (`/ui/sso…`, web/sso.rs): [`begin`] sends
//! the browser to the provider with a sealed state cookie, [`complete`] checks what comes back
//! and signs the person in. The protocol itself is `identity::oidc`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth_routes::create_session;
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody};
use super::{actor_event, AppState};
use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::identity::auth::{Principal, Role};
use crate::identity::oidc::{Identity, Pending, ProviderConfig};
use crate::identity::{admission, allowlist};

/// The name of the cookie holding a started sign-in (sealed; only sent back to `/ui/sso`).
pub const STATE_COOKIE: &str = "sensei_sso";
/// How long a person has at their provider before the started sign-in expires.
pub const FLOW_SECS: i64 = 600;
/// What a member created by single sign-on has as a password hash: no password matches it.
const NO_PASSWORD: &str = "!sso";
/// The scopes asked for when none are configured.
const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
/// Bounds on the configuration.
const MAX_DOMAINS: usize = 100;
const MAX_SCOPES: usize = 20;
const MAX_ROLE_MAP: usize = 100;
const MAX_SECRET: usize = 1024;
const MAX_CA_PEM: usize = 65536;
/// The longest sealed state cookie accepted.
const MAX_STATE_COOKIE: usize = 4096;

#[derive(Serialize, ToSchema)]
pub struct SsoSettings {
    /// How people name the account on the sign-in page (`/ui/sso?org=<slug>`).
    pub slug: String,
    /// Shown as "Sign in with <display_name>".
    pub display_name: String,
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    /// Email domains whose people become members at their first sign-in.
    pub allowed_domains: Vec<String>,
    /// The role of a new member when no `role_map` entry matches.
    pub default_role: String,
    /// The ID token claim (a string or a list of strings) `role_map` reads.
    pub role_claim: Option<String>,
    /// Claim value → role, for new members; the highest matching role applies.
    pub role_map: BTreeMap<String, String>,
    /// `SHA256:…` of the CA trusted for the provider, when one is configured.
    pub ca_fingerprint: Option<String>,
    /// Password sign-in is refused for members (owners keep theirs, with a second factor).
    pub require_sso: bool,
    /// The redirect URI to register at the provider.
    pub redirect_uri: String,
    /// Where members start a sign-in.
    pub sign_in_url: String,
    pub updated_at: DateTime<Utc>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SsoChange {
    /// 3 to 40 characters: lower-case letters, digits, inner hyphens.
    pub slug: String,
    /// 1 to 60 characters, e.g. `Okta`.
    pub display_name: String,
    /// `https://…`: the provider's issuer identifier, as its discovery document states it.
    pub issuer: String,
    pub client_id: String,
    /// Required the first time; left out, the stored secret stays. Write-only.
    pub client_secret: Option<String>,
    /// Default `openid email profile`; must include `openid`.
    pub scopes: Option<Vec<String>>,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// `viewer` (default), `operator`, `developer` or `admin`.
    pub default_role: Option<String>,
    pub role_claim: Option<String>,
    pub role_map: Option<BTreeMap<String, String>>,
    /// PEM: the only CA trusted for the provider's HTTPS (a private Keycloak). Without it,
    /// the public web PKI.
    pub ca_pem: Option<String>,
    #[serde(default)]
    pub require_sso: bool,
}

/// The redirect URI an account's provider is registered with: one per account (its slug), so
/// that the callback knows which provider must have answered. With a single URI for every
/// account, a tenant's own provider could forward a victim's browser to the victim account's
/// real provider and receive the code meant for Sensei (a mix-up attack).
pub fn redirect_uri(state: &AppState, slug: &str) -> String {
    format!("{}/ui/sso/callback/{slug}", state.public_url)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::unprocessable(ErrorCode::InvalidSso, message)
}

/// An account's provider as stored.
pub struct SsoAccount {
    pub account_id: Uuid,
    pub slug: String,
    pub display_name: String,
    pub provider: ProviderConfig,
    pub allowed_domains: Vec<String>,
    pub default_role: Role,
    pub role_claim: Option<String>,
    pub role_map: BTreeMap<String, String>,
    pub require_sso: bool,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "account_id, slug, display_name, issuer, client_id, client_secret_sealed, \
     scopes, allowed_domains, default_role, role_claim, role_map, ca_pem, require_sso, updated_at";

fn from_row(state: &AppState, r: &tokio_postgres::Row) -> Result<SsoAccount, ApiError> {
    let sealed: String = r.try_get("client_secret_sealed")?;
    let secret = state
        .keys
        .decrypt(&sealed)
        .map_err(|_| ApiError::internal("the SSO client secret cannot be opened"))?;
    let role_map: serde_json::Value = r.try_get("role_map")?;
    Ok(SsoAccount {
        account_id: r.try_get("account_id")?,
        slug: r.try_get("slug")?,
        display_name: r.try_get("display_name")?,
        provider: ProviderConfig {
            issuer: r.try_get("issuer")?,
            client_id: r.try_get("client_id")?,
            client_secret: String::from_utf8(secret)
                .map_err(|_| ApiError::internal("the SSO client secret is not text"))?,
            scopes: r.try_get("scopes")?,
            ca_pem: r.try_get("ca_pem")?,
        },
        allowed_domains: r.try_get("allowed_domains")?,
        default_role: Role::parse(r.try_get("default_role")?)
            .ok_or_else(|| ApiError::internal("unknown role in database"))?,
        role_claim: r.try_get("role_claim")?,
        role_map: serde_json::from_value(role_map).unwrap_or_default(),
        require_sso: r.try_get("require_sso")?,
        updated_at: r.try_get("updated_at")?,
    })
}

async fn load(
    state: &AppState,
    filter: &str,
    value: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Option<SsoAccount>, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM account_sso WHERE {filter} = $1"),
            &[value],
        )
        .await?;
    row.map(|r| from_row(state, &r)).transpose()
}

/// The single sign-on of the account people call `slug`.
pub async fn by_slug(state: &AppState, slug: &str) -> Result<Option<SsoAccount>, ApiError> {
    let slug = slug.trim().to_lowercase();
    if !valid_slug(&slug) {
        return Ok(None);
    }
    load(state, "slug", &slug).await
}

async fn by_account(state: &AppState, account_id: Uuid) -> Result<Option<SsoAccount>, ApiError> {
    load(state, "account_id", &account_id).await
}

/// The slug of the account's single sign-on, if it has one.
pub async fn stored_slug(state: &AppState, account_id: Uuid) -> Result<Option<String>, ApiError> {
    let client = state.pool.get().await?;
    Ok(client
        .query_opt(
            "SELECT slug FROM account_sso WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .map(|r| r.get(0)))
}

/// The CA stored for the account's provider, for a form that leaves the field empty.
pub async fn stored_ca_pem(state: &AppState, account_id: Uuid) -> Result<Option<String>, ApiError> {
    let client = state.pool.get().await?;
    Ok(client
        .query_opt(
            "SELECT ca_pem FROM account_sso WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .and_then(|r| r.get(0)))
}

fn view(state: &AppState, sso: &SsoAccount) -> SsoSettings {
    SsoSettings {
        slug: sso.slug.clone(),
        display_name: sso.display_name.clone(),
        issuer: sso.provider.issuer.clone(),
        client_id: sso.provider.client_id.clone(),
        scopes: sso.provider.scopes.clone(),
        allowed_domains: sso.allowed_domains.clone(),
        default_role: sso.default_role.as_str().into(),
        role_claim: sso.role_claim.clone(),
        role_map: sso.role_map.clone(),
        ca_fingerprint: sso
            .provider
            .ca_pem
            .as_deref()
            .and_then(|pem| sensei_certs::tls::first_cert_der(pem).ok())
            .map(|der| sensei_certs::Fingerprint::of_der(&der).to_string()),
        require_sso: sso.require_sso,
        redirect_uri: redirect_uri(state, &sso.slug),
        sign_in_url: format!("{}/ui/sso?org={}", state.public_url, sso.slug),
        updated_at: sso.updated_at,
    }
}

fn valid_slug(slug: &str) -> bool {
    let bytes = slug.as_bytes();
    (3..=40).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

fn valid_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A role a provider may hand out: anything but owner, which only an owner gives.
fn grantable_role(text: &str) -> Result<Role, ApiError> {
    match Role::parse(text) {
        Some(Role::Owner) => Err(invalid(
            "single sign-on cannot make owners; an owner promotes a member",
        )),
        Some(role) => Ok(role),
        None => Err(invalid(format!(
            "{text:?} is not a role (viewer, operator, developer, admin)"
        ))),
    }
}

/// The issuer as stored: an `https://` URL without query, fragment or credentials.
fn issuer_url(text: &str) -> Result<String, ApiError> {
    let text = text.trim();
    let url = reqwest::Url::parse(text).map_err(|_| invalid("issuer must be an https:// URL"))?;
    if url.scheme() != "https"
        || url.host_str().is_none()
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
        || text.len() > 512
    {
        return Err(invalid(
            "issuer must be an https:// URL without credentials, query or fragment (at most 512 characters)",
        ));
    }
    Ok(text.to_owned())
}

/// The account's single sign-on configuration (never the client secret).
#[utoipa::path(get, path = "/v1/account/sso", tag = "account",
    responses((status = 200, body = SsoSettings),
              (status = 404, body = ErrorBody, description = "single sign-on is not configured")))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<SsoSettings>, ApiError> {
    let sso = by_account(&state, principal.account_id)
        .await?
        .ok_or_else(|| ApiError::not_found("single sign-on configuration"))?;
    Ok(Json(view(&state, &sso)))
}

/// Sets the account's OpenID Connect provider. The provider's discovery document and keys
/// are fetched before anything is stored: a provider that cannot be used is refused.
#[utoipa::path(put, path = "/v1/account/sso", tag = "account", request_body = SsoChange,
    responses((status = 200, body = SsoSettings),
              (status = 409, body = ErrorBody, description = "another account uses this slug"),
              (status = 422, body = ErrorBody, description = "a field is invalid, or the provider cannot be used")))]
pub async fn set(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<SsoChange>,
) -> Result<Json<SsoSettings>, ApiError> {
    let slug = req.slug.trim().to_lowercase();
    if !valid_slug(&slug) {
        return Err(invalid(
            "slug must be 3 to 40 characters: lower-case letters, digits and inner hyphens",
        ));
    }
    let display_name = req.display_name.trim().to_owned();
    if display_name.is_empty() || display_name.chars().count() > 60 {
        return Err(invalid("display_name must be 1 to 60 characters"));
    }
    let issuer = issuer_url(&req.issuer)?;
    let client_id = req.client_id.trim().to_owned();
    if client_id.is_empty() || client_id.len() > 512 {
        return Err(invalid("client_id must be 1 to 512 characters"));
    }
    if req
        .client_secret
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.len() > MAX_SECRET)
    {
        return Err(invalid("client_secret must be 1 to 1024 characters"));
    }
    let scopes: Vec<String> = req
        .scopes
        .unwrap_or_else(|| DEFAULT_SCOPES.iter().map(|s| (*s).to_owned()).collect());
    if scopes.len() > MAX_SCOPES
        || !scopes.iter().any(|s| s == "openid")
        || scopes.iter().any(|s| {
            s.is_empty() || s.len() > 100 || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
        })
    {
        return Err(invalid(
            "scopes must include openid, at most 20, each without spaces or quotes",
        ));
    }
    let allowed_domains: Vec<String> = req
        .allowed_domains
        .iter()
        .map(|d| d.trim().trim_start_matches('@').to_lowercase())
        .collect();
    if allowed_domains.len() > MAX_DOMAINS || !allowed_domains.iter().all(|d| valid_domain(d)) {
        return Err(invalid(
            "allowed_domains must be at most 100 domain names such as example.com",
        ));
    }
    let default_role = grantable_role(req.default_role.as_deref().unwrap_or("viewer"))?;
    let role_claim = req
        .role_claim
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    if role_claim.as_ref().is_some_and(|c| c.len() > 100) {
        return Err(invalid("role_claim must be at most 100 characters"));
    }
    let role_map = req.role_map.unwrap_or_default();
    if role_map.len() > MAX_ROLE_MAP || role_map.keys().any(|k| k.is_empty() || k.len() > 200) {
        return Err(invalid(
            "role_map holds at most 100 claim values of 1 to 200 characters",
        ));
    }
    for role in role_map.values() {
        grantable_role(role)?;
    }
    if !role_map.is_empty() && role_claim.is_none() {
        return Err(invalid("role_map needs role_claim: the claim it reads"));
    }
    let ca_pem = req.ca_pem.filter(|p| !p.trim().is_empty());
    if let Some(pem) = &ca_pem {
        if pem.len() > MAX_CA_PEM || sensei_certs::tls::sink_client_config(pem).is_err() {
            return Err(invalid(
                "ca_pem must be a PEM CA certificate (at most 64 KiB)",
            ));
        }
    }

    let stored = by_account(&state, principal.account_id).await?;
    let client_secret = match (&req.client_secret, &stored) {
        (Some(secret), _) => secret.clone(),
        (None, Some(stored)) => stored.provider.client_secret.clone(),
        (None, None) => return Err(invalid("client_secret is required the first time")),
    };
    let provider = ProviderConfig {
        issuer: issuer.clone(),
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        scopes: scopes.clone(),
        ca_pem: ca_pem.clone(),
    };
    // The provider must answer, as this issuer, with keys: a typo is found now, not at the
    // first person's sign-in.
    crate::identity::oidc::discover(&provider, &state.outbound)
        .await
        .map_err(|e| ApiError::unprocessable(ErrorCode::SsoProviderUnusable, e.to_string()))?;

    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let taken = tx
        .query_opt(
            "SELECT 1 FROM account_sso WHERE slug = $1 AND account_id <> $2",
            &[&slug, &principal.account_id],
        )
        .await?;
    if taken.is_some() {
        return Err(ApiError::conflict(
            ErrorCode::SlugTaken,
            "another account uses this slug; choose another",
        ));
    }
    let role_map_json = serde_json::to_value(&role_map).unwrap_or_else(|_| json!({}));
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO account_sso (account_id, slug, display_name, issuer, client_id, \
                   client_secret_sealed, scopes, allowed_domains, default_role, role_claim, \
                   role_map, ca_pem, require_sso) \
                 VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) \
                 ON CONFLICT (account_id) DO UPDATE SET slug = $2, display_name = $3, \
                   issuer = $4, client_id = $5, client_secret_sealed = $6, scopes = $7, \
                   allowed_domains = $8, default_role = $9, role_claim = $10, role_map = $11, \
                   ca_pem = $12, require_sso = $13, updated_at = now() \
                 RETURNING {COLUMNS}"
            ),
            &[
                &principal.account_id,
                &slug,
                &display_name,
                &issuer,
                &client_id,
                &state.keys.encrypt(client_secret.as_bytes()),
                &scopes,
                &allowed_domains,
                &default_role.as_str(),
                &role_claim,
                &role_map_json,
                &ca_pem,
                &req.require_sso,
            ],
        )
        .await?;
    let sso = from_row(&state, &row)?;
    let settings = view(&state, &sso);
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "account.sso_updated",
            ("account", principal.account_id),
            json!({
                "slug": slug,
                "issuer": issuer,
                "client_id": client_id,
                "client_secret_changed": req.client_secret.is_some(),
                "scopes": scopes,
                "allowed_domains": allowed_domains,
                "default_role": default_role.as_str(),
                "role_claim": role_claim,
                "role_map": role_map_json,
                "ca_fingerprint": settings.ca_fingerprint,
                "require_sso": req.require_sso,
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(settings))
}

/// Removes the account's single sign-on: password sign-in works again for everyone; members
/// who only ever signed in through the provider set a password by password reset.
#[utoipa::path(delete, path = "/v1/account/sso", tag = "account",
    responses((status = 204, description = "removed"),
              (status = 404, body = ErrorBody, description = "single sign-on is not configured")))]
pub async fn remove(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let issuer: String = tx
        .query_opt(
            "DELETE FROM account_sso WHERE account_id = $1 RETURNING issuer",
            &[&principal.account_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("single sign-on configuration"))?
        .get(0);
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "account.sso_removed",
            ("account", principal.account_id),
            json!({ "issuer": issuer }),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the sealed state cookie carries between [`begin`] and [`complete`].
#[derive(Serialize, Deserialize)]
struct Flow {
    login_id: Uuid,
    account_id: Uuid,
    pending: Pending,
    expires: i64,
    /// Set when a signed-in member connects their identity at the provider to themselves.
    #[serde(default)]
    link_user: Option<Uuid>,
}

/// A started sign-in: where to send the browser, and the state cookie's value.
pub struct Begun {
    pub authorize_url: String,
    pub state_cookie: String,
}

/// Starts a sign-in at the provider of the account named `slug` (at most
/// [`admission::SSO_START_PER_ADDRESS`] per client address).
pub async fn begin(
    state: &AppState,
    meta: &ClientMeta,
    slug: &str,
    link_user: Option<Uuid>,
) -> Result<Begun, ApiError> {
    {
        let mut client = state.pool.get().await?;
        if let Err(refused) = admission::reserve(
            &mut client,
            admission::SSO_START_PER_ADDRESS,
            &admission::address_key(meta.ip),
        )
        .await?
        {
            return Err(ApiError::too_many_of(
                ErrorCode::TooManyAttempts,
                "too many sign-ins started from this address; try again later",
                refused.retry_after_secs,
            ));
        }
    }
    let sso = by_slug(state, slug).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no account signs in with single sign-on under that name",
        )
    })?;
    let started = state
        .oidc_providers
        .start(
            &sso.provider,
            &state.outbound,
            &redirect_uri(state, &sso.slug),
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::SsoProviderUnusable,
                e.to_string(),
            )
        })?;
    let login_id = Uuid::new_v4();
    let client = state.pool.get().await?;
    // Started sign-ins nobody finished are forgotten once expired.
    client
        .execute(
            "DELETE FROM sso_logins WHERE expires_at < now() - interval '1 hour'",
            &[],
        )
        .await?;
    client
        .execute(
            "INSERT INTO sso_logins (id, account_id, expires_at) \
             VALUES ($1, $2, now() + make_interval(secs => $3))",
            &[&login_id, &sso.account_id, &(FLOW_SECS as f64)],
        )
        .await?;
    let flow = Flow {
        login_id,
        account_id: sso.account_id,
        pending: started.pending,
        expires: Utc::now().timestamp() + FLOW_SECS,
        link_user,
    };
    let plain = serde_json::to_vec(&flow).map_err(|e| ApiError::internal(&e.to_string()))?;
    Ok(Begun {
        authorize_url: started.authorize_url,
        state_cookie: state.keys.encrypt(&plain),
    })
}

/// Why a sign-in through the provider was refused: said to the person as is.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub message: String,
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status(),
            message: e.message().to_owned(),
        }
    }
}

impl From<tokio_postgres::Error> for Refused {
    fn from(e: tokio_postgres::Error) -> Self {
        ApiError::from(e).into()
    }
}

impl From<deadpool_postgres::PoolError> for Refused {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApiError::from(e).into()
    }
}

fn refused(status: StatusCode, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

/// A finished sign-in: the session cookie's value.
pub struct SignedIn {
    pub session_cookie: String,
    pub user_id: Uuid,
}

/// What came back from the provider, as the callback's query holds it.
pub struct Callback<'a> {
    /// The account the provider answered for: the slug in the redirect URI's path.
    pub slug: &'a str,
    pub state_cookie: Option<&'a str>,
    pub state: &'a str,
    pub code: &'a str,
}

/// Finishes a sign-in: the state cookie must be this browser's and unspent, the state must
/// match it, the provider's ID token must verify, and the person must be (or be allowed to
/// become) a member of the account.
pub async fn complete(
    state: &AppState,
    meta: &ClientMeta,
    callback: Callback<'_>,
) -> Result<SignedIn, Refused> {
    let start_again = "this sign-in was not started in this browser, or took too long; start again";
    let flow: Flow = callback
        .state_cookie
        .filter(|c| c.len() <= MAX_STATE_COOKIE)
        .and_then(|c| state.keys.decrypt(c).ok())
        .and_then(|plain| serde_json::from_slice(&plain).ok())
        .ok_or_else(|| refused(StatusCode::BAD_REQUEST, start_again))?;
    if flow.expires < Utc::now().timestamp()
        || !bool::from(
            callback
                .state
                .as_bytes()
                .ct_eq(flow.pending.state.as_bytes()),
        )
    {
        return Err(refused(StatusCode::BAD_REQUEST, start_again));
    }
    // Spent before the code is redeemed: a callback replayed (even in this same browser)
    // finds it used.
    let spent = state
        .pool
        .get()
        .await?
        .execute(
            "UPDATE sso_logins SET used_at = now() WHERE id = $1 AND account_id = $2 \
             AND used_at IS NULL AND expires_at > now()",
            &[&flow.login_id, &flow.account_id],
        )
        .await?;
    if spent == 0 {
        return Err(refused(StatusCode::BAD_REQUEST, start_again));
    }
    let sso = by_account(state, flow.account_id).await?.ok_or_else(|| {
        refused(
            StatusCode::BAD_REQUEST,
            "single sign-on is not configured for this account any more",
        )
    })?;
    // The answer came back on another account's redirect URI than the one this browser
    // started at: a provider is forwarding what is not its own. Nothing is redeemed.
    if sso.slug != callback.slug {
        audit_failure(
            state,
            meta,
            &sso,
            None,
            "the answer came back for another account's single sign-on",
        )
        .await?;
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "this answer is for another account's single sign-on; start again",
        ));
    }
    let identity = match state
        .oidc_providers
        .finish(
            &sso.provider,
            &state.outbound,
            &redirect_uri(state, &sso.slug),
            &flow.pending,
            callback.code,
        )
        .await
    {
        Ok(identity) => identity,
        Err(e) => {
            let message = e.to_string();
            audit_failure(state, meta, &sso, None, &message).await?;
            return Err(refused(StatusCode::UNAUTHORIZED, message));
        }
    };
    if let Some(user_id) = flow.link_user {
        if let Err(refusal) = link(state, meta, &sso, &identity, user_id).await {
            audit_failure(state, meta, &sso, Some(&identity), &refusal.message).await?;
            return Err(refusal);
        }
    }
    match admit(state, meta, &sso, &identity).await {
        Ok(signed_in) => Ok(signed_in),
        Err(refusal) => {
            audit_failure(state, meta, &sso, Some(&identity), &refusal.message).await?;
            Err(refusal)
        }
    }
}

/// Connects the provider's `(issuer, subject)` to the member who started the sign-in while
/// signed in: how an existing member (who has a password) comes to sign in through the
/// provider, since nobody is ever linked by email.
async fn link(
    state: &AppState,
    meta: &ClientMeta,
    sso: &SsoAccount,
    identity: &Identity,
    user_id: Uuid,
) -> Result<(), Refused> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let member = tx
        .query_opt(
            "SELECT email FROM users WHERE id = $1 AND account_id = $2",
            &[&user_id, &sso.account_id],
        )
        .await?
        .ok_or_else(|| {
            refused(
                StatusCode::FORBIDDEN,
                "you are no longer a member of this account",
            )
        })?;
    let email: String = member.get(0);
    let linked = tx
        .execute(
            "INSERT INTO sso_identities (issuer, subject, user_id) VALUES ($1, $2, $3)              ON CONFLICT DO NOTHING",
            &[&identity.issuer, &identity.subject, &user_id],
        )
        .await?;
    if linked == 0 {
        let owner: Option<Uuid> = tx
            .query_opt(
                "SELECT user_id FROM sso_identities WHERE issuer = $1 AND subject = $2",
                &[&identity.issuer, &identity.subject],
            )
            .await?
            .map(|r| r.get(0));
        return if owner == Some(user_id) {
            Ok(())
        } else {
            Err(refused(
                StatusCode::CONFLICT,
                "this identity at the provider is connected to another user, or you are already connected to another identity there",
            ))
        };
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(sso.account_id),
            actor: Actor::User { id: user_id, email },
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.sso_linked",
            target: Some(("user", user_id)),
            outcome: Outcome::Success,
            metadata: json!({ "issuer": identity.issuer, "subject": identity.subject }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The role a new member gets: the highest `role_map` entry the role claim matches, else the
/// default.
fn role_for(sso: &SsoAccount, identity: &Identity) -> Role {
    let values: Vec<String> = match sso
        .role_claim
        .as_deref()
        .map(|claim| &identity.claims[claim])
    {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    values
        .iter()
        .filter_map(|v| sso.role_map.get(v))
        .filter_map(|r| Role::parse(r))
        .filter(|r| *r != Role::Owner)
        .max()
        .unwrap_or(sso.default_role)
}

/// Signs in the member the provider's `(issuer, subject)` names, creating them first when the
/// account allows it.
async fn admit(
    state: &AppState,
    meta: &ClientMeta,
    sso: &SsoAccount,
    identity: &Identity,
) -> Result<SignedIn, Refused> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let linked = tx
        .query_opt(
            "SELECT u.id, u.account_id, u.email FROM sso_identities i JOIN users u ON u.id = i.user_id \
             WHERE i.issuer = $1 AND i.subject = $2",
            &[&identity.issuer, &identity.subject],
        )
        .await?;
    let (user_id, email, provisioned) = match linked {
        Some(row) if row.get::<_, Uuid>(1) == sso.account_id => {
            (row.get::<_, Uuid>(0), row.get::<_, String>(2), None)
        }
        Some(_) => {
            return Err(refused(
                StatusCode::FORBIDDEN,
                "this identity belongs to a member of another account",
            ))
        }
        None => {
            let email = identity
                .email
                .as_deref()
                .and_then(|e| crate::identity::names::normalise_email(e).ok())
                .ok_or_else(|| {
                    refused(
                        StatusCode::FORBIDDEN,
                        "the identity provider sent no email address; ask your administrator to add the email scope",
                    )
                })?;
            if !identity.email_verified {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    "the identity provider has not verified this email address, so it cannot make you a member",
                ));
            }
            let domain = email
                .rsplit_once('@')
                .map(|(_, d)| d.to_lowercase())
                .unwrap_or_default();
            if !sso.allowed_domains.contains(&domain) {
                return Err(refused(
                    StatusCode::FORBIDDEN,
                    format!(
                        "people with {domain} addresses cannot join this account through single sign-on; ask an administrator for an invitation"
                    ),
                ));
            }
            let existing = tx
                .query_opt(
                    "SELECT account_id FROM users WHERE lower(email) = lower($1)",
                    &[&email],
                )
                .await?;
            if existing.is_some() {
                // Never linked by email: whoever controls the provider's directory could
                // otherwise take over the account of anyone whose address they can assert.
                return Err(refused(
                    StatusCode::CONFLICT,
                    "a Sensei user with this email already exists and is not linked to this identity: sign in with your password and connect it under Settings → Single sign-on",
                ));
            }
            let role = role_for(sso, identity);
            let user_id = Uuid::new_v4();
            tx.execute(
                "INSERT INTO users (id, account_id, email, password_hash, role) VALUES ($1,$2,$3,$4,$5)",
                &[&user_id, &sso.account_id, &email, &NO_PASSWORD, &role.as_str()],
            )
            .await?;
            tx.execute(
                "INSERT INTO sso_identities (issuer, subject, user_id) VALUES ($1,$2,$3)",
                &[&identity.issuer, &identity.subject, &user_id],
            )
            .await?;
            (user_id, email, Some(role))
        }
    };
    let networks: Vec<String> = tx
        .query_one(
            "SELECT ip_allowlist FROM accounts WHERE id = $1",
            &[&sso.account_id],
        )
        .await?
        .get(0);
    if !allowlist::permits(&allowlist::stored(&networks), meta.ip) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            format!("this account may not be used from {}", meta.ip),
        ));
    }
    let actor = Actor::User {
        id: user_id,
        email: email.clone(),
    };
    if let Some(role) = provisioned {
        audit::append(
            &tx,
            state.keys.audit_keys(),
            &AuditEvent {
                account_id: Some(sso.account_id),
                actor: actor.clone(),
                client_ip: Some(meta.ip.to_string()),
                user_agent: Some(meta.user_agent.clone()),
                action: "member.joined",
                target: Some(("user", user_id)),
                outcome: Outcome::Success,
                metadata: json!({
                    "method": "oidc",
                    "issuer": identity.issuer,
                    "role": role.as_str(),
                }),
            },
        )
        .await?;
    }
    let (session_id, cookie) = create_session(&tx, user_id, meta).await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(sso.account_id),
            actor,
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.logged_in",
            target: Some(("session", session_id)),
            outcome: Outcome::Success,
            metadata: json!({
                "method": "oidc",
                "issuer": identity.issuer,
                "mfaUsed": false,
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(SignedIn {
        session_cookie: cookie,
        user_id,
    })
}

/// Records a refused sign-in through the provider (never a token; the subject, which is an
/// opaque identifier, and the reason).
async fn audit_failure(
    state: &AppState,
    meta: &ClientMeta,
    sso: &SsoAccount,
    identity: Option<&Identity>,
    reason: &str,
) -> Result<(), Refused> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &AuditEvent {
            account_id: Some(sso.account_id),
            actor: Actor::Anonymous,
            client_ip: Some(meta.ip.to_string()),
            user_agent: Some(meta.user_agent.clone()),
            action: "user.login_failed",
            target: None,
            outcome: Outcome::Failure,
            metadata: json!({
                "method": "oidc",
                "issuer": sso.provider.issuer,
                "subject": identity.map(|i| i.subject.clone()),
                "failed_factor": "oidc",
                "reason": reason.chars().take(300).collect::<String>(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_domains_are_checked() {
        assert!(valid_slug("acme"));
        assert!(valid_slug("acme-eu-2"));
        assert!(!valid_slug("ac"));
        assert!(!valid_slug("-acme"));
        assert!(!valid_slug("Acme"));
        assert!(!valid_slug("acme_eu"));
        assert!(valid_domain("example.com"));
        assert!(!valid_domain("example"));
        assert!(!valid_domain("exa mple.com"));
        assert!(!valid_domain("-x.com"));
    }

    #[test]
    fn issuers_are_https_without_extras() {
        assert!(issuer_url("https://idp.example.com/realms/acme").is_ok());
        assert!(issuer_url("http://idp.example.com").is_err());
        assert!(issuer_url("https://u:p@idp.example.com").is_err());
        assert!(issuer_url("https://idp.example.com/?x=1").is_err());
    }
}
