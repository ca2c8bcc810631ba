//! Where the field keys come from: the seam between the keyring ([`super::field_crypto`]) and
//! whatever holds the keys that protect it.
//!
//! - [`KeyProvider::Environment`] (the default): `CODESENSEI_FIELD_KEY` holds the Fernet keys
//!   themselves. Whoever reads the environment can read every sealed field.
//! - [`KeyProvider::Pkcs11`]: `CODESENSEI_FIELD_KEY` holds the Fernet keys **wrapped** by an
//!   AES-256 key that lives in an HSM (PKCS#11) and never leaves it: each entry is
//!   `p11:` + base64url(IV ‖ AES-GCM ciphertext and tag). At start the control plane asks the
//!   HSM to unwrap them, and keeps the result in memory only. A copy of the database and of the
//!   environment, without the HSM and its PIN, opens nothing.
//!
//! Cloud KMSs and Vault's transit engine fit the same seam: a provider whose `unwrap` is one
//! `Decrypt` call (AWS KMS, GCP Cloud KMS, Azure Key Vault `unwrapKey`, Vault
//! `transit/decrypt`) at start, and whose `wrap` is the matching `Encrypt` when a new data key
//! is generated (docs/security.md).

use std::path::PathBuf;

use base64::Engine;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

/// Selects the provider: unset or `env`, or `pkcs11:token=LABEL;key=LABEL`.
pub const PROVIDER_ENV: &str = "SENSEI_FIELD_KEY_PROVIDER";
/// The PKCS#11 module (shared library) to load.
pub const PKCS11_MODULE_ENV: &str = "SENSEI_PKCS11_MODULE";
/// The token's user PIN.
pub const PKCS11_PIN_ENV: &str = "SENSEI_PKCS11_PIN";
/// How a wrapped entry of `CODESENSEI_FIELD_KEY` starts.
pub const WRAPPED_PREFIX: &str = "p11:";

/// Bound to every wrapped key: a ciphertext made for something else does not unwrap as one.
const AAD: &[u8] = b"sensei/field-key/v1";
const IV_LEN: usize = 12;
const TAG_BITS: u64 = 128;
/// A Fernet key is 32 bytes; wrapped, it is the IV, those bytes and a 16-byte tag.
const WRAPPED_LEN: usize = IV_LEN + 32 + 16;

/// Why the provider could not give the keys. Messages name what to fix and never carry a
/// PIN or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProviderError {
    #[error("{PROVIDER_ENV} must be `env` or `pkcs11:token=LABEL;key=LABEL` (got a value of scheme {0:?})")]
    UnknownProvider(String),
    #[error("{0} is not set: the pkcs11 provider needs it")]
    MissingSetting(&'static str),
    #[error("cannot load the PKCS#11 module {module}: {message}")]
    Module { module: String, message: String },
    #[error("no PKCS#11 token is labelled {0:?}")]
    NoToken(String),
    #[error("the HSM refused the PIN in {PKCS11_PIN_ENV}: {0}")]
    Login(String),
    #[error("the HSM token has no key labelled {0:?}: create it with `sensei-control-plane hsm-create-key`")]
    NoKey(String),
    #[error(
        "entry {position} of CODESENSEI_FIELD_KEY is not a key wrapped by this HSM (it must start with `{WRAPPED_PREFIX}`; generate one with `sensei-control-plane generate-field-key`)"
    )]
    NotWrapped { position: usize },
    #[error(
        "entry {position} of CODESENSEI_FIELD_KEY does not unwrap with the HSM's key {key:?}: it was wrapped by another key or token, or altered"
    )]
    Unwrap { position: usize, key: String },
    #[error("the HSM failed: {0}")]
    Hsm(String),
}

/// Where the field keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProvider {
    /// `CODESENSEI_FIELD_KEY` holds the keys themselves.
    Environment,
    /// `CODESENSEI_FIELD_KEY` holds keys wrapped by a key in a PKCS#11 token.
    Pkcs11 {
        /// The token's label.
        token: String,
        /// The wrapping key's label (`CKA_LABEL`).
        key: String,
    },
}

impl KeyProvider {
    /// Reads [`PROVIDER_ENV`].
    pub fn from_env() -> Result<Self, KeyProviderError> {
        Self::parse(&std::env::var(PROVIDER_ENV).unwrap_or_default())
    }

