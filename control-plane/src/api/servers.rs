//! Servers: create (an agent server gets a single-use enrollment token), list, show, delete,
//! revoke the agent's certificate, issue a new enrollment token. Confined to the caller's
//! account: another account's server is a 404, never a 403.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use http::StatusCode;
use sensei_certs::Fingerprint;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{ClientMeta, JsonBody, Path};
use super::page::{Cursor, Order, Page, PageQuery};
use super::{actor_event, AppState};
use crate::audit;
use crate::identity::auth::Principal;
use crate::identity::tokens::{Token, TokenKind};
use crate::runners::agent::cert_events;

/// Default lifetime of an enrollment token.
pub const ENROLLMENT_TTL_SECS: i64 = 3600;
const MAX_ENROLLMENT_TTL_SECS: i64 = 7 * 24 * 3600;
const MAX_LABELS: usize = 32;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServer {
    pub name: String,
    /// Host name or address (for agent servers: informational).
    pub host: String,
    pub port: Option<u16>,
    pub username: Option<String>,
    /// `agent` (default) or `ssh`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// For SSH servers: `key` (default) or `password`.
    pub auth: Option<String>,
    pub password: Option<String>,
    pub host_key: Option<String>,
    /// e.g. `{"env": "prod", "role": "web"}`
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Lifetime of the enrollment token in seconds (60 to 604800, default 3600).
    pub enrollment_ttl_seconds: Option<i64>,
}

fn default_transport() -> String {
    "agent".into()
}

#[derive(Serialize, ToSchema)]
pub struct AgentStatus {
    pub connected: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub version: Option<String>,
    /// The agent's operating system (os-release's `PRETTY_NAME`, at most 100 printable
    /// ASCII characters); null until an agent that reports it connects.
    pub os: Option<String>,
    /// The agent's architecture, e.g. `x86_64`, `aarch64`; null like `os`.
    pub arch: Option<String>,
    pub certificate_serial: Option<String>,
    pub certificate_fingerprint: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// When the certificate shown was issued by a renewal over the agent's connection; null
    /// for one issued at enrollment.
    pub certificate_renewed_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, ToSchema)]
pub struct ServerView {
    pub id: Uuid,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub transport: String,
    #[schema(value_type = Object)]
    pub labels: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// The CA fingerprint an agent pins at enrollment.
    pub ca_fingerprint: String,
    /// Where agents connect (UDP).
    pub agent_endpoint: String,
    pub agent: AgentStatus,
    /// SSH servers: `key` or `password`.
    pub auth: Option<String>,
    /// SSH servers with key auth: `SHA256:…` of the platform's key, as `ssh-keygen -lf` prints
    /// it. The line to remove from `authorized_keys` to cut the platform off.
    pub fingerprint: Option<String>,
    /// SSH servers: the pinned host key.
    pub host_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Enrollment {
    /// Single use; shown once.
    pub enrollment_token: String,
    pub enrollment_expires_at: DateTime<Utc>,
    /// The command to run on the server.
    pub enroll_command: String,
}

#[derive(Serialize, ToSchema)]
pub struct CreatedServer {
    #[serde(flatten)]
    pub server: ServerView,
    /// Agent servers: the enrollment token and command, once.
    #[serde(flatten)]
    pub enrollment: Option<Enrollment>,
    /// SSH servers with key auth: the `authorized_keys` line to install, shown once.
    pub public_key: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub enrollment_ttl_seconds: Option<i64>,
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidLabels,
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    let key_ok = |k: &str| {
        (1..=63).contains(&k.len())
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    for (k, v) in labels {
        if !key_ok(k) {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidLabels,
                format!("label key {k:?}: 1 to 63 letters, digits, '-', '_', '.', '/'"),
            ));
        }
        if v.len() > 63 || v.chars().any(|c| c.is_control()) {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidLabels,
                format!("label {k:?}: values are at most 63 printable characters"),
            ));
        }
    }
    Ok(())
}

