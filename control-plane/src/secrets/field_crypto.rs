//! Field encryption: every secret column goes through here, sealed with Fernet.
//!
//! Keys come from `CODESENSEI_FIELD_KEY`, a comma-separated list of Fernet keys (or of keys
//! wrapped by an HSM: [`super::key_provider`]). The first key encrypts; every key decrypts, so an operator rotates by prepending a new key, running
//! `rotate-field-key`, then dropping the old one (docs/notes.md). Keys are never written to
//! the database and never appear in logs or error messages.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use fernet::{Fernet, MultiFernet};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The environment variable holding the keys.
pub const FIELD_KEY_ENV: &str = "CODESENSEI_FIELD_KEY";

/// Why the field keys could not be loaded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldKeyError {
    /// The variable is unset or empty.
    #[error(
        "{FIELD_KEY_ENV} is not set: the control plane refuses to store secrets without it. \
         Generate a key with `sensei-control-plane generate-field-key` and keep it outside the \
         database"
    )]
    Missing,
    /// One entry of the list is not a Fernet key. The entry itself is never echoed.
    #[error(
        "entry {position} of {FIELD_KEY_ENV} is not a Fernet key (expected 32 bytes in URL-safe \
         base64, 44 characters)"
    )]
    Malformed { position: usize },
    /// The development key file could not be read or written.
    #[error("field key file {path}: {message}")]
    File { path: String, message: String },
    /// `SENSEI_AUDIT_KEY` is malformed.
    #[error(transparent)]
    AuditKey(crate::audit::keys::AuditKeyError),
    /// The key provider (an HSM) could not give the keys.
    #[error(transparent)]
    Provider(#[from] super::key_provider::KeyProviderError),
}

/// A ciphertext that no configured key opens (wrong key, or the value was tampered with).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("encrypted field could not be decrypted with any configured field key")]
pub struct FieldDecryptError;

/// The loaded field keys.
pub struct FieldKeys {
    primary: Fernet,
    all: MultiFernet,
    input_hash_key: [u8; 32],
    count: usize,
    /// `SENSEI_AUDIT_KEY`, when set.
    dedicated_audit: Option<crate::audit::keys::AuditKeyring>,
    /// The full audit ring, installed once the database is open ([`crate::audit::keys::load`]).
    audit: std::sync::OnceLock<crate::audit::keys::AuditKeyring>,
}