    pub fn parse(spec: &str) -> Result<Self, KeyProviderError> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "env" {
            return Ok(KeyProvider::Environment);
        }
        // Only the scheme is echoed: a value typed into the wrong place (a PIN) stays out of
        // the log.
        let unknown = || {
            KeyProviderError::UnknownProvider(
                spec.split(':')
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(20)
                    .collect(),
            )
        };
        let settings = spec.strip_prefix("pkcs11:").ok_or_else(unknown)?;
        let (mut token, mut key) = (None, None);
        for pair in settings.split(';').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("token", v)) if !v.is_empty() => token = Some(v.to_owned()),
                Some(("key", v)) if !v.is_empty() => key = Some(v.to_owned()),
                _ => return Err(unknown()),
            }
        }
        match (token, key) {
            (Some(token), Some(key)) => Ok(KeyProvider::Pkcs11 { token, key }),
            _ => Err(unknown()),
        }
    }

    /// Turns the entries of `CODESENSEI_FIELD_KEY` into the Fernet keys the keyring parses.
    pub fn keys(&self, spec: &str) -> Result<String, KeyProviderError> {
        match self {
            KeyProvider::Environment => Ok(spec.to_owned()),
            KeyProvider::Pkcs11 { .. } => {
                let hsm = Hsm::open(self)?;
                let unwrapped: Result<Vec<String>, KeyProviderError> = entries(spec)
                    .enumerate()
                    .map(|(i, entry)| hsm.unwrap(i + 1, entry))
                    .collect();
                Ok(unwrapped?.join(","))
            }
        }
    }

    /// A new field key in the form `CODESENSEI_FIELD_KEY` expects from this provider.
    pub fn generate_key(&self) -> Result<String, KeyProviderError> {
        let key = super::field_crypto::FieldKeys::generate_key();
        match self {
            KeyProvider::Environment => Ok(key),
            KeyProvider::Pkcs11 { .. } => Hsm::open(self)?.wrap(&key),
        }
    }
}

fn entries(spec: &str) -> impl Iterator<Item = &str> {
    spec.split(',').map(str::trim).filter(|k| !k.is_empty())
}

fn hsm_error(e: cryptoki::error::Error) -> KeyProviderError {
    KeyProviderError::Hsm(e.to_string())
}

/// An open, logged-in session on the provider's token, and its wrapping key's label.
pub struct Hsm {
    // Kept alive for the session's sake: the module is unloaded when the context drops.
    _context: Pkcs11,
    session: Session,
    key_label: String,
}

impl Hsm {
    /// Loads the module, finds the token by label and logs in with the PIN.
    pub fn open(provider: &KeyProvider) -> Result<Self, KeyProviderError> {
        let KeyProvider::Pkcs11 { token, key } = provider else {
            return Err(KeyProviderError::UnknownProvider("env".into()));
        };
        let module: PathBuf = std::env::var_os(PKCS11_MODULE_ENV)
            .filter(|m| !m.is_empty())
            .map(PathBuf::from)
            .ok_or(KeyProviderError::MissingSetting(PKCS11_MODULE_ENV))?;
        let pin = std::env::var(PKCS11_PIN_ENV)
            .ok()
            .filter(|p| !p.is_empty())
            .ok_or(KeyProviderError::MissingSetting(PKCS11_PIN_ENV))?;
        let context = Pkcs11::new(&module).map_err(|e| KeyProviderError::Module {
            module: module.display().to_string(),
            message: e.to_string(),
        })?;
        context
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(hsm_error)?;
        let slot = context
            .get_slots_with_token()
            .map_err(hsm_error)?
            .into_iter()
            .find(|slot| {
                context
                    .get_token_info(*slot)
                    .is_ok_and(|info| info.label().trim_end() == token)
            })
            .ok_or_else(|| KeyProviderError::NoToken(token.clone()))?;
        let session = context.open_rw_session(slot).map_err(hsm_error)?;
        session
            .login(UserType::User, Some(&AuthPin::new(pin.into())))
            .map_err(|e| KeyProviderError::Login(e.to_string()))?;
        Ok(Self {
            _context: context,
            session,
            key_label: key.clone(),
        })
    }

