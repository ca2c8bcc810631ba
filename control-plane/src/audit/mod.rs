//! The audit log: the one writer, the hash chain, and its verification.
//!
//! Each account has its own chain (events outside any account share the nil-UUID chain).
//! A row's hash is an HMAC-SHA-256, under a key held outside the database
//! ([`crate::audit::keys`]), of the previous row's hash and a canonical JSON rendering of the
//! row, so changing or deleting a row breaks every later link, and someone who can write the
//! table still cannot recompute the links. Rows written before the chain was keyed (key id
//! NULL) carry plain SHA-256 links; they may only form a chain's prefix, sealed by a keyed
//! `audit.keyed` row (see [`seal_unkeyed_chains`]). Writers of one chain serialise
//! on a transaction-scoped advisory lock; the row is written in the caller's transaction, so
//! an action and its audit row commit or vanish together.

pub mod keys;
pub mod sinks;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::audit::keys::AuditKeyring;

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Actor {
    User {
        id: Uuid,
        email: String,
    },
    ApiKey {
        id: Uuid,
    },
    /// An unauthenticated caller (signup, failed login).
    Anonymous,
    /// The control plane itself (maintenance commands).
    System,
}

impl Actor {
    fn kind(&self) -> &'static str {
        match self {
            Actor::User { .. } => "user",
            Actor::ApiKey { .. } => "api_key",
            Actor::Anonymous => "anonymous",
            Actor::System => "system",
        }
    }

    fn id(&self) -> Option<Uuid> {
        match self {
            Actor::User { id, .. } | Actor::ApiKey { id } => Some(*id),
            Actor::Anonymous | Actor::System => None,
        }
    }

    fn email(&self) -> Option<&str> {
        match self {
            Actor::User { email, .. } => Some(email),
            _ => None,
        }
    }
}

/// Whether the action happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

/// One state-changing action, ready to record.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub account_id: Option<Uuid>,
    pub actor: Actor,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    /// `noun.verb`, e.g. `server.created`.
    pub action: &'static str,
    pub target: Option<(&'static str, Uuid)>,
    pub outcome: Outcome,
    /// Extra facts; strings, booleans and integers only (they must hash identically after a
    /// round trip through `jsonb`). Never a secret.
    pub metadata: Value,
}

/// The chain that events outside any account are recorded on.
pub const GLOBAL_CHAIN: Uuid = Uuid::nil();
const GENESIS: [u8; 32] = [0u8; 32];

/// The fields that are hashed, in one canonical shape.
#[derive(Serialize, Clone)]
struct Canonical<'a> {
    chain_id: Uuid,
    seq: i64,
    account_id: Option<Uuid>,
    at: String,
    actor_type: &'a str,
    actor_id: Option<Uuid>,
    actor_email: Option<&'a str>,
    client_ip: Option<&'a str>,
    user_agent: Option<&'a str>,
    action: &'a str,
    target_type: Option<&'a str>,
    target_id: Option<Uuid>,
    result: &'a str,
    metadata: &'a Value,
}

/// The bytes a link covers besides the previous hash: the fields in their declared order and
/// the metadata with its keys sorted at every depth, so the bytes depend only on the values —
/// not on the order a JSON map was built in, nor on how PostgreSQL's `jsonb` hands it back,
/// nor on whether some crate in the build turned on serde_json's `preserve_order`.
fn canonical_bytes(row: &Canonical<'_>) -> Vec<u8> {
    let metadata = sorted(row.metadata);
    serde_json::to_vec(&Canonical {
        metadata: &metadata,
        ..row.clone()
    })
    .unwrap_or_default()
}

/// `value` with every object's keys in sorted order.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// A JSON document's canonical bytes (keys sorted at every depth): what an export's
/// signature covers.
fn canonical_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(&sorted(value)).unwrap_or_default()
}

/// The unkeyed link of rows written before the chain was keyed.
fn legacy_link(prev: &[u8], row_bytes: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(row_bytes);
    hasher.finalize().to_vec()
}

fn render_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Appends `event` to its account's chain inside the caller's transaction.
pub async fn append(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &AuditKeyring,
    event: &AuditEvent,
) -> Result<(), tokio_postgres::Error> {
    append_at(tx, keys, event, Utc::now()).await
}

