//! `rotate-field-key`: re-encrypts every encrypted column under the first key of
//! `CODESENSEI_FIELD_KEY`, in batches, skipping values already under it, so it can be run
//! again after an interruption. docs/notes.md is the operator's runbook.

use deadpool_postgres::Pool;
use serde_json::json;

use crate::audit::{self, Actor, AuditEvent, Outcome};
use crate::secrets::field_crypto::FieldKeys;

/// One column holding Fernet tokens, with the primary key that finds its row.
#[derive(Debug, Clone, Copy)]
pub struct EncryptedColumn {
    pub table: &'static str,
    pub key: &'static str,
    pub column: &'static str,
}

/// Every encrypted column in the schema. A migration that adds one adds it here too.
pub const ENCRYPTED_COLUMNS: &[EncryptedColumn] = &[
    // A rollout's copy of its project's environment (V9).
    EncryptedColumn {
        table: "rollouts",
        key: "id",
        column: "env_ciphertext",
    },
    EncryptedColumn {
        table: "users",
        key: "id",
        column: "totp_secret_ciphertext",
    },
    EncryptedColumn {
        table: "users",
        key: "id",
        column: "totp_pending_ciphertext",
    },
    EncryptedColumn {
        table: "pki_material",
        key: "name",
        column: "key_ciphertext",
    },
    EncryptedColumn {
        table: "signing_keys",
        key: "name",
        column: "private_key_ciphertext",
    },
    EncryptedColumn {
        table: "projects",
        key: "id",
        column: "env_ciphertext",
    },
    EncryptedColumn {
        table: "servers",
        key: "id",
        column: "ssh_private_key_ciphertext",
    },
    EncryptedColumn {
        table: "servers",
        key: "id",
        column: "ssh_password_ciphertext",
    },
    // An audit sink's bearer token or HMAC key (V16).
    EncryptedColumn {
        table: "audit_sinks",
        key: "id",
        column: "secret_ciphertext",
    },
    // A project's TSIG secret for its DNS zone, and each written record's copy (V17).
    EncryptedColumn {
        table: "projects",
        key: "id",
        column: "dns_secret_ciphertext",
    },
    EncryptedColumn {
        table: "dns_records",
        key: "id",
        column: "secret_ciphertext",
    },
    // An account's OpenID Connect client secret (V20).
    EncryptedColumn {
        table: "account_sso",
        key: "account_id",
        column: "client_secret_sealed",
    },
];

const BATCH: i64 = 200;

/// Why rotation stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    #[error("database: {0}")]
    Db(String),
    #[error(
        "{table}.{column} of row {key} cannot be decrypted with any configured key; keep the \
         key it was written with in CODESENSEI_FIELD_KEY and run again (rows rotated so far \
         stay valid)"
    )]
    Undecryptable {
        table: &'static str,
        column: &'static str,
        key: String,
    },
}

impl From<tokio_postgres::Error> for RotateError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Db(crate::store::db::describe(&e))
    }
}

impl From<deadpool_postgres::PoolError> for RotateError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Self::Db(e.to_string())
    }
}

/// What rotation did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// Values re-encrypted under the first key.
    pub rewritten: u64,
    /// Values that already were.
    pub already_current: u64,
}

/// Rotates every encrypted column.
pub async fn rotate(pool: &Pool, keys: &FieldKeys) -> Result<RotationReport, RotateError> {
    // The rotation is audited, under the chain key these field keys open.
    crate::audit::keys::load(pool, keys)
        .await
        .map_err(|e| RotateError::Db(e.to_string()))?;
    let mut report = RotationReport::default();
    for col in ENCRYPTED_COLUMNS {
        let mut after = String::new();
        loop {
            let mut client = pool.get().await?;
            let tx = client.transaction().await?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {key}::text, {column} FROM {table} \
                         WHERE {key}::text > $1 AND {column} IS NOT NULL \
                         ORDER BY {key}::text LIMIT $2 FOR UPDATE",
                        key = col.key,
                        column = col.column,
                        table = col.table
                    ),
                    &[&after, &BATCH],
                )
                .await?;
            for row in &rows {
                let key: String = row.get(0);
                let sealed: String = row.get(1);
                if keys.is_under_primary(&sealed) {
                    report.already_current += 1;
                } else {
                    let plain = keys
                        .decrypt(&sealed)
                        .map_err(|_| RotateError::Undecryptable {
                            table: col.table,
                            column: col.column,
                            key: key.clone(),
                        })?;
                    tx.execute(
                        &format!(
                            "UPDATE {table} SET {column} = $2 WHERE {key}::text = $1",
                            table = col.table,
                            column = col.column,
                            key = col.key
                        ),
                        &[&key, &keys.encrypt(&plain)],
                    )
                    .await?;
                    report.rewritten += 1;
                }
                after = key;
            }
            tx.commit().await?;
            if (rows.len() as i64) < BATCH {
                break;
            }
        }
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    audit::append(
        &tx,
        keys.audit_keys(),
        &AuditEvent {
            account_id: None,
            actor: Actor::System,
            client_ip: None,
            user_agent: None,
            action: "field_key.rotated",
            target: None,
            outcome: Outcome::Success,
            metadata: json!({
                "rewritten": report.rewritten,
                "already_current": report.already_current,
                "keys_configured": keys.len(),
            }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(report)
}
