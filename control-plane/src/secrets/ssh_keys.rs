//! SSH keys of SSH servers: the platform's Ed25519 login key (generated per server) and the
//! server's pinned host key.

use russh::keys::ssh_key::{Algorithm, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use uuid::Uuid;

/// A new login key for a server.
pub struct LoginKey {
    /// OpenSSH private key; sealed before storage, never written to disk.
    pub private_openssh: String,
    /// The one `authorized_keys` line the customer adds: `ssh-ed25519 AAAA… sensei-<id>`.
    pub authorized_keys_line: String,
    /// `SHA256:…`, exactly what `ssh-keygen -lf` prints.
    pub fingerprint: String,
}

/// Why key material was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl LoginKey {
    pub fn generate(server_id: Uuid) -> Result<Self, KeyError> {
        let mut key = PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519)
            .map_err(|e| KeyError(e.to_string()))?;
        key.set_comment(format!("sensei-{server_id}"));
        let public = key.public_key();
        Ok(Self {
            private_openssh: key
                .to_openssh(LineEnding::LF)
                .map_err(|e| KeyError(e.to_string()))?
                .to_string(),
            authorized_keys_line: public.to_openssh().map_err(|e| KeyError(e.to_string()))?,
            fingerprint: public.fingerprint(HashAlg::Sha256).to_string(),
        })
    }
}

/// Parses a decrypted login key.
pub fn private_key(openssh: &str) -> Result<PrivateKey, KeyError> {
    PrivateKey::from_openssh(openssh)
        .map_err(|e| KeyError(format!("stored SSH key unreadable: {e}")))
}

/// Parses an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`).
pub fn public_key(line: &str) -> Result<PublicKey, KeyError> {
    PublicKey::from_openssh(line.trim())
        .map_err(|e| KeyError(format!("not an OpenSSH public key ({e})")))
}

/// `SHA256:…` of a public key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The bytes a signed job for an SSH server is bound to: SHA-256 of the login key's public
/// half (the SSH counterpart of an agent certificate's fingerprint).
pub fn binding(key: &PublicKey) -> [u8; 32] {
    let fp = key.fingerprint(HashAlg::Sha256);
    let mut out = [0u8; 32];
    out.copy_from_slice(fp.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_round_trips_and_names_the_server() {
        let id = Uuid::new_v4();
        let key = LoginKey::generate(id).expect("key");
        assert!(key.authorized_keys_line.starts_with("ssh-ed25519 AAAA"));
        assert!(key.authorized_keys_line.ends_with(&format!(" sensei-{id}")));
        assert!(key.fingerprint.starts_with("SHA256:"));
        let back = private_key(&key.private_openssh).expect("parse");
        assert_eq!(fingerprint(back.public_key()), key.fingerprint);
        let public = public_key(&key.authorized_keys_line).expect("public");
        assert_eq!(fingerprint(&public), key.fingerprint);
        assert!(public_key("ssh-ed25519 garbage").is_err());
    }
}