fn ttl(requested: Option<i64>) -> Result<i64, ApiError> {
    let secs = requested.unwrap_or(ENROLLMENT_TTL_SECS);
    if !(60..=MAX_ENROLLMENT_TTL_SECS).contains(&secs) {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidTtl,
            format!("enrollment_ttl_seconds must be between 60 and {MAX_ENROLLMENT_TTL_SECS}"),
        ));
    }
    Ok(secs)
}

/// Whether the agent of server `s` is connected: a replica holds its session and that
/// replica is alive (its heartbeat in `replicas` is younger than
/// [`crate::jobs::sweep::REPLICA_SILENCE_SECS`]; one that died without saying so leaves
/// `connected_replica` set). Agents' own heartbeats are answered in memory (the session
/// closes a silent one), so an idle fleet costs the database one write per replica, not one
/// per agent.
macro_rules! connected_sql {
    () => {
        "(s.connected_replica IS NOT NULL AND EXISTS (SELECT 1 FROM replicas r \
           WHERE r.id = s.connected_replica AND r.heartbeat_at > now() - interval '15 seconds'))"
    };
}
// The literal 15 s above is this constant (SQL text cannot name it).
const _: () = assert!(crate::jobs::sweep::REPLICA_SILENCE_SECS == 15);

/// When the agent of server `s` was last seen: now, as far as anyone knows, while it is
/// connected (its replica's latest heartbeat), else when it disconnected.
macro_rules! last_seen_sql {
    () => {
        "coalesce((SELECT r.heartbeat_at FROM replicas r WHERE r.id = s.connected_replica \
           AND r.heartbeat_at > now() - interval '15 seconds'), s.last_seen_at)"
    };
}

/// What the dashboard says about a server's connection: `ssh` (no agent), `connected`,
/// `not enrolled` (no valid certificate) or `offline`.
pub fn presence_word(transport: &str, connected: bool, enrolled: bool) -> &'static str {
    if transport == "ssh" {
        "ssh"
    } else if connected {
        "connected"
    } else if !enrolled {
        "not enrolled"
    } else {
        "offline"
    }
}

impl ServerView {
    /// [`presence_word`] for this server.
    pub fn presence(&self) -> &'static str {
        presence_word(
            &self.transport,
            self.agent.connected,
            self.agent.certificate_fingerprint.is_some(),
        )
    }
}

/// A server's row as the API shows it.
const VIEW_SQL: &str = concat!(
    "SELECT s.id, s.name, s.host, s.port, s.username, s.transport, s.labels, s.created_at, ",
    last_seen_sql!(),
    ", s.agent_version, ",
    connected_sql!(),
    ", \
     c.serial, c.fingerprint, c.not_after, s.ssh_auth, s.ssh_key_fingerprint, s.host_key, \
     c.renewed_at, s.agent_os, s.agent_arch \
     FROM servers s LEFT JOIN LATERAL ( \
       SELECT serial, fingerprint, not_after, \
         CASE WHEN renewed_from IS NOT NULL THEN issued_at END AS renewed_at \
       FROM agent_certificates \
       WHERE server_id = s.id AND revoked_at IS NULL AND retired_at IS NULL \
       ORDER BY issued_at DESC LIMIT 1) c ON true \
     WHERE s.account_id = $1 AND s.deleted_at IS NULL"
);

fn view(state: &AppState, row: &tokio_postgres::Row) -> ServerView {
    let fingerprint: Option<&[u8]> = row.get(12);
    ServerView {
        id: row.get(0),
        name: row.get(1),
        host: row.get(2),
        port: u16::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        username: row.get(4),
        transport: row.get(5),
        labels: row.get(6),
        created_at: row.get(7),
        ca_fingerprint: state.ca_authority.presented_fingerprint().to_string(),
        agent_endpoint: state.agent_endpoint.clone(),
        agent: AgentStatus {
            last_seen_at: row.get(8),
            version: row.get(9),
            os: row.get(18),
            arch: row.get(19),
            connected: row.get(10),
            certificate_serial: row.get(11),
            certificate_fingerprint: fingerprint
                .and_then(Fingerprint::from_raw)
                .map(|f| f.to_string()),
            expires_at: row.get(13),
            certificate_renewed_at: row.get(17),
        },
        auth: row.get(14),
        fingerprint: row.get(15),
        host_key: row.get(16),
    }
}