    fn key_template(&self) -> Vec<Attribute> {
        vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Label(self.key_label.as_bytes().to_vec()),
        ]
    }

    fn wrapping_key(&self) -> Result<ObjectHandle, KeyProviderError> {
        self.session
            .find_objects(&self.key_template())
            .map_err(hsm_error)?
            .into_iter()
            .next()
            .ok_or_else(|| KeyProviderError::NoKey(self.key_label.clone()))
    }

    /// Creates the wrapping key inside the token (AES-256, sensitive, never extractable), if
    /// it does not exist yet. Answers whether it was created.
    pub fn create_wrapping_key(&self) -> Result<bool, KeyProviderError> {
        if self.wrapping_key().is_ok() {
            return Ok(false);
        }
        let mut template = self.key_template();
        template.retain(|a| !matches!(a, Attribute::Class(_) | Attribute::KeyType(_)));
        template.extend([
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
        ]);
        self.session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(hsm_error)?;
        Ok(true)
    }

    /// Wraps a Fernet key (its base64 text) for `CODESENSEI_FIELD_KEY`.
    pub fn wrap(&self, fernet_key: &str) -> Result<String, KeyProviderError> {
        let raw = base64::engine::general_purpose::URL_SAFE
            .decode(fernet_key)
            .map_err(|e| KeyProviderError::Hsm(format!("not a Fernet key: {e}")))?;
        let key = self.wrapping_key()?;
        let mut iv: [u8; IV_LEN] = rand::random();
        let sealed = {
            let params = GcmParams::new(&mut iv, AAD, TAG_BITS.into()).map_err(hsm_error)?;
            self.session
                .encrypt(&Mechanism::AesGcm(params), key, &raw)
                .map_err(hsm_error)?
        };
        let mut out = iv.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!(
            "{WRAPPED_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
        ))
    }

    /// Unwraps entry `position` of `CODESENSEI_FIELD_KEY` into the Fernet key's text.
    fn unwrap(&self, position: usize, entry: &str) -> Result<String, KeyProviderError> {
        let not_wrapped = KeyProviderError::NotWrapped { position };
        let bytes = entry
            .strip_prefix(WRAPPED_PREFIX)
            .and_then(|b| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(b)
                    .ok()
            })
            .filter(|b| b.len() == WRAPPED_LEN)
            .ok_or(not_wrapped)?;
        let (iv, sealed) = bytes.split_at(IV_LEN);
        let mut iv = iv.to_vec();
        let key = self.wrapping_key()?;
        let raw = {
            let params = GcmParams::new(&mut iv, AAD, TAG_BITS.into()).map_err(hsm_error)?;
            self.session
                .decrypt(&Mechanism::AesGcm(params), key, sealed)
                .map_err(|_| KeyProviderError::Unwrap {
                    position,
                    key: self.key_label.clone(),
                })?
        };
        Ok(base64::engine::general_purpose::URL_SAFE.encode(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_named_strictly() {
        assert_eq!(KeyProvider::parse(""), Ok(KeyProvider::Environment));
        assert_eq!(KeyProvider::parse("env"), Ok(KeyProvider::Environment));
        assert_eq!(
            KeyProvider::parse("pkcs11:token=sensei;key=field"),
            Ok(KeyProvider::Pkcs11 {
                token: "sensei".into(),
                key: "field".into()
            })
        );
        for bad in [
            "pkcs11:",
            "pkcs11:token=sensei",
            "pkcs11:token=;key=k",
            "pkcs11:token=a;key=b;pin=1234",
            "kms:arn",
        ] {
            assert!(KeyProvider::parse(bad).is_err(), "{bad}");
        }
        // A PIN typed into the wrong place is never echoed.
        let e = KeyProvider::parse("pkcs11:token=t;key=k;pin=123456")
            .expect_err("refused")
            .to_string();
        assert!(!e.contains("123456") && e.contains("\"pkcs11\""), "{e}");
    }

    #[test]
    fn the_environment_provider_hands_the_keys_through() {
        let key = KeyProvider::Environment.generate_key().expect("key");
        assert_eq!(KeyProvider::Environment.keys(&key), Ok(key));
    }
}