impl FieldKeys {
    /// Parses a comma-separated list of Fernet keys.
    pub fn parse(spec: &str) -> Result<Self, FieldKeyError> {
        let keys: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        let mut fernets = Vec::with_capacity(keys.len());
        let mut first_raw = None;
        for (i, key) in keys.iter().enumerate() {
            let malformed = FieldKeyError::Malformed { position: i + 1 };
            // The fernet crate also takes unpadded input; insist on the canonical 44-character
            // form so that a truncated paste is caught here instead of becoming another key.
            let raw = base64::engine::general_purpose::URL_SAFE
                .decode(key)
                .ok()
                .filter(|raw| raw.len() == 32)
                .ok_or(malformed.clone())?;
            fernets.push(Fernet::new(key).ok_or(malformed)?);
            first_raw.get_or_insert(raw);
        }
        let first_raw = first_raw.ok_or(FieldKeyError::Missing)?;
        let primary = Fernet::new(keys[0]).ok_or(FieldKeyError::Malformed { position: 1 })?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&first_raw)
            .map_err(|_| FieldKeyError::Malformed { position: 1 })?;
        mac.update(b"sensei/audit-input-hash/v1");
        Ok(Self {
            primary,
            count: fernets.len(),
            all: MultiFernet::new(fernets),
            input_hash_key: mac.finalize().into_bytes().into(),
            dedicated_audit: None,
            audit: std::sync::OnceLock::new(),
        })
    }

    /// Dedicated audit keys (`SENSEI_AUDIT_KEY`), which sign before the stored chain key.
    pub fn with_audit_keys(mut self, ring: crate::audit::keys::AuditKeyring) -> Self {
        self.dedicated_audit = Some(ring);
        self
    }

    pub fn dedicated_audit_keys(&self) -> Option<&crate::audit::keys::AuditKeyring> {
        self.dedicated_audit.as_ref()
    }

    /// Installs the audit ring once. False when a ring with another signing key is already
    /// installed (the same keys opened a second database).
    #[must_use]
    pub fn install_audit_keys(&self, ring: crate::audit::keys::AuditKeyring) -> bool {
        let installed = self.audit.get_or_init(|| ring.clone());
        installed.current_id() == ring.current_id()
    }

    /// The keys of the audit chain (see [`crate::audit::keys`]).
    ///
    /// # Panics
    /// Before the database was opened: every path that writes or checks audit rows opens the
    /// database first, which installs them.
    pub fn audit_keys(&self) -> &crate::audit::keys::AuditKeyring {
        self.audit
            .get()
            .expect("audit keys are installed when the database is opened")
    }

    /// Reads `CODESENSEI_FIELD_KEY` through the configured key provider
    /// (`SENSEI_FIELD_KEY_PROVIDER`), and `SENSEI_AUDIT_KEY` when it is set.
    pub fn from_env() -> Result<Self, FieldKeyError> {
        let provider = super::key_provider::KeyProvider::from_env()?;
        let spec = std::env::var(FIELD_KEY_ENV).map_err(|_| FieldKeyError::Missing)?;
        if spec.trim().is_empty() {
            return Err(FieldKeyError::Missing);
        }
        Self::parse(&provider.keys(&spec)?)?.with_audit_keys_from_env()
    }

    /// Applies `SENSEI_AUDIT_KEY` when it is set and not empty.
    pub fn with_audit_keys_from_env(self) -> Result<Self, FieldKeyError> {
        let spec = std::env::var(crate::audit::keys::AUDIT_KEY_ENV).unwrap_or_default();
        match crate::audit::keys::AuditKeyring::parse(&spec) {
            Ok(Some(ring)) => Ok(self.with_audit_keys(ring)),
            Ok(None) => Ok(self),
            Err(e) => Err(FieldKeyError::AuditKey(e)),
        }
    }

    /// A fresh random key in the form `CODESENSEI_FIELD_KEY` expects.
    pub fn generate_key() -> String {
        Fernet::generate_key()
    }

    /// Development convenience for the quickstart: reads the key file in `data_dir`, creating
    /// it (mode 0600) on first use. Returns the keys and whether the file was just created.
    pub fn load_or_create_dev_key(data_dir: &Path) -> Result<(Self, PathBuf, bool), FieldKeyError> {
        let path = data_dir.join("field.key");
        let file_err = |e: std::io::Error| FieldKeyError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let created = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                writeln!(file, "{}", Self::generate_key()).map_err(file_err)?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(file_err(e)),
        };
        let spec = std::fs::read_to_string(&path).map_err(file_err)?;
        Ok((Self::parse(&spec)?, path, created))
    }

    /// How many keys are configured (the first encrypts).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encrypts under the first key. The result is a standard Fernet token (`gAAAAA…`).
    pub fn encrypt(&self, plaintext: &[u8]) -> String {
        self.primary.encrypt(plaintext)
    }

    /// Decrypts with whichever configured key opens the token.
    pub fn decrypt(&self, token: &str) -> Result<Vec<u8>, FieldDecryptError> {
        self.all.decrypt(token).map_err(|_| FieldDecryptError)
    }

    /// Whether `token` is already sealed under the first key (rotation skips those).
    pub fn is_under_primary(&self, token: &str) -> bool {
        self.primary.decrypt(token).is_ok()
    }

    /// A keyed hash of untrusted input (failed login attempts), hex-encoded. The key derives
    /// from the first field key, so a copy of the audit table alone cannot be brute-forced
    /// back into the passwords people mistyped.
    pub fn keyed_input_hash(&self, input: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.input_hash_key)
            .expect("HMAC accepts keys of any length");
        mac.update(input);
        hex::encode(mac.finalize().into_bytes())
    }
}