/// The server `id` if it is the caller's account's and in their reach.
async fn load(state: &AppState, principal: &Principal, id: Uuid) -> Result<ServerView, ApiError> {
    let client = state.pool.get().await?;
    let row = client
        .query_opt(
            &format!("{VIEW_SQL} AND s.id = $2 AND ($3::jsonb IS NULL OR s.labels @> $3)"),
            &[&principal.account_id, &id, &principal.reach.server_filter()],
        )
        .await?
        .ok_or_else(|| ApiError::not_found("server"))?;
    Ok(view(state, &row))
}

/// Creates a token for `server_id`, replacing unused ones, inside `tx`.
async fn issue_token(
    state: &AppState,
    tx: &tokio_postgres::Transaction<'_>,
    server_id: Uuid,
    ttl_secs: i64,
) -> Result<Enrollment, ApiError> {
    let token = Token::generate();
    tx.execute(
        "DELETE FROM enrollment_tokens WHERE server_id = $1 AND used_at IS NULL",
        &[&server_id],
    )
    .await?;
    let row = tx
        .query_one(
            "INSERT INTO enrollment_tokens (id, server_id, secret_hash, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4)) RETURNING expires_at",
            &[
                &token.id,
                &server_id,
                &token.secret_hash(),
                &(ttl_secs as f64),
            ],
        )
        .await?;
    let text = token.render(TokenKind::Enrollment);
    Ok(Enrollment {
        enroll_command: format!(
            "sensei-agent enroll --control-plane {} --token {text} --ca-fingerprint {} --server-id {server_id}",
            state.agent_endpoint,
            state.ca_authority.presented_fingerprint()
        ),
        enrollment_token: text,
        enrollment_expires_at: row.get(0),
    })
}

/// Adds a server. An agent server's answer holds its enrollment token, once.
#[utoipa::path(post, path = "/v1/servers", tag = "servers", request_body = CreateServer,
    responses((status = 201, body = CreatedServer),
              (status = 422, body = ErrorBody, description = "invalid name, host, labels or transport")))]
pub async fn create(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    JsonBody(req): JsonBody<CreateServer>,
) -> Result<(StatusCode, Json<CreatedServer>), ApiError> {
    let name = req.name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidName,
            "name must be 1 to 200 characters",
        ));
    }
    let host = req.host.trim().to_owned();
    if host.is_empty()
        || host.len() > 255
        || host.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::unprocessable(
            ErrorCode::InvalidHost,
            "host must be a host name or address",
        ));
    }
    check_labels(&req.labels)?;
    let id = Uuid::new_v4();
    let labels = json!(req.labels);
    if !principal.reach.reaches_server(&labels) {
        return Err(ApiError::outside_scope("a server with these labels"));
    }
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    let (enrollment, public_key) = match req.transport.as_str() {
        "agent" => {
            if req.auth.is_some() || req.password.is_some() || req.host_key.is_some() {
                return Err(ApiError::unprocessable(
                    ErrorCode::InvalidField,
                    "auth, password and host_key apply to SSH servers only",
                ));
            }
            let ttl_secs = ttl(req.enrollment_ttl_seconds)?;
            tx.execute(
                "INSERT INTO servers (id, account_id, name, host, port, username, transport, labels) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'agent', $7)",
                &[&id, &principal.account_id, &name, &host, &i32::from(req.port.unwrap_or(22)), &req.username, &labels],
            )
            .await?;
            (Some(issue_token(&state, &tx, id, ttl_secs).await?), None)
        }
        "ssh" => {
            let ssh = SshCredentials::from_request(&state, id, &req)?;
            tx.execute(
                "INSERT INTO servers (id, account_id, name, host, port, username, transport, labels, \
                 ssh_auth, ssh_private_key_ciphertext, ssh_password_ciphertext, ssh_key_fingerprint, host_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'ssh', $7, $8, $9, $10, $11, $12)",
                &[&id, &principal.account_id, &name, &host, &i32::from(req.port.unwrap_or(22)), &req.username,
                  &labels, &ssh.auth, &ssh.sealed_key, &ssh.sealed_password, &ssh.fingerprint, &ssh.host_key],
            )
            .await?;
            (None, ssh.public_line)
        }
        other => {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidTransport,
                format!("transport {other:?}: use \"agent\" or \"ssh\""),
            ))
        }
    };
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "server.created",
            ("server", id),
            json!({"name": name, "transport": req.transport}),
        ),
    )
    .await?;
    tx.commit().await?;
    let server = load(&state, &principal, id).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedServer {
            server,
            enrollment,
            public_key,
        }),
    ))
}