/// [`append`] with the event's time given: for importing history from another system (and
/// for testing retention, which needs rows from long ago).
pub async fn append_at(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &AuditKeyring,
    event: &AuditEvent,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let chain_id = event.account_id.unwrap_or(GLOBAL_CHAIN);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7243))",
        &[&chain_id.to_string()],
    )
    .await?;
    let last = tx
        .query_opt(
            "SELECT seq, hash FROM audit_log WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&chain_id],
        )
        .await?;
    let (seq, prev): (i64, Vec<u8>) = match last {
        Some(row) => (row.get::<_, i64>(0) + 1, row.get(1)),
        None => (1, GENESIS.to_vec()),
    };
    // PostgreSQL keeps microseconds; hash exactly what will be read back.
    let at = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
    let metadata = if event.metadata.is_object() {
        event.metadata.clone()
    } else {
        json!({})
    };
    let (target_type, target_id) = match event.target {
        Some((t, id)) => (Some(t), Some(id)),
        None => (None, None),
    };
    let canonical = Canonical {
        chain_id,
        seq,
        account_id: event.account_id,
        at: render_time(at),
        actor_type: event.actor.kind(),
        actor_id: event.actor.id(),
        actor_email: event.actor.email(),
        client_ip: event.client_ip.as_deref(),
        user_agent: event.user_agent.as_deref(),
        action: event.action,
        target_type,
        target_id,
        result: event.outcome.as_str(),
        metadata: &metadata,
    };
    let hash = keys.sign(&prev, &canonical_bytes(&canonical));
    let key_id = keys.current_id();
    tx.execute(
        "INSERT INTO audit_log (chain_id, seq, account_id, at, actor_type, actor_id, actor_email, \
         client_ip, user_agent, action, target_type, target_id, result, metadata, prev_hash, hash, \
         key_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)",
        &[
            &chain_id,
            &seq,
            &event.account_id,
            &at,
            &canonical.actor_type,
            &canonical.actor_id,
            &canonical.actor_email,
            &canonical.client_ip,
            &canonical.user_agent,
            &canonical.action,
            &target_type,
            &target_id,
            &canonical.result,
            &metadata,
            &prev,
            &hash,
            &key_id,
        ],
    )
    .await?;
    Ok(())
}

/// One audit row as stored.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub id: i64,
    pub chain_id: Uuid,
    pub seq: i64,
    pub account_id: Option<Uuid>,
    pub at: DateTime<Utc>,
    pub actor_type: String,
    pub actor_id: Option<Uuid>,
    pub actor_email: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<Uuid>,
    pub result: String,
    pub metadata: Value,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    /// The audit key that signed the link; `None` for rows from before the chain was keyed.
    pub key_id: Option<String>,
}

/// Column list matching [`AuditRecord::from_row`].
pub const COLUMNS: &str = "id, chain_id, seq, account_id, at, actor_type, actor_id, actor_email, \
     client_ip, user_agent, action, target_type, target_id, result, metadata, prev_hash, hash, \
     key_id";

impl AuditRecord {
    pub fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            chain_id: row.get(1),
            seq: row.get(2),
            account_id: row.get(3),
            at: row.get(4),
            actor_type: row.get(5),
            actor_id: row.get(6),
            actor_email: row.get(7),
            client_ip: row.get(8),
            user_agent: row.get(9),
            action: row.get(10),
            target_type: row.get(11),
            target_id: row.get(12),
            result: row.get(13),
            metadata: row.get(14),
            prev_hash: row.get(15),
            hash: row.get(16),
            key_id: row.get(17),
        }
    }

    fn canonical(&self) -> Canonical<'_> {
        Canonical {
            chain_id: self.chain_id,
            seq: self.seq,
            account_id: self.account_id,
            at: render_time(self.at),
            actor_type: &self.actor_type,
            actor_id: self.actor_id,
            actor_email: self.actor_email.as_deref(),
            client_ip: self.client_ip.as_deref(),
            user_agent: self.user_agent.as_deref(),
            action: &self.action,
            target_type: self.target_type.as_deref(),
            target_id: self.target_id,
            result: &self.result,
            metadata: &self.metadata,
        }
    }

    /// The SIEM export shape: one JSON object per line.
    pub fn export_json(&self) -> Value {
        let mut metadata = match &self.metadata {
            Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        if let Some(ua) = &self.user_agent {
            metadata.insert("userAgent".into(), Value::String(ua.clone()));
        }
        let verb = self
            .action
            .split_once('.')
            .map(|(_, v)| v)
            .unwrap_or(&self.action);
        json!({
            "timestamp": self.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "event": self.action,
            "actor": {
                "type": self.actor_type,
                "id": self.actor_id,
                "email": self.actor_email,
                "ip": self.client_ip,
            },
            "resource": {
                "type": self.target_type,
                "id": self.target_id,
            },
            "action": verb,
            "result": self.result,
            "metadata": metadata,
        })
    }
}

