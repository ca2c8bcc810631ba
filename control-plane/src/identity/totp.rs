//! Time-based one-time passwords (RFC 6238 over RFC 4226 HOTP, HMAC-SHA1, 6 digits, 30 s
//! steps: what common authenticator apps implement) and one-time recovery codes.
//!
//! Pure functions: the caller supplies the time, stores the secret encrypted and remembers the
//! last accepted step so that a code cannot be used twice.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use subtle::ConstantTimeEq;

/// Seconds per step.
pub const STEP_SECS: i64 = 30;
/// Steps either side of now that are accepted (clock drift between phone and server).
pub const DRIFT_STEPS: i64 = 1;
const DIGITS: u32 = 6;
/// 160-bit secrets, as RFC 4226 recommends.
pub const SECRET_LEN: usize = 20;
/// Recovery codes handed out at enrollment.
pub const RECOVERY_CODES: usize = 10;

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A new random secret.
pub fn generate_secret() -> [u8; SECRET_LEN] {
    let mut secret = [0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret
}

/// RFC 4648 base32 without padding, the form authenticator apps take.
pub fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The HOTP value for `counter`.
pub fn hotp(secret: &[u8], counter: u64) -> u32 {
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return 0;
    };
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = (digest[19] & 0x0f) as usize;
    let value = u32::from_be_bytes([
        digest[offset] & 0x7f,
        digest[offset + 1],
        digest[offset + 2],
        digest[offset + 3],
    ]);
    value % 10u32.pow(DIGITS)
}

/// The step a Unix time falls in.
pub fn step_at(unix_secs: i64) -> i64 {
    unix_secs.div_euclid(STEP_SECS)
}

/// Checks `code` against the steps around `unix_secs`, accepting only steps after
/// `last_step` (a code already used, or an older one, is refused). Returns the step matched,
/// which the caller stores as the new `last_step`.
pub fn verify(secret: &[u8], code: &str, unix_secs: i64, last_step: i64) -> Option<i64> {
    let code = code.trim();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_at(unix_secs);
    let mut matched = None;
    // Every candidate is computed and compared in constant time, so timing does not say
    // which window matched.
    for step in (now - DRIFT_STEPS)..=(now + DRIFT_STEPS) {
        if step <= last_step || step < 0 {
            continue;
        }
        let expected = format!("{:06}", hotp(secret, step as u64));
        if bool::from(expected.as_bytes().ct_eq(code.as_bytes())) && matched.is_none() {
            matched = Some(step);
        }
    }
    matched
}

/// The `otpauth://` URI an authenticator app imports (usually as a QR code).
pub fn otpauth_uri(secret: &[u8], issuer: &str, account: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        enc(issuer).replace('+', "%20"),
        enc(account).replace('+', "%20"),
        base32(secret),
        enc(issuer).replace('+', "%20"),
    )
}

/// A recovery code: 12 base32 characters (60 bits) in groups of four, e.g. `ABCD-EFGH-2345`.
pub fn generate_recovery_code() -> String {
    let mut raw = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let text = base32(&raw);
    format!("{}-{}-{}", &text[0..4], &text[4..8], &text[8..12])
}

/// The form a recovery code is hashed in: case, spaces and dashes do not matter.
pub fn normalise_recovery_code(code: &str) -> Option<String> {
    let cleaned: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (cleaned.len() == 12 && cleaned.bytes().all(|b| BASE32.contains(&b))).then_some(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn matches_the_rfc_4226_test_values() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, want) in expected.iter().enumerate() {
            assert_eq!(hotp(RFC_SECRET, counter as u64), *want, "counter {counter}");
        }
    }

    #[test]
    fn matches_the_rfc_6238_sha1_vectors_in_six_digits() {
        // RFC 6238 appendix B gives 8 digits; the last six are what a 6-digit app shows.
        for (time, eight) in [
            (59i64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_234_567_890, "89005924"),
            (20_000_000_000, "65353130"),
        ] {
            let code = format!("{:06}", hotp(RFC_SECRET, step_at(time) as u64));
            assert_eq!(code, eight[2..], "time {time}");
            assert_eq!(verify(RFC_SECRET, &code, time, 0), Some(step_at(time)));
        }
    }

    #[test]
    fn accepts_one_step_of_drift_and_no_more() {
        let t = 1_700_000_000;
        let code = format!("{:06}", hotp(RFC_SECRET, step_at(t) as u64));
        assert!(verify(RFC_SECRET, &code, t + STEP_SECS, 0).is_some());
        assert!(verify(RFC_SECRET, &code, t - STEP_SECS, 0).is_some());
        assert!(verify(RFC_SECRET, &code, t + 2 * STEP_SECS, 0).is_none());
    }

    #[test]
    fn a_used_code_is_refused() {
        let t = 1_700_000_000;
        let code = format!("{:06}", hotp(RFC_SECRET, step_at(t) as u64));
        let step = verify(RFC_SECRET, &code, t, 0).expect("first use");
        assert_eq!(verify(RFC_SECRET, &code, t, step), None);
        assert_eq!(verify(RFC_SECRET, &code, t + 10, step), None);
    }

    #[test]
    fn malformed_codes_are_refused() {
        for bad in ["", "12345", "1234567", "12a456", "１２３４５６"] {
            assert_eq!(verify(RFC_SECRET, bad, 59, 0), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_matches_rfc_4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"fooba"), "MZXW6YTB");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(RFC_SECRET), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    }

    #[test]
    fn uri_carries_issuer_account_and_secret() {
        let uri = otpauth_uri(RFC_SECRET, "Sensei", "ana@example.com");
        assert!(uri.starts_with("otpauth://totp/Sensei:ana%40example.com?secret=GEZDGNBV"));
        assert!(uri.contains("&issuer=Sensei&"));
    }

    #[test]
    fn recovery_codes_normalise() {
        let code = generate_recovery_code();
        assert_eq!(code.len(), 14);
        let lower = code.to_lowercase().replace('-', " ");
        assert_eq!(
            normalise_recovery_code(&lower),
            normalise_recovery_code(&code)
        );
        assert!(normalise_recovery_code("ABCD-EFGH-123").is_none());
    }
}