/// What an SSH server stores, checked and sealed.
struct SshCredentials {
    auth: String,
    sealed_key: Option<String>,
    sealed_password: Option<String>,
    fingerprint: Option<String>,
    host_key: Option<String>,
    public_line: Option<String>,
}

impl SshCredentials {
    fn from_request(state: &AppState, id: Uuid, req: &CreateServer) -> Result<Self, ApiError> {
        let user_ok = req.username.as_deref().is_some_and(|u| {
            (1..=32).contains(&u.len())
                && u.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                && !u.starts_with('-')
        });
        if !user_ok {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidUsername,
                "SSH servers need the login username (letters, digits, . _ -)",
            ));
        }
        if req.enrollment_ttl_seconds.is_some() {
            return Err(ApiError::unprocessable(
                ErrorCode::InvalidField,
                "enrollment_ttl_seconds applies to agent servers only",
            ));
        }
        let host_key = match &req.host_key {
            Some(line) => {
                let key = crate::secrets::ssh_keys::public_key(line)
                    .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidHostKey, e.0))?;
                Some(key.to_openssh().map_err(|e| {
                    ApiError::unprocessable(ErrorCode::InvalidHostKey, e.to_string())
                })?)
            }
            None => None,
        };
        match req.auth.as_deref().unwrap_or("key") {
            "key" => {
                if req.password.is_some() {
                    return Err(ApiError::unprocessable(
                        ErrorCode::InvalidField,
                        "password applies to auth \"password\" only",
                    ));
                }
                let key = crate::secrets::ssh_keys::LoginKey::generate(id)
                    .map_err(|e| ApiError::internal(&e.0))?;
                Ok(Self {
                    auth: "key".into(),
                    sealed_key: Some(state.keys.encrypt(key.private_openssh.as_bytes())),
                    sealed_password: None,
                    fingerprint: Some(key.fingerprint),
                    host_key,
                    public_line: Some(key.authorized_keys_line),
                })
            }
            "password" => {
                let password = req
                    .password
                    .as_deref()
                    .filter(|p| !p.is_empty() && p.len() <= 1024)
                    .ok_or_else(|| {
                        ApiError::unprocessable(
                            ErrorCode::InvalidPassword,
                            "auth \"password\" needs the login password",
                        )
                    })?;
                Ok(Self {
                    auth: "password".into(),
                    sealed_key: None,
                    sealed_password: Some(state.keys.encrypt(password.as_bytes())),
                    fingerprint: None,
                    host_key,
                    public_line: None,
                })
            }
            other => Err(ApiError::unprocessable(
                ErrorCode::InvalidAuth,
                format!("auth {other:?}: use \"key\" or \"password\""),
            )),
        }
    }
}