/// What `audit verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chains: u64,
    pub rows: u64,
    /// Rows whose links are plain SHA-256 (written before the chain was keyed).
    pub unkeyed_rows: u64,
    /// Human-readable descriptions of every broken link, in chain order; each names the row.
    pub problems: Vec<String>,
}

/// Walks every chain and checks sequence numbers, links and their keyed hashes.
///
/// The rules: each row links to the one before it (or to the chain's latest expiry
/// checkpoint); a keyed row's HMAC matches under the key it names; unkeyed rows only appear
/// before the chain's first keyed row, and a chain never ends on one (startup seals every
/// chain with a keyed row, so an all-unkeyed chain is a rewrite that dropped the keys).
pub async fn verify<C: GenericClient>(
    client: &C,
    keys: &AuditKeyring,
) -> Result<VerifyReport, tokio_postgres::Error> {
    const PAGE: i64 = 1000;
    let mut report = VerifyReport::default();
    let chains = client
        .query(
            "SELECT DISTINCT chain_id FROM audit_log ORDER BY chain_id",
            &[],
        )
        .await?;
    for chain in chains {
        let chain_id: Uuid = chain.get(0);
        report.chains += 1;
        // Rows before an expiry checkpoint are gone by design: the chain continues from the
        // hash the checkpoint recorded.
        let checkpoint = client
            .query_opt(
                "SELECT through_seq, through_hash FROM audit_checkpoints WHERE chain_id = $1 \
                 ORDER BY through_seq DESC LIMIT 1",
                &[&chain_id],
            )
            .await?;
        let (mut expected_seq, mut prev) = match checkpoint {
            Some(c) => (c.get::<_, i64>(0) + 1, c.get::<_, Vec<u8>>(1)),
            None => (1i64, GENESIS.to_vec()),
        };
        let mut seen_keyed = false;
        let mut last: Option<(i64, i64, bool)> = None;
        loop {
            let rows = client
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM audit_log WHERE chain_id = $1 AND seq >= $2 \
                         ORDER BY seq LIMIT $3"
                    ),
                    &[&chain_id, &expected_seq, &PAGE],
                )
                .await?;
            let fetched = rows.len();
            for row in rows {
                let record = AuditRecord::from_row(&row);
                report.rows += 1;
                let name = format!("chain {chain_id}: row {} (seq {})", record.id, record.seq);
                if record.seq != expected_seq {
                    report.problems.push(format!(
                        "{name} follows seq {} (rows missing)",
                        expected_seq - 1
                    ));
                }
                if record.prev_hash != prev {
                    report
                        .problems
                        .push(format!("{name} does not link to the row before it"));
                }
                let bytes = canonical_bytes(&record.canonical());
                match record.key_id.as_deref() {
                    Some(id) => {
                        seen_keyed = true;
                        match keys.link_under(id, &record.prev_hash, &bytes) {
                            Some(link) if link == record.hash => {}
                            Some(_) => report
                                .problems
                                .push(format!("{name} was changed after it was written")),
                            None => report.problems.push(format!(
                                "{name} is signed with audit key {id}, which is not configured \
                                 (keep retired keys in the list while their rows are retained)"
                            )),
                        }
                    }
                    None => {
                        report.unkeyed_rows += 1;
                        if seen_keyed {
                            report.problems.push(format!(
                                "{name} is unkeyed after keyed rows: it was rewritten"
                            ));
                        } else if legacy_link(&record.prev_hash, &bytes) != record.hash {
                            report
                                .problems
                                .push(format!("{name} was changed after it was written"));
                        }
                    }
                }
                last = Some((record.id, record.seq, record.key_id.is_some()));
                prev = record.hash;
                expected_seq = record.seq + 1;
            }
            if (fetched as i64) < PAGE {
                break;
            }
        }
        if let Some((id, seq, false)) = last {
            report.problems.push(format!(
                "chain {chain_id}: row {id} (seq {seq}) ends the chain unkeyed: the chain was \
                 rewritten without the audit key"
            ));
        }
    }
    Ok(report)
}

/// An event the control plane itself records on `chain_id`.
fn system_event(chain_id: Uuid, action: &'static str, metadata: Value) -> AuditEvent {
    AuditEvent {
        account_id: (chain_id != GLOBAL_CHAIN).then_some(chain_id),
        actor: Actor::System,
        client_ip: None,
        user_agent: None,
        action,
        target: None,
        outcome: Outcome::Success,
        metadata,
    }
}