impl fmt::Debug for FieldKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldKeys")
            .field("keys", &self.count)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A fixed vector made with Python's `cryptography` 48.0:
    //   Fernet(KEY)._encrypt_from_parts(b"sensei field vector", 1700000000, bytes(range(16)))
    const KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";
    const PLAINTEXT: &[u8] = b"sensei field vector";
    const PYTHON_TOKEN: &str = include_str!("../../tests-data/fernet_python_token.txt");

    #[test]
    fn decrypts_a_token_made_by_python() {
        let keys = FieldKeys::parse(KEY).expect("key");
        assert_eq!(
            keys.decrypt(PYTHON_TOKEN.trim()).expect("decrypt"),
            PLAINTEXT
        );
    }

    #[test]
    fn python_decrypts_what_we_encrypt() {
        // The other direction of the fixed vector above: Python's `cryptography` (installed
        // by ./test from Debian's python3-cryptography) must open a token we make, under the
        // same key, with the same plaintext. SENSEI_TEST_PYTHON names the interpreter that has
        // it (./test sets Debian's own), since a pyenv python3 on PATH would not.
        let token = FieldKeys::parse(KEY).expect("key").encrypt(PLAINTEXT);
        let script = "import sys\nfrom cryptography.fernet import Fernet\n\
                      sys.stdout.write(Fernet(sys.argv[1].encode()).decrypt(sys.argv[2].encode()).decode())";
        let python = std::env::var_os("SENSEI_TEST_PYTHON").unwrap_or_else(|| "python3".into());
        let out = std::process::Command::new(python)
            .args(["-c", script, KEY, &token])
            .output()
            .expect("python3 must be installed for the Fernet interoperability test");
        assert!(
            out.status.success(),
            "python could not decrypt our token (is python3-cryptography installed?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, PLAINTEXT);
    }

    #[test]
    fn first_key_encrypts_all_keys_decrypt() {
        let old = FieldKeys::generate_key();
        let new = FieldKeys::generate_key();
        let sealed_old = FieldKeys::parse(&old).expect("old").encrypt(b"secret");
        let both = FieldKeys::parse(&format!("{new},{old}")).expect("both");
        assert_eq!(both.decrypt(&sealed_old).expect("decrypt"), b"secret");
        assert!(!both.is_under_primary(&sealed_old));
        let sealed_new = both.encrypt(b"secret");
        assert!(both.is_under_primary(&sealed_new));
        assert!(FieldKeys::parse(&old)
            .expect("old")
            .decrypt(&sealed_new)
            .is_err());
    }

    #[test]
    fn tampered_ciphertext_is_refused() {
        let keys = FieldKeys::parse(KEY).expect("key");
        let token = keys.encrypt(b"secret");
        let mut bytes = token.into_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("ascii");
        assert_eq!(keys.decrypt(&tampered), Err(FieldDecryptError));
    }

    #[test]
    fn bad_key_lists_are_refused_without_echoing_them() {
        assert_eq!(FieldKeys::parse("").err(), Some(FieldKeyError::Missing));
        assert_eq!(FieldKeys::parse(" , ").err(), Some(FieldKeyError::Missing));
        let err = FieldKeys::parse("hunter2").expect_err("refused");
        assert_eq!(err, FieldKeyError::Malformed { position: 1 });
        assert!(!err.to_string().contains("hunter2"));
        let two = format!("{KEY},c2hvcnQ=");
        assert_eq!(
            FieldKeys::parse(&two).err(),
            Some(FieldKeyError::Malformed { position: 2 })
        );
    }

    #[test]
    fn debug_output_holds_no_key() {
        let keys = FieldKeys::parse(KEY).expect("key");
        assert!(!format!("{keys:?}").contains(&KEY[..10]));
    }

    #[test]
    fn dev_key_file_is_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let (a, path, created) = FieldKeys::load_or_create_dev_key(dir.path()).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, _, created) = FieldKeys::load_or_create_dev_key(dir.path()).expect("reuse");
        assert!(!created);
        assert_eq!(b.decrypt(&a.encrypt(b"x")).expect("same key"), b"x");
    }
}