/// Lists the account's servers.
#[utoipa::path(get, path = "/v1/servers", tag = "servers",
    params(("label" = Option<String>, Query,
            description = "only servers with this label, written `key=value`; repeat to require several"),
           ("agent_version" = Option<String>, Query, description = "only servers whose agent reported this version"),
           ("certificate_expires_before" = Option<String>, Query,
            description = "only agent servers whose current certificate expires before this time (RFC 3339)"),
           ("ca" = Option<String>, Query,
            description = "`old`: only agent servers whose newest certificate was not issued by the current CA. During a CA rotation, the agents that have not moved yet; after `ca retire`, the ones that must enroll again"),
           ("connected" = Option<bool>, Query,
            description = "`true`: only servers whose agent is connected now; `false`: only the others (SSH servers, agents offline or not enrolled)"),
           ("job_key" = Option<String>, Query,
            description = "`old`: only agent servers whose agent has not acknowledged the current job-signing key. During a job-key rotation, the ones whose jobs are still signed by the previous key; after `job-key retire`, the ones that must enroll again"),
           PageQuery),
    responses((status = 200, body = ServerList), (status = 400, body = ErrorBody, description = "invalid limit or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    RawQuery(query): RawQuery,
) -> Result<Json<ServerList>, ApiError> {
    let mut selector = serde_json::Map::new();
    let params: Vec<(String, String)> =
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let single = |name: &str| params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
    let agent_version = single("agent_version").cloned();
    if agent_version.as_ref().is_some_and(|v| v.len() > 64) {
        return Err(ApiError::bad_request(
            ErrorCode::InvalidFilter,
            "agent_version is at most 64 characters",
        ));
    }
    let expires_before = single("certificate_expires_before")
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::bad_request(
                        ErrorCode::InvalidFilter,
                        "certificate_expires_before is a time such as 2027-01-31T00:00:00Z",
                    )
                })
        })
        .transpose()?;
    let labels = params
        .iter()
        .filter(|(name, _)| name == "label")
        .map(|(_, value)| value.clone());
    for pair in labels {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ApiError::bad_request(
                ErrorCode::InvalidLabelFilter,
                format!("label {pair:?}: write key=value"),
            )
        })?;
        selector.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    let connected = match single("connected").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidFilter,
                format!("connected {other:?}: write true or false"),
            ))
        }
    };
    let (mut old_ca, mut old_job_key) = (false, false);
    for (name, value) in &params {
        match (name.as_str(), value.as_str()) {
            ("ca", "old") => old_ca = true,
            ("ca", other) => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidCaFilter,
                    format!("ca {other:?}: the only filter is ca=old"),
                ))
            }
            ("job_key", "old") => old_job_key = true,
            ("job_key", other) => {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidFilter,
                    format!("job_key {other:?}: the only filter is job_key=old"),
                ))
            }
            _ => {}
        }
    }
    let page = PageQuery::from_raw(query.as_deref())?.page()?;
    let client = state.pool.get().await?;
    let current_ca = state.ca_authority.ring().current.fingerprint();
    let current_ca = current_ca.as_bytes().as_slice();
    // The newest certificate (revoked ones aside) names another CA than the issuing one.
    let old_ca_sql = if old_ca {
        " AND EXISTS (SELECT 1 FROM (SELECT ca_fingerprint FROM agent_certificates \
           WHERE server_id = s.id AND revoked_at IS NULL ORDER BY issued_at DESC LIMIT 1) n \
           WHERE n.ca_fingerprint IS DISTINCT FROM $9) AND s.transport = 'agent'"
    } else {
        " AND $9::bytea IS NOT NULL"
    };
    let current_job_key = state.job_keys.ring().current_public();
    let current_job_key = current_job_key.as_slice();
    let old_job_key_sql = if old_job_key {
        format!(
            " AND {}",
            crate::runners::agent::job_key_rotation::OLD_JOB_KEY_SQL.replace("$KEY", "$10")
        )
    } else {
        " AND $10::bytea IS NOT NULL".to_owned()
    };
    let rows = client
        .query(
            &format!(
                "{VIEW_SQL} AND s.labels @> $2 AND ($3::jsonb IS NULL OR s.labels @> $3) \
                 AND ($4::text IS NULL OR s.agent_version = $4) \
                 AND ($5::timestamptz IS NULL OR c.not_after < $5){old_ca_sql}{old_job_key_sql} \
                 AND ($11::bool IS NULL OR {} = $11){}",
                connected_sql!(),
                Page::keyset_sql("s.created_at", "s.id", Order::OldestFirst, 6)
            ),
            &[
                &principal.account_id,
                &serde_json::Value::Object(selector),
                &principal.reach.server_filter(),
                &agent_version,
                &expires_before,
                &page.after_time(),
                &page.after_id(),
                &page.fetch(),
                &current_ca,
                &current_job_key,
                &connected,
            ],
        )
        .await?;
    let (servers, next_cursor) = page.finish(
        rows.iter().map(|r| view(&state, r)).collect(),
        |s: &ServerView| Cursor::at(s.created_at, s.id),
    );
    Ok(Json(ServerList {
        servers,
        next_cursor,
    }))
}