/// Appends a keyed `audit.keyed` row to every chain whose newest row is unkeyed, so that the
/// rows written before the chain was keyed are sealed by a link no one without the key can
/// forge. Runs at every start; a no-op once every chain ends keyed.
pub async fn seal_unkeyed_chains(
    pool: &deadpool_postgres::Pool,
    keys: &AuditKeyring,
) -> anyhow::Result<u64> {
    let chains: Vec<Uuid> = pool
        .get()
        .await?
        .query(
            "SELECT DISTINCT ON (chain_id) chain_id, key_id FROM audit_log \
             ORDER BY chain_id, seq DESC",
            &[],
        )
        .await?
        .iter()
        .filter(|r| r.get::<_, Option<String>>(1).is_none())
        .map(|r| r.get(0))
        .collect();
    let mut sealed = 0;
    for chain_id in chains {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        append(
            &tx,
            keys,
            &system_event(
                chain_id,
                "audit.keyed",
                json!({"key_id": keys.current_id()}),
            ),
        )
        .await?;
        tx.commit().await?;
        sealed += 1;
    }
    if sealed > 0 {
        tracing::info!(chains = sealed, "audit chains sealed under the audit key");
    }
    Ok(sealed)
}

/// What an expiry pass removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct ExpiryReport {
    pub chains: u64,
    pub rows: u64,
}

/// Expires, on every chain, the rows older than the chain's retention (its account's
/// `audit_retention_days`; a year for the global chain and deleted accounts).
///
/// Per chain, in one transaction: an `audit.expired` event is appended (so the chain never
/// ends at an expired row), then `audit_expire_through` (owned by the database owner, the one
/// way the application role can remove audit rows) records a checkpoint with the hash of the
/// last expired row and deletes the rows up to it. The database refuses any other deletion.
pub async fn expire(
    pool: &deadpool_postgres::Pool,
    keys: &AuditKeyring,
) -> anyhow::Result<ExpiryReport> {
    let mut report = ExpiryReport::default();
    let chains: Vec<Uuid> = pool
        .get()
        .await?
        .query(
            "SELECT chain_id FROM audit_log GROUP BY chain_id \
             HAVING min(at) < now() - audit_retention(chain_id)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for chain_id in chains {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7243))",
            &[&chain_id.to_string()],
        )
        .await?;
        // The last row of the expired prefix: older than retention, and no newer row before it.
        let Some(last) = tx
            .query_opt(
                "SELECT seq, (SELECT count(*) FROM audit_log WHERE chain_id = $1 AND seq <= a.seq) \
                 FROM audit_log a WHERE chain_id = $1 AND at < now() - audit_retention($1) \
                 AND seq < COALESCE((SELECT min(seq) FROM audit_log WHERE chain_id = $1 \
                                     AND at >= now() - audit_retention($1)), 9223372036854775807) \
                 ORDER BY seq DESC LIMIT 1",
                &[&chain_id],
            )
            .await?
        else {
            continue;
        };
        let (through, count): (i64, i64) = (last.get(0), last.get(1));
        append(
            &tx,
            keys,
            &system_event(
                chain_id,
                "audit.expired",
                json!({"through_seq": through, "rows": count}),
            ),
        )
        .await?;
        let deleted: i64 = tx
            .query_one(
                "SELECT audit_expire_through($1, $2)",
                &[&chain_id, &through],
            )
            .await?
            .get(0);
        tx.commit().await?;
        report.chains += 1;
        report.rows += u64::try_from(deleted).unwrap_or(0);
        tracing::info!(chain = %chain_id, rows = deleted, through_seq = through, "audit rows expired");
    }
    Ok(report)
}

/// The format name of a signed export.
pub const EXPORT_FORMAT: &str = "sensei-audit-export/v1";

/// A chain as retained, signed with an Ed25519 key held outside the database, so that an
/// auditor holding only the public key can check a stored export without the database: that
/// it was made by the key's holder, that no row was changed since, and that its rows link
/// without a gap from the checkpoint it starts at.
pub async fn signed_export<C: GenericClient>(
    client: &C,
    chain_id: Uuid,
    signing: &ed25519_dalek::SigningKey,
) -> anyhow::Result<Value> {
    use ed25519_dalek::Signer;
    let checkpoint = client
        .query_opt(
            "SELECT through_seq, through_hash, through_at, rows_expired FROM audit_checkpoints \
             WHERE chain_id = $1 ORDER BY through_seq DESC LIMIT 1",
            &[&chain_id],
        )
        .await?
        .map(|c| {
            json!({
                "through_seq": c.get::<_, i64>(0),
                "through_hash": hex::encode(c.get::<_, Vec<u8>>(1)),
                "through_at": render_time(c.get(2)),
                "rows_expired": c.get::<_, i64>(3),
            })
        });
    let rows: Vec<Value> = client
        .query(
            &format!("SELECT {COLUMNS} FROM audit_log WHERE chain_id = $1 ORDER BY seq"),
            &[&chain_id],
        )
        .await?
        .iter()
        .map(|row| {
            let r = AuditRecord::from_row(row);
            let mut v = serde_json::to_value(r.canonical()).unwrap_or(Value::Null);
            v["prev_hash"] = json!(hex::encode(&r.prev_hash));
            v["hash"] = json!(hex::encode(&r.hash));
            v["key_id"] = json!(r.key_id);
            v
        })
        .collect();
    anyhow::ensure!(
        !rows.is_empty() || checkpoint.is_some(),
        "chain {chain_id} has no audit rows"
    );
    let body = json!({
        "format": EXPORT_FORMAT,
        "chain_id": chain_id,
        "exported_at": render_time(Utc::now()),
        "checkpoint": checkpoint,
        "rows": rows,
    });
    let signature = signing.sign(&canonical_json(&body));
    Ok(json!({
        "body": body,
        "public_key": hex::encode(signing.verifying_key().to_bytes()),
        "signature": hex::encode(signature.to_bytes()),
    }))
}

