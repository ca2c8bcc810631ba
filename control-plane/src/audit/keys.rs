//! The keys of the audit chain: an HMAC keyring held outside the database.
//!
//! A plain hash chain only shows changes made by someone who did not recompute it; whoever can
//! write the table can recompute it. Keying each link with a secret the database never sees
//! turns a rewrite into a forgery that `audit verify` catches. Keys come from
//! `SENSEI_AUDIT_KEY` (a comma-separated list, the same form as a field key), or, when that is
//! unset, are derived from each key of `CODESENSEI_FIELD_KEY`. The first key signs new rows;
//! every row records the id of its key, so rotating (prepending a key) keeps old rows
//! verifiable as long as their key stays in the list.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The environment variable holding dedicated audit keys.
pub const AUDIT_KEY_ENV: &str = "SENSEI_AUDIT_KEY";

/// One key of the ring, with the id rows record.
#[derive(Clone)]
struct ChainKey {
    id: String,
    secret: [u8; 32],
}

/// The audit keyring; the first key signs.
#[derive(Clone)]
pub struct AuditKeyring {
    keys: Vec<ChainKey>,
}

/// Why `SENSEI_AUDIT_KEY` was refused. The entry itself is never echoed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "entry {position} of {AUDIT_KEY_ENV} is not a key (expected 32 bytes in URL-safe base64, \
     44 characters; `sensei-control-plane generate-field-key` prints one)"
)]
pub struct AuditKeyError {
    pub position: usize,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

impl ChainKey {
    fn new(secret: [u8; 32]) -> Self {
        // The id names the key without revealing it: a keyed hash of a fixed label.
        let id = hex::encode(&hmac(&secret, &[b"sensei/audit-key-id/v1"])[..6]);
        Self { id, secret }
    }
}

impl AuditKeyring {
    /// A ring of one key.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            keys: vec![ChainKey::new(secret)],
        }
    }

    /// This ring followed by the keys of `older` it does not already hold.
    pub fn then(mut self, older: &AuditKeyring) -> Self {
        for key in &older.keys {
            if !self.keys.iter().any(|k| k.id == key.id) {
                self.keys.push(key.clone());
            }
        }
        self
    }

    /// Parses a comma-separated list of 32-byte URL-safe base64 keys.
    pub fn parse(spec: &str) -> Result<Option<Self>, AuditKeyError> {
        let mut keys = Vec::new();
        for (i, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
        {
            let raw: [u8; 32] = base64::engine::general_purpose::URL_SAFE
                .decode(entry)
                .ok()
                .and_then(|raw| raw.try_into().ok())
                .ok_or(AuditKeyError { position: i + 1 })?;
            keys.push(ChainKey::new(hmac(&raw, &[b"sensei/audit-chain/v1"])));
        }
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    /// The id of the key new rows are signed with.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// The link of a new row under the current key.
    pub fn sign(&self, prev: &[u8], row: &[u8]) -> Vec<u8> {
        hmac(&self.keys[0].secret, &[prev, row]).to_vec()
    }

    /// The link a row signed with key `id` must carry, or `None` when that key is not in the
    /// ring (retired too early).
    pub fn link_under(&self, id: &str, prev: &[u8], row: &[u8]) -> Option<Vec<u8>> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| hmac(&k.secret, &[prev, row]).to_vec())
    }

    /// Ids of every key in the ring, current first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }
}

impl std::fmt::Debug for AuditKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeyring")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_text(byte: u8) -> String {
        base64::engine::general_purpose::URL_SAFE.encode([byte; 32])
    }

    #[test]
    fn rotation_keeps_old_links_checkable() {
        let old = AuditKeyring::parse(&key_text(1))
            .expect("parses")
            .expect("a key");
        let link = old.sign(b"prev", b"row");
        let rotated = AuditKeyring::parse(&format!("{},{}", key_text(2), key_text(1)))
            .expect("parses")
            .expect("a key");
        assert_ne!(rotated.current_id(), old.current_id());
        assert_eq!(
            rotated.link_under(old.current_id(), b"prev", b"row"),
            Some(link.clone())
        );
        assert_ne!(rotated.sign(b"prev", b"row"), link);
        let other = AuditKeyring::parse(&key_text(3))
            .expect("parses")
            .expect("a key");
        assert_eq!(other.link_under(old.current_id(), b"prev", b"row"), None);
    }

    #[test]
    fn malformed_entries_are_refused_by_position() {
        assert_eq!(
            AuditKeyring::parse(&format!("{}, short", key_text(1))).expect_err("refused"),
            AuditKeyError { position: 2 }
        );
        assert!(AuditKeyring::parse(" , ").expect("parses").is_none());
    }

    #[test]
    fn a_dedicated_key_signs_and_the_stored_key_still_verifies() {
        let stored = AuditKeyring::from_secret([7; 32]);
        let old_link = stored.sign(b"p", b"r");
        let ring = AuditKeyring::parse(&key_text(1))
            .expect("parses")
            .expect("a key")
            .then(&stored)
            .then(&stored);
        assert_eq!(ring.ids().count(), 2);
        assert_ne!(ring.current_id(), stored.current_id());
        assert_eq!(
            ring.link_under(stored.current_id(), b"p", b"r"),
            Some(old_link)
        );
    }
}

/// The name of the sealed chain key in `signing_keys`.
const STORED_KEY_NAME: &str = "audit-chain";

/// Why the audit keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyLoadError {
    #[error("database: {0}")]
    Db(String),
    #[error(
        "the stored audit chain key cannot be decrypted with CODESENSEI_FIELD_KEY (the key it \
         was sealed under is missing from the list)"
    )]
    WrongFieldKey,
    #[error("these field keys already serve the audit chain of another database")]
    OtherDatabase,
}

/// Loads (creating on the very first start) the sealed chain key and installs the ring in
/// `keys`, after any dedicated `SENSEI_AUDIT_KEY` keys.
pub async fn load(
    pool: &deadpool_postgres::Pool,
    keys: &crate::secrets::field_crypto::FieldKeys,
) -> Result<(), AuditKeyLoadError> {
    use rand::RngCore;
    let db = |e: tokio_postgres::Error| AuditKeyLoadError::Db(crate::store::db::describe(&e));
    let client = pool
        .get()
        .await
        .map_err(|e| AuditKeyLoadError::Db(e.to_string()))?;
    let mut fresh = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut fresh);
    let fresh_ring = AuditKeyring::from_secret(fresh);
    // Replicas starting together: the first insert wins, everyone reads the stored row.
    client
        .execute(
            "INSERT INTO signing_keys (name, public_key, private_key_ciphertext) \
             VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            &[
                &STORED_KEY_NAME,
                &fresh_ring.current_id().as_bytes(),
                &keys.encrypt(&fresh),
            ],
        )
        .await
        .map_err(db)?;
    let sealed: String = client
        .query_one(
            "SELECT private_key_ciphertext FROM signing_keys WHERE name = $1",
            &[&STORED_KEY_NAME],
        )
        .await
        .map_err(db)?
        .get(0);
    let secret: [u8; 32] = keys
        .decrypt(&sealed)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(AuditKeyLoadError::WrongFieldKey)?;
    let stored = AuditKeyring::from_secret(secret);
    let ring = match keys.dedicated_audit_keys() {
        Some(dedicated) => dedicated.clone().then(&stored),
        None => stored,
    };
    if keys.install_audit_keys(ring) {
        Ok(())
    } else {
        Err(AuditKeyLoadError::OtherDatabase)
    }
}