/// One server, with its agent's status.
#[utoipa::path(get, path = "/v1/servers/{id}", tag = "servers",
    params(("id" = Uuid, Path, description = "server id")),
    responses((status = 200, body = ServerView), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<Json<ServerView>, ApiError> {
    Ok(Json(load(&state, &principal, id).await?))
}

#[derive(Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// Only this server (its page); otherwise every agent server the caller reaches.
    pub server_id: Option<Uuid>,
}

/// One agent server's presence, as a presence event carries it.
#[derive(Serialize, PartialEq, Clone, ToSchema)]
pub struct Presence {
    pub id: Uuid,
    /// `connected`, `offline` or `not enrolled`.
    pub status: &'static str,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// The presence of the agent servers `principal` reaches (or of `only`).
async fn presences(
    state: &AppState,
    account: Uuid,
    reach: &crate::identity::reach::Reach,
    only: Option<Uuid>,
) -> Result<Vec<Presence>, ApiError> {
    let client = state.pool.get().await?;
    let rows = client
        .query(
            concat!(
                "SELECT s.id, ",
                last_seen_sql!(),
                ", ",
                connected_sql!(),
                ", EXISTS (SELECT 1 FROM agent_certificates \
                   WHERE server_id = s.id AND revoked_at IS NULL AND retired_at IS NULL) \
                 FROM servers s WHERE s.account_id = $1 AND s.deleted_at IS NULL \
                   AND s.transport = 'agent' AND ($2::jsonb IS NULL OR s.labels @> $2) \
                   AND ($3::uuid IS NULL OR s.id = $3)"
            ),
            &[&account, &reach.server_filter(), &only],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Presence {
            id: r.get(0),
            last_seen_at: r.get(1),
            status: presence_word("agent", r.get(2), r.get(3)),
        })
        .collect())
}

/// Agents' presence as server-sent events: `event: presence` with a JSON array of
/// [`Presence`], first every agent server followed, then those that changed, when an agent
/// connects or disconnects (at once, from any replica) and at each keep-alive (last seen,
/// and agents gone silent). The stream ends after 30 minutes (a client opens a new one) and
/// when the credentials that opened it no longer would.
#[utoipa::path(get, path = "/v1/servers/events", tag = "servers",
    params(PresenceQuery),
    responses((status = 200, content_type = "text/event-stream"), (status = 404, body = ErrorBody),
              (status = 429, body = ErrorBody, description = "too many live streams open")))]
pub async fn events(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    super::extract::QueryParams(query): super::extract::QueryParams<PresenceQuery>,
    headers: http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use super::live;
    if let Some(id) = query.server_id {
        load(&state, &principal, id).await?;
    }
    let stream = PresenceStream {
        _slot: state.live.open(principal.account_id, principal.user_id)?,
        follower: live::Follower::new(
            &headers,
            meta.ip,
            &principal,
            crate::identity::auth::Scope::ServersRead,
        ),
        changes: state
            .live
            .subscribe(live::Followed::Presence(principal.account_id)),
        account: principal.account_id,
        reach: principal.reach.clone(),
        only: query.server_id,
        ends_at: tokio::time::Instant::now() + state.live.presence_lifetime(),
        checked_at: tokio::time::Instant::now(),
        sent: std::collections::HashMap::new(),
        first: true,
        state,
    };
    live::event_stream(futures_util::stream::unfold(stream, PresenceStream::next))
}

/// An open presence stream: what it follows, for whom, and what it has sent.
struct PresenceStream {
    state: AppState,
    /// Held while the stream lives; given back when it ends.
    _slot: super::live::StreamSlot,
    follower: super::live::Follower,
    changes: tokio::sync::watch::Receiver<u64>,
    account: Uuid,
    reach: crate::identity::reach::Reach,
    only: Option<Uuid>,
    ends_at: tokio::time::Instant,
    /// When the credentials were last asked again.
    checked_at: tokio::time::Instant,
    sent: std::collections::HashMap<Uuid, Presence>,
    first: bool,
}

