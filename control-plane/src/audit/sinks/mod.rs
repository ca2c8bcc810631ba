//! SIEM sinks: each account may stream its audit chain to receivers of its own, at least once,
//! in chain order, from a cursor kept in PostgreSQL.
//!
//! - this file: what a sink is (its validated configuration), storing, listing and deleting
//!   sinks, and their status;
//! - [`syslog`]: RFC 5424 messages over RFC 5425 (octet-counted frames over TLS);
//! - [`https`]: Splunk HEC-compatible JSON lines over HTTPS, with a token or an HMAC;
//! - [`delivery`]: the loop every replica runs: lease a due sink, deliver a batch after its
//!   cursor, advance the cursor only once the receiver accepted, back off when it did not.
//!
//! Why a cursor on `seq` is enough: writers of a chain serialise on a transaction-scoped lock
//! that is released only after their commit is visible, so a reader never sees `seq` N+1
//! before N. Reading "after the cursor, in seq order" therefore never skips a row that commits
//! later.

pub mod delivery;
pub mod https;
pub mod syslog;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::audit::AuditRecord;
use crate::egress::{EgressError, TargetPolicy};
use crate::secrets::field_crypto::FieldKeys;

/// Sinks an account may have.
pub const MAX_SINKS_PER_ACCOUNT: i64 = 10;
/// Longest sink name, in characters.
pub const MAX_NAME: usize = 100;
/// Longest CA certificate PEM accepted.
pub const MAX_CA_PEM: usize = 32 * 1024;
/// Longest HTTPS URL accepted.
pub const MAX_URL: usize = 2048;
/// Longest token or HMAC key accepted; an HMAC key must have at least [`MIN_HMAC_KEY`].
pub const MAX_SECRET: usize = 1024;
pub const MIN_HMAC_KEY: usize = 32;
/// Longest error text kept in a sink's status (the column's CHECK says the same).
pub const MAX_ERROR: usize = 512;
/// How long creating a sink waits for its host name to resolve.
const RESOLVE_AT_CREATION: std::time::Duration = std::time::Duration::from_secs(3);

/// How a sink carries events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// RFC 5424 over RFC 5425: syslog over TLS (rsyslog, syslog-ng, most SIEM collectors).
    SyslogTls,
    /// Splunk HEC-compatible JSON lines over HTTPS.
    Https,
}

impl SinkKind {
    pub const ALL: [SinkKind; 2] = [SinkKind::SyslogTls, SinkKind::Https];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::SyslogTls => "syslog_tls",
            SinkKind::Https => "https",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// How an HTTPS sink proves the events come from us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAuth {
    /// `Authorization: Splunk <token>`, as Splunk's HTTP Event Collector expects.
    Splunk,
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// `X-Sensei-Timestamp: <unix seconds>` and `X-Sensei-Signature: <hex HMAC-SHA256 of
    /// "<timestamp>.<body>">` under the shared key.
    Hmac,
}

impl HttpAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpAuth::Splunk => "splunk",
            HttpAuth::Bearer => "bearer",
            HttpAuth::Hmac => "hmac",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [HttpAuth::Splunk, HttpAuth::Bearer, HttpAuth::Hmac]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// Where a sink delivers, as stored (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    SyslogTls {
        host: String,
        port: u16,
        /// The name the receiver's certificate must carry.
        server_name: String,
    },
    Https {
        url: String,
        auth: HttpAuth,
    },
}

impl Target {
    pub fn kind(&self) -> SinkKind {
        match self {
            Target::SyslogTls { .. } => SinkKind::SyslogTls,
            Target::Https { .. } => SinkKind::Https,
        }
    }

    /// Where it points, for people: `host:port` or the URL (which holds no secret: user
    /// information, queries and fragments are refused).
    pub fn describe(&self) -> String {
        match self {
            Target::SyslogTls { host, port, .. } => format!("{host}:{port}"),
            Target::Https { url, .. } => url.clone(),
        }
    }

    /// The host and port connected to.
    fn endpoint(&self) -> Result<(String, u16), InvalidSink> {
        match self {
            Target::SyslogTls { host, port, .. } => Ok((host.clone(), *port)),
            Target::Https { url, .. } => {
                let url = parse_url(url)?;
                let host = url.host_str().unwrap_or_default().to_owned();
                Ok((host, url.port_or_known_default().unwrap_or(443)))
            }
        }
    }
}

