//! Bearer secrets handed to clients: session cookies, API keys, enrollment tokens, invitation
//! and password-reset links.
//!
//! A token reads `<kind>_<id>_<secret>`: the id finds the row, the secret proves possession.
//! Only SHA-256 of the secret is stored (the secret has 256 bits of entropy, so a slow hash
//! buys nothing), and the comparison is constant-time.

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

const SECRET_LEN: usize = 32;
/// Longest text accepted as a token, checked before any parsing.
const MAX_TOKEN_LEN: usize = 128;

/// What a token is for; the prefix stops one kind being used as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenKind {
    Session,
    ApiKey,
    Enrollment,
    /// A single-use invitation link.
    Invitation,
    /// A single-use password-reset link.
    PasswordReset,
    /// A single-use invitation to create an account (signup policy `invite-only`).
    SignupInvitation,
}

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Session => "ss",
            TokenKind::ApiKey => "sk",
            TokenKind::Enrollment => "et",
            TokenKind::Invitation => "iv",
            TokenKind::PasswordReset => "pr",
            TokenKind::SignupInvitation => "su",
        }
    }
}

/// A token's id and secret.
pub struct Token {
    pub id: Uuid,
    secret: [u8; SECRET_LEN],
}

impl Token {
    /// A new token with a random id and secret.
    pub fn generate() -> Self {
        let mut secret = [0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        Self {
            id: Uuid::new_v4(),
            secret,
        }
    }

    /// The text given to the client, once.
    pub fn render(&self, kind: TokenKind) -> String {
        format!(
            "{}_{}_{}",
            kind.prefix(),
            self.id.simple(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret)
        )
    }

    /// Parses presented text; `None` for anything that is not a well-formed token of `kind`.
    pub fn parse(kind: TokenKind, text: &str) -> Option<Self> {
        if text.len() > MAX_TOKEN_LEN {
            return None;
        }
        let rest = text.strip_prefix(kind.prefix())?.strip_prefix('_')?;
        let (id, secret) = rest.split_once('_')?;
        let id = Uuid::try_parse(id).ok()?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret)
            .ok()?;
        Some(Self {
            id,
            secret: raw.try_into().ok()?,
        })
    }

    /// What the database stores.
    pub fn secret_hash(&self) -> Vec<u8> {
        Sha256::digest(self.secret).to_vec()
    }

    /// Constant-time check of the presented secret against a stored hash.
    pub fn matches(&self, stored_hash: &[u8]) -> bool {
        self.secret_hash().ct_eq(stored_hash).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip_and_match() {
        let t = Token::generate();
        let text = t.render(TokenKind::ApiKey);
        let back = Token::parse(TokenKind::ApiKey, &text).expect("parse");
        assert_eq!(back.id, t.id);
        assert!(back.matches(&t.secret_hash()));
    }

    #[test]
    fn wrong_kind_or_secret_is_refused() {
        let t = Token::generate();
        let text = t.render(TokenKind::Session);
        assert!(Token::parse(TokenKind::ApiKey, &text).is_none());
        let other = Token::generate();
        let forged = Token::parse(TokenKind::Session, &text).expect("parse");
        assert!(!forged.matches(&other.secret_hash()));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "sk_",
            "sk_nothex_abc",
            "sk_00000000000000000000000000000000_",
            "sk_00000000000000000000000000000000_c2hvcnQ",
            &"x".repeat(1000),
        ] {
            assert!(Token::parse(TokenKind::ApiKey, bad).is_none(), "{bad}");
        }
    }
}