impl PresenceStream {
    async fn next(mut self) -> Option<(Result<String, std::io::Error>, Self)> {
        use super::live;
        loop {
            if !self.first {
                let left = self
                    .ends_at
                    .saturating_duration_since(tokio::time::Instant::now());
                let keep_alive = self.state.live.keep_alive();
                live::wait_for_change(&mut self.changes, keep_alive.min(left)).await;
                let now = tokio::time::Instant::now();
                if now >= self.ends_at {
                    return None;
                }
                // Asked again once a keep-alive, however busy the fleet: agents connecting
                // all the time must not keep a signed-out session's stream open.
                if now.duration_since(self.checked_at) >= keep_alive {
                    if !self.follower.still_allowed(&self.state.pool).await {
                        return None;
                    }
                    self.checked_at = now;
                }
            }
            self.changes.borrow_and_update();
            let now = presences(&self.state, self.account, &self.reach, self.only)
                .await
                .ok()?;
            let fresh: Vec<Presence> = now
                .into_iter()
                .filter(|p| self.sent.get(&p.id) != Some(p))
                .collect();
            let first = std::mem::replace(&mut self.first, false);
            if fresh.is_empty() {
                if first {
                    continue;
                }
                return Some((Ok(live::KEEP_ALIVE_COMMENT.to_owned()), self));
            }
            let text = serde_json::to_string(&fresh).unwrap_or_default();
            for p in fresh {
                self.sent.insert(p.id, p);
            }
            return Some((Ok(format!("event: presence\ndata: {text}\n\n")), self));
        }
    }
}

/// Revokes every valid certificate of these servers inside `tx` (telling every replica);
/// returns their fingerprints.
pub(super) async fn revoke_certificates(
    tx: &tokio_postgres::Transaction<'_>,
    servers: &[Uuid],
) -> Result<Vec<Fingerprint>, ApiError> {
    let revoked: Vec<Fingerprint> = tx
        .query(
            "UPDATE agent_certificates SET revoked_at = now() \
             WHERE server_id = ANY($1) AND revoked_at IS NULL AND retired_at IS NULL \
             RETURNING fingerprint",
            &[&servers],
        )
        .await?
        .iter()
        .filter_map(|r| Fingerprint::from_raw(r.get::<_, &[u8]>(0)))
        .collect();
    for fp in &revoked {
        cert_events::notify_revoked(tx, fp).await?;
    }
    tx.execute(
        "UPDATE servers SET connected_replica = NULL WHERE id = ANY($1)",
        &[&servers],
    )
    .await?;
    tx.execute(
        crate::runners::agent::presence::ANNOUNCE_SQL,
        &[&super::live::CHANNEL, &servers],
    )
    .await?;
    // Nothing queued for these agents may still reach them, and nobody may enroll with a
    // token issued before the revocation: their jobs fail now (not after the dispatch
    // timeout), and their unused tokens go.
    crate::jobs::record::fail_revoked(tx, servers).await?;
    tx.execute(
        "DELETE FROM enrollment_tokens WHERE server_id = ANY($1) AND used_at IS NULL",
        &[&servers],
    )
    .await?;
    Ok(revoked)
}

/// Refuses servers of the caller's account that their resource scope does not reach (named in
/// a request body: a deploy's or a rollout's targets). Servers that do not exist are left to
/// the caller's own check.
pub(super) async fn check_in_reach(
    client: &impl deadpool_postgres::GenericClient,
    principal: &Principal,
    servers: &[Uuid],
) -> Result<(), ApiError> {
    let Some(labels) = principal.reach.server_filter() else {
        return Ok(());
    };
    let outside = client
        .query_opt(
            "SELECT 1 FROM servers WHERE id = ANY($1) AND account_id = $2 \
             AND NOT labels @> $3 LIMIT 1",
            &[&servers, &principal.account_id, &labels],
        )
        .await?;
    match outside {
        Some(_) => Err(ApiError::outside_scope("a server named in the request")),
        None => Ok(()),
    }
}

