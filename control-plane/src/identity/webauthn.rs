//! Security keys and platform authenticators (WebAuthn) as a second factor: the relying party
//! this control plane is, and the limits on what users register. The ceremonies themselves
//! (challenges, signatures, counters, user presence and verification) are webauthn-rs's.

use std::net::IpAddr;

use webauthn_rs::prelude::Url;
use webauthn_rs::{Webauthn, WebauthnBuilder};

/// How long a registration or sign-in ceremony may take, browser prompt included.
pub const CEREMONY_SECS: i64 = 300;
/// Keys one user may register.
pub const MAX_KEYS_PER_USER: i64 = 10;
/// Ceremonies one user may have open at once; starting another ends the oldest.
pub const MAX_OPEN_CEREMONIES: i64 = 5;
/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Largest credential a browser may send back (JSON), in bytes: real ones are a few hundred
/// bytes to a few kilobytes (with an attestation certificate chain).
pub const MAX_CREDENTIAL_BYTES: usize = 32 * 1024;

/// Why this control plane cannot be a WebAuthn relying party.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(
        "security keys need the control plane's public URL (--public-url) to name it by a DNS \
         name, not an IP address; it is {0}"
    )]
    AddressNotName(String),
    #[error("the public URL {0} cannot be a WebAuthn origin")]
    BadUrl(String),
}

/// The relying party for `public_url`: its id is the URL's host, and the only origin accepted
/// is the URL's own (scheme, host and port), which is what browsers put in a ceremony's
/// client data.
pub fn relying_party(public_url: &str) -> Result<Webauthn, Unavailable> {
    let url = Url::parse(public_url).map_err(|_| Unavailable::BadUrl(public_url.into()))?;
    let host = url
        .host_str()
        .ok_or_else(|| Unavailable::BadUrl(public_url.into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.parse::<IpAddr>().is_ok() {
        return Err(Unavailable::AddressNotName(public_url.into()));
    }
    WebauthnBuilder::new(&host, &url)
        .and_then(|b| b.rp_name("Sensei").build())
        .map_err(|_| Unavailable::BadUrl(public_url.into()))
}

/// A key's name as given, trimmed; `None` when empty, too long or holding control characters.
pub fn key_name(text: &str) -> Option<String> {
    let name = text.trim();
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && !name.chars().any(char::is_control);
    ok.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relying_party_is_the_public_urls_host() {
        assert!(relying_party("https://deploy.example.com:8443").is_ok());
        assert!(relying_party("https://localhost:4443").is_ok());
        assert!(matches!(
            relying_party("https://127.0.0.1:8443"),
            Err(Unavailable::AddressNotName(_))
        ));
        assert!(matches!(
            relying_party("https://[::1]:8443"),
            Err(Unavailable::AddressNotName(_))
        ));
        assert!(relying_party("not a url").is_err());
    }

    #[test]
    fn key_names_are_bounded() {
        assert_eq!(key_name("  YubiKey 5C "), Some("YubiKey 5C".into()));
        assert_eq!(key_name(""), None);
        assert_eq!(key_name("   "), None);
        assert_eq!(key_name(&"k".repeat(65)), None);
        assert_eq!(key_name("a\nb"), None);
        assert!(key_name(&"é".repeat(64)).is_some());
    }
}