/// What checking a signed export found.
#[derive(Debug)]
pub struct ExportCheck {
    pub chain_id: String,
    pub rows: usize,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
}

/// Checks a signed export against the public key the auditor pinned: the signature over the
/// body, then that the rows link to each other and to the checkpoint without a gap. The first
/// failure is the error.
pub fn check_export(
    document: &Value,
    public_key: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<ExportCheck> {
    use anyhow::Context;
    let body = document
        .get("body")
        .context("not a signed export: no body")?;
    let signature = document
        .get("signature")
        .and_then(Value::as_str)
        .and_then(|s| hex::decode(s).ok())
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .context("not a signed export: no 64-byte signature")?;
    public_key
        .verify_strict(
            &canonical_json(body),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "the signature does not match: the export was changed, or another key signed it"
            )
        })?;
    anyhow::ensure!(
        body.get("format").and_then(Value::as_str) == Some(EXPORT_FORMAT),
        "unknown export format"
    );
    let chain_id = body["chain_id"].as_str().unwrap_or_default().to_owned();
    let (mut expected_seq, mut prev) = match body.get("checkpoint").filter(|c| !c.is_null()) {
        Some(c) => (
            c["through_seq"]
                .as_i64()
                .context("checkpoint without through_seq")?
                + 1,
            c["through_hash"].as_str().unwrap_or_default().to_owned(),
        ),
        None => (1, hex::encode(GENESIS)),
    };
    let rows = body["rows"].as_array().context("export without rows")?;
    for row in rows {
        let seq = row["seq"].as_i64().context("row without seq")?;
        anyhow::ensure!(
            seq == expected_seq,
            "row seq {seq} follows seq {}: rows missing",
            expected_seq - 1
        );
        anyhow::ensure!(
            row["prev_hash"].as_str() == Some(prev.as_str()),
            "row seq {seq} does not link to the row before it"
        );
        prev = row["hash"].as_str().unwrap_or_default().to_owned();
        expected_seq += 1;
    }
    Ok(ExportCheck {
        chain_id,
        rows: rows.len(),
        first_seq: rows.first().and_then(|r| r["seq"].as_i64()),
        last_seq: rows.last().and_then(|r| r["seq"].as_i64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_do_not_depend_on_the_order_a_map_was_built_in() {
        let mut forward = serde_json::Map::new();
        forward.insert("b".into(), json!({"y": 1, "x": [{"q": 1, "p": 2}]}));
        forward.insert("a".into(), json!(2));
        let mut backward = serde_json::Map::new();
        backward.insert("a".into(), json!(2));
        backward.insert("b".into(), json!({"x": [{"p": 2, "q": 1}], "y": 1}));
        let (forward, backward) = (Value::Object(forward), Value::Object(backward));
        assert_eq!(canonical_json(&forward), canonical_json(&backward));
        assert_eq!(
            String::from_utf8(canonical_json(&forward)).expect("utf-8"),
            r#"{"a":2,"b":{"x":[{"p":2,"q":1}],"y":1}}"#
        );
        let row = |metadata| Canonical {
            chain_id: Uuid::nil(),
            seq: 1,
            account_id: None,
            at: "2026-01-01T00:00:00.000000Z".into(),
            actor_type: "system",
            actor_id: None,
            actor_email: None,
            client_ip: None,
            user_agent: None,
            action: "test",
            target_type: None,
            target_id: None,
            result: "success",
            metadata,
        };
        assert_eq!(
            canonical_bytes(&row(&forward)),
            canonical_bytes(&row(&backward))
        );
    }
}