/// Locks the server `id` if it is the caller's account's and in their reach.
async fn lock_server(
    tx: &tokio_postgres::Transaction<'_>,
    principal: &Principal,
    id: Uuid,
) -> Result<(), ApiError> {
    tx.query_opt(
        "SELECT 1 FROM servers WHERE id = $1 AND account_id = $2 AND deleted_at IS NULL \
         AND ($3::jsonb IS NULL OR labels @> $3) FOR UPDATE",
        &[&id, &principal.account_id, &principal.reach.server_filter()],
    )
    .await?
    .ok_or_else(|| ApiError::not_found("server"))?;
    Ok(())
}

/// Revokes the server's agent certificate: the live connection is closed at once and the
/// next handshake is refused. The agent stops retrying.
#[utoipa::path(delete, path = "/v1/servers/{id}/agent-certificate", tag = "servers",
    params(("id" = Uuid, Path, description = "server id")),
    responses((status = 204, description = "revoked"),
              (status = 404, body = ErrorBody, description = "no such server, or it has no valid certificate")))]
pub async fn revoke_certificate(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    lock_server(&tx, &principal, id).await?;
    let revoked = revoke_certificates(&tx, &[id]).await?;
    if revoked.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NoCertificate,
            "this server has no valid agent certificate to revoke",
        ));
    }
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(&principal, &meta, "agent.certificate_revoked", ("server", id),
            json!({"certificates": revoked.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(" ")}),
        ),
    )
    .await?;
    tx.commit().await?;
    state.agents.revoke(&revoked);
    Ok(StatusCode::NO_CONTENT)
}

/// Issues a new enrollment token (re-enrollment). Unused earlier tokens stop working; the
/// current certificate keeps working until the agent enrolls again.
#[utoipa::path(post, path = "/v1/servers/{id}/enrollment-token", tag = "servers",
    params(("id" = Uuid, Path, description = "server id")), request_body = NewToken,
    responses((status = 201, body = Enrollment), (status = 404, body = ErrorBody)))]
pub async fn new_enrollment_token(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Enrollment>), ApiError> {
    // The body is optional: an empty one means the defaults.
    let request: NewToken = if body.iter().all(u8::is_ascii_whitespace) {
        NewToken::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::unprocessable(ErrorCode::InvalidField, e.to_string()))?
    };
    let ttl_secs = ttl(request.enrollment_ttl_seconds)?;
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    lock_server(&tx, &principal, id).await?;
    let enrollment = issue_token(&state, &tx, id, ttl_secs).await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "server.enrollment_token_created",
            ("server", id),
            json!({}),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(enrollment)))
}

/// Deletes a server (soft): credentials and certificates are revoked, unused tokens erased,
/// the row kept for the audit trail. The application on the server keeps running.
#[utoipa::path(delete, path = "/v1/servers/{id}", tag = "servers",
    params(("id" = Uuid, Path, description = "server id")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    meta: ClientMeta,
    Extension(principal): Extension<Principal>,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ApiError> {
    let mut client = state.pool.get().await?;
    let tx = client.transaction().await?;
    lock_server(&tx, &principal, id).await?;
    let revoked = revoke_certificates(&tx, &[id]).await?;
    tx.execute("DELETE FROM enrollment_tokens WHERE server_id = $1", &[&id])
        .await?;
    // Soft revoke: the row stays for the audit trail, the credentials are erased.
    tx.execute(
        "UPDATE servers SET deleted_at = now(), ssh_private_key_ciphertext = NULL, \
         ssh_password_ciphertext = NULL WHERE id = $1",
        &[&id],
    )
    .await?;
    audit::append(
        &tx,
        state.keys.audit_keys(),
        &actor_event(
            &principal,
            &meta,
            "server.deleted",
            ("server", id),
            json!({"certificates_revoked": revoked.len()}),
        ),
    )
    .await?;
    tx.commit().await?;
    state.agents.revoke(&revoked);
    Ok(StatusCode::NO_CONTENT)
}