/// A sink's stored configuration: the `config` column.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkConfig {
    pub target: Target,
    /// The receiver's CA certificate(s), PEM: the only roots its certificate is checked
    /// against.
    pub ca_pem: String,
}

/// A sink as a client asks for it, before any check.
#[derive(Debug, Clone, Default)]
pub struct SinkRequest {
    pub name: String,
    pub kind: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub server_name: Option<String>,
    pub url: Option<String>,
    pub auth: Option<String>,
    pub secret: Option<String>,
    pub ca_pem: String,
}

/// A sink that passed every check, ready to store.
pub struct NewSink {
    pub name: String,
    pub config: SinkConfig,
    /// The token or HMAC key (HTTPS sinks), in clear until sealed by [`insert`].
    secret: Option<String>,
}

/// Why a sink's configuration is refused. Messages name the field and never echo a secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidSink {
    #[error("name must be 1 to {MAX_NAME} characters")]
    Name,
    #[error("kind must be syslog_tls or https")]
    Kind,
    #[error("{0}")]
    Field(String),
    #[error("url: {0}")]
    Url(String),
    #[error("ca_pem: {0}")]
    Ca(String),
}

fn parse_url(text: &str) -> Result<reqwest::Url, InvalidSink> {
    if text.len() > MAX_URL {
        return Err(InvalidSink::Url(format!("longer than {MAX_URL} bytes")));
    }
    let url =
        reqwest::Url::parse(text).map_err(|e| InvalidSink::Url(format!("not a URL ({e})")))?;
    if url.scheme() != "https" {
        return Err(InvalidSink::Url(format!(
            "must be https:// (got {}://): events are only sent encrypted",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(InvalidSink::Url("has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(InvalidSink::Url(
            "must not carry user information: put credentials in auth".into(),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(InvalidSink::Url(
            "must not have a query or fragment: put credentials in auth".into(),
        ));
    }
    Ok(url)
}

/// A host name or address literal (bracketed or not), as a TLS server name too.
fn check_host(field: &str, host: &str) -> Result<String, InvalidSink> {
    let host = host.trim();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() || bare.len() > 253 {
        return Err(InvalidSink::Field(format!(
            "{field} must be a host name or address of 1 to 253 characters"
        )));
    }
    rustls::pki_types::ServerName::try_from(bare.to_owned()).map_err(|_| {
        InvalidSink::Field(format!("{field} {bare:?} is not a host name or address"))
    })?;
    Ok(bare.to_owned())
}

/// Checks the CA PEM: certificates only, each one a usable trust anchor.
fn check_ca(pem: &str) -> Result<(), InvalidSink> {
    if pem.len() > MAX_CA_PEM {
        return Err(InvalidSink::Ca(format!("longer than {MAX_CA_PEM} bytes")));
    }
    sensei_certs::tls::sink_client_config(pem).map_err(|e| {
        InvalidSink::Ca(format!(
            "not a PEM CA certificate the receiver's certificate can be checked against ({e})"
        ))
    })?;
    Ok(())
}

impl SinkRequest {
    /// Every check that needs no network.
    pub fn validate(self) -> Result<NewSink, InvalidSink> {
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control)
        {
            return Err(InvalidSink::Name);
        }
        let kind = SinkKind::parse(&self.kind).ok_or(InvalidSink::Kind)?;
        let unused = |field: &str, present: bool| {
            if present {
                Err(InvalidSink::Field(format!(
                    "{field} does not apply to a {} sink",
                    kind.as_str()
                )))
            } else {
                Ok(())
            }
        };
        let (target, secret) = match kind {
            SinkKind::SyslogTls => {
                unused("url", self.url.is_some())?;
                unused("auth", self.auth.is_some())?;
                unused("secret", self.secret.is_some())?;
                let host = check_host(
                    "host",
                    self.host
                        .as_deref()
                        .ok_or_else(|| InvalidSink::Field("a syslog_tls sink needs host".into()))?,
                )?;
                let port = self
                    .port
                    .filter(|p| *p != 0)
                    .ok_or_else(|| InvalidSink::Field("port must be 1 to 65535".into()))?;
                let server_name = match self.server_name.as_deref() {
                    Some(s) => check_host("server_name", s)?,
                    None => host.clone(),
                };
                (
                    Target::SyslogTls {
                        host,
                        port,
                        server_name,
                    },
                    None,
                )
            }
            SinkKind::Https => {
                unused("host", self.host.is_some())?;
                unused("port", self.port.is_some())?;
                unused("server_name", self.server_name.is_some())?;
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| InvalidSink::Url("an https sink needs url".into()))?;
                let parsed = parse_url(url.trim())?;
                let auth = self
                    .auth
                    .as_deref()
                    .and_then(HttpAuth::parse)
                    .ok_or_else(|| {
                        InvalidSink::Field("auth must be splunk, bearer or hmac".into())
                    })?;
                let secret = self.secret.unwrap_or_default();
                let printable = secret.bytes().all(|b| b.is_ascii_graphic());
                let min = if auth == HttpAuth::Hmac {
                    MIN_HMAC_KEY
                } else {
                    1
                };
                if secret.len() < min || secret.len() > MAX_SECRET || !printable {
                    return Err(InvalidSink::Field(format!(
                        "secret must be {min} to {MAX_SECRET} printable ASCII characters \
                         without spaces"
                    )));
                }
                (
                    Target::Https {
                        url: parsed.to_string(),
                        auth,
                    },
                    Some(secret),
                )
            }
        };
        check_ca(&self.ca_pem)?;
        Ok(NewSink {
            name,
            config: SinkConfig {
                target,
                ca_pem: self.ca_pem,
            },
            secret,
        })
    }
}

impl NewSink {
    /// Refuses a target that resolves only to addresses the control plane may not reach
    /// (metadata services, its own listeners). A name that does not resolve yet is accepted:
    /// delivery checks again at every connection, and says so in the sink's status.
    pub async fn check_reachable(&self, policy: &TargetPolicy) -> Result<(), EgressError> {
        let (host, port) = self
            .config
            .target
            .endpoint()
            .map_err(|_| EgressError::Unresolved(String::new()))?;
        match policy.resolve(&host, port, RESOLVE_AT_CREATION).await {
            Ok(_) | Err(EgressError::Unresolved(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether a sink is keeping up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkState {
    /// The last attempt was accepted (or none failed yet).
    Healthy,
    /// The last attempt failed; the next is at `next_attempt_at`.
    Failing,
}

/// A sink and how its delivery stands. Never its secret.
#[derive(Debug, Clone)]
pub struct SinkView {
    pub id: Uuid,
    pub name: String,
    pub kind: SinkKind,
    pub target: Target,
    /// `SHA256:…` of the pinned CA certificate (the first of the PEM).
    pub ca_fingerprint: String,
    pub created_at: DateTime<Utc>,
    pub created_by: Option<Uuid>,
    pub state: SinkState,
    /// The last `seq` of the account's chain the receiver accepted.
    pub cursor_seq: i64,
    /// Events written to the chain after the cursor.
    pub lag_events: i64,
    pub failures: i32,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_delivered_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
}

/// Why a sink could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("an account has at most {MAX_SINKS_PER_ACCOUNT} audit sinks; delete one first")]
    TooMany,
    #[error(transparent)]
    Stored(#[from] StoredSinkError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// A stored row's configuration no longer parses: a bug or a hand edit.
#[derive(Debug, thiserror::Error)]
#[error("audit sink {id}: stored configuration does not parse: {detail}")]
pub struct StoredSinkError {
    pub id: Uuid,
    pub detail: String,
}

/// What metadata an audit row about `sink` carries: never the secret, the CA or a query.
pub fn audit_metadata(name: &str, config: &SinkConfig) -> Value {
    let mut meta = json!({
        "name": name,
        "kind": config.target.kind().as_str(),
        "target": config.target.describe(),
    });
    if let Target::Https { auth, .. } = &config.target {
        meta["auth"] = json!(auth.as_str());
    }
    meta
}

/// Stores `sink` for `account_id` in the caller's transaction (which also appends the audit
/// row), refusing an account's [`MAX_SINKS_PER_ACCOUNT`]+1st sink. The cursor starts before
/// the chain's first row: the receiver gets the account's whole retained log, then every new
/// event.
pub async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &FieldKeys,
    account_id: Uuid,
    created_by: Uuid,
    id: Uuid,
    sink: &NewSink,
) -> Result<SinkView, CreateError> {
    // The account row's lock orders concurrent creations, so the count below stays true.
    tx.execute(
        "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
        &[&account_id],
    )
    .await?;
    let count: i64 = tx
        .query_one(
            "SELECT count(*) FROM audit_sinks WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .get(0);
    if count >= MAX_SINKS_PER_ACCOUNT {
        return Err(CreateError::TooMany);
    }
    let sealed = sink.secret.as_ref().map(|s| keys.encrypt(s.as_bytes()));
    let config = serde_json::to_value(&sink.config).unwrap_or(Value::Null);
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO audit_sinks (id, account_id, name, kind, config, secret_ciphertext, \
                 created_by) VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING {VIEW_COLUMNS}"
            ),
            &[
                &id,
                &account_id,
                &sink.name,
                &sink.config.target.kind().as_str(),
                &config,
                &sealed,
                &created_by,
            ],
        )
        .await?;
    Ok(view_from_row(&row)?)
}

/// The columns [`view_from_row`] reads; `lag` is the chain's newest seq minus the cursor.
const VIEW_COLUMNS: &str = "id, name, kind, config, created_at, created_by, cursor_seq, \
     failures, last_error, last_error_at, last_delivered_at, next_attempt_at, \
     GREATEST(COALESCE((SELECT max(seq) FROM audit_log a WHERE a.chain_id = audit_sinks.account_id), 0) \
              - cursor_seq, 0) AS lag";

fn view_from_row(row: &tokio_postgres::Row) -> Result<SinkView, StoredSinkError> {
    let id: Uuid = row.get("id");
    let bad = |detail: String| StoredSinkError { id, detail };
    let config: SinkConfig =
        serde_json::from_value(row.get("config")).map_err(|e| bad(e.to_string()))?;
    let kind_text: String = row.get("kind");
    let kind = SinkKind::parse(&kind_text).ok_or_else(|| bad(format!("kind {kind_text:?}")))?;
    let failures: i32 = row.get("failures");
    let ca_fingerprint = sensei_certs::tls::first_cert_der(&config.ca_pem)
        .map(|der| sensei_certs::Fingerprint::of_der(&der).to_string())
        .unwrap_or_default();
    Ok(SinkView {
        id,
        name: row.get("name"),
        kind,
        target: config.target,
        ca_fingerprint,
        created_at: row.get("created_at"),
        created_by: row.get("created_by"),
        state: if failures > 0 {
            SinkState::Failing
        } else {
            SinkState::Healthy
        },
        cursor_seq: row.get("cursor_seq"),
        lag_events: row.get("lag"),
        failures,
        last_error: row.get("last_error"),
        last_error_at: row.get("last_error_at"),
        last_delivered_at: row.get("last_delivered_at"),
        next_attempt_at: row.get("next_attempt_at"),
    })
}

/// Why the sinks could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Stored(#[from] StoredSinkError),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// An account's sinks, oldest first (at most [`MAX_SINKS_PER_ACCOUNT`], so no paging).
pub async fn list<C: tokio_postgres::GenericClient>(
    client: &C,
    account_id: Uuid,
) -> Result<Vec<SinkView>, ListError> {
    let rows = client
        .query(
            &format!(
                "SELECT {VIEW_COLUMNS} FROM audit_sinks WHERE account_id = $1 \
                 ORDER BY created_at, id"
            ),
            &[&account_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(view_from_row)
        .collect::<Result<Vec<_>, _>>()?)
}

/// Deletes a sink of `account_id` in the caller's transaction; answers its name and
/// configuration (for the audit row), or `None` when the account has no such sink. A delivery
/// in flight finishes, and its cursor update finds no row.
pub async fn delete(
    tx: &tokio_postgres::Transaction<'_>,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<(String, Option<SinkConfig>)>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "DELETE FROM audit_sinks WHERE id = $1 AND account_id = $2 RETURNING name, config",
            &[&id, &account_id],
        )
        .await?;
    Ok(row.map(|r| (r.get::<_, String>(0), serde_json::from_value(r.get(1)).ok())))
}

/// The figures `/metrics` shows about every account's sinks together: a bounded set of
/// numbers however many sinks there are.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkFigures {
    pub sinks: i64,
    pub failing: i64,
    /// The largest lag of any one sink, and all sinks' lags added up.
    pub max_lag_events: i64,
    pub total_lag_events: i64,
    /// Seconds since the least recently successful sink that has events waiting delivered
    /// (or was created); 0 when none waits.
    pub oldest_undelivered_seconds: f64,
}

/// Reads [`SinkFigures`].
pub async fn figures<C: tokio_postgres::GenericClient>(
    client: &C,
) -> Result<SinkFigures, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE failures > 0), \
                    COALESCE(max(lag), 0)::bigint, COALESCE(sum(lag), 0)::bigint, \
                    COALESCE(EXTRACT(EPOCH FROM now() - min(since) FILTER (WHERE lag > 0)), 0)::float8 \
             FROM (SELECT failures, COALESCE(last_delivered_at, created_at) AS since, \
                          GREATEST(COALESCE((SELECT max(seq) FROM audit_log a \
                                             WHERE a.chain_id = s.account_id), 0) - cursor_seq, 0) AS lag \
                   FROM audit_sinks s) x",
            &[],
        )
        .await?;
    Ok(SinkFigures {
        sinks: row.get(0),
        failing: row.get(1),
        max_lag_events: row.get(2),
        total_lag_events: row.get(3),
        oldest_undelivered_seconds: row.get(4),
    })
}

/// One event as a sink carries it: the export shape of `GET /v1/audit/export` plus what a SIEM
/// needs to deduplicate and check order (`id`, `seq`, `account_id`) and the row's chain link.
pub fn event_json(record: &AuditRecord) -> Value {
    let mut v = record.export_json();
    v["id"] = json!(record.id);
    v["seq"] = json!(record.seq);
    v["account_id"] = json!(record.account_id);
    v["timestamp"] = json!(record
        .at
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    v["hash"] = json!(hex::encode(&record.hash));
    v
}

/// Error text for a sink's status: one line, printable, at most [`MAX_ERROR`] bytes, with
/// `secret` (when there is one) blotted out wherever it appears.
pub fn bounded_error(text: &str, secret: Option<&str>) -> String {
    let mut text = text.to_owned();
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        text = text.replace(secret, "[secret]");
    }
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_ERROR {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        sensei_certs::CertificateAuthority::generate("test sink CA")
            .expect("ca")
            .cert_pem()
            .to_owned()
    }

    fn https(url: &str) -> SinkRequest {
        SinkRequest {
            name: "splunk".into(),
            kind: "https".into(),
            url: Some(url.into()),
            auth: Some("splunk".into()),
            secret: Some("0123-token".into()),
            ca_pem: ca(),
            ..SinkRequest::default()
        }
    }

    #[test]
    fn urls_must_be_https_without_credentials() {
        assert!(
            https("https://splunk.example:8088/services/collector/event")
                .validate()
                .is_ok()
        );
        for bad in [
            "http://splunk.example/services/collector",
            "https://user:pw@splunk.example/",
            "https://splunk.example/?token=x",
            "not a url",
            "https://exa mple.com/",
        ] {
            assert!(
                matches!(https(bad).validate(), Err(InvalidSink::Url(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_ca_must_be_a_certificate() {
        let mut r = https("https://splunk.example/");
        r.ca_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into();
        assert!(matches!(r.validate(), Err(InvalidSink::Ca(_))));
        let mut r = https("https://splunk.example/");
        r.ca_pem = "hello".into();
        assert!(matches!(r.validate(), Err(InvalidSink::Ca(_))));
    }

    #[test]
    fn syslog_needs_host_and_port_and_takes_no_secret() {
        let base = SinkRequest {
            name: "rsyslog".into(),
            kind: "syslog_tls".into(),
            host: Some("10.0.0.5".into()),
            port: Some(6514),
            server_name: Some("logs.example".into()),
            ca_pem: ca(),
            ..SinkRequest::default()
        };
        let ok = base.clone().validate().expect("valid");
        assert_eq!(
            ok.config.target,
            Target::SyslogTls {
                host: "10.0.0.5".into(),
                port: 6514,
                server_name: "logs.example".into()
            }
        );
        let mut r = base.clone();
        r.port = None;
        assert!(r.validate().is_err());
        let mut r = base.clone();
        r.secret = Some("x".into());
        assert!(r.validate().is_err());
        let mut r = base;
        r.host = Some("bad host!".into());
        assert!(r.validate().is_err());
    }

    #[test]
    fn errors_are_bounded_and_never_carry_the_secret() {
        let text = format!("refused token s3cr3t\n{}", "x".repeat(2000));
        let out = bounded_error(&text, Some("s3cr3t"));
        assert!(out.len() <= MAX_ERROR);
        assert!(!out.contains("s3cr3t"));
        assert!(!out.contains('\n'));
    }
}
