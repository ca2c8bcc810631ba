//! Password hashing: Argon2id for everything we write; Django's `pbkdf2_sha256` still verifies
//! (accounts imported from the older platform) and is replaced at the next successful login.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Shortest password accepted for a new account.
pub const MIN_LEN: usize = 10;
/// Longest password accepted: bounds the hashing work an attacker can ask for.
pub const MAX_LEN: usize = 1024;
/// Django hashes with more iterations than this are refused rather than computed.
const MAX_PBKDF2_ITERATIONS: u32 = 5_000_000;

/// The outcome of checking a password.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Correct; `rehash` says the stored hash should be replaced with Argon2id.
    Match {
        rehash: bool,
    },
    Mismatch,
}

/// A new password that does not meet the policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("password must be between {MIN_LEN} and {MAX_LEN} characters")]
pub struct WeakPassword;

pub fn check_policy(password: &str) -> Result<(), WeakPassword> {
    let n = password.chars().count();
    if (MIN_LEN..=MAX_LEN).contains(&n) {
        Ok(())
    } else {
        Err(WeakPassword)
    }
}

/// Hashes with Argon2id (the crate's default parameters: 19 MiB, 2 passes).
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        // Only fails for parameters or salts outside Argon2's limits, and both are fixed here.
        .expect("argon2 hashing with default parameters")
}

/// Verifies `password` against a stored Argon2 or Django PBKDF2 hash. An unreadable stored
/// hash never matches.
pub fn verify(password: &str, stored: &str) -> Verdict {
    if password.len() > MAX_LEN * 4 {
        return Verdict::Mismatch;
    }
    if let Some(django) = stored.strip_prefix("pbkdf2_sha256$") {
        return if verify_django(password, django) {
            Verdict::Match { rehash: true }
        } else {
            Verdict::Mismatch
        };
    }
    let Ok(parsed) = PasswordHash::new(stored) else {
        return Verdict::Mismatch;
    };
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Verdict::Match {
            rehash: parsed.algorithm != argon2::Algorithm::Argon2id.ident(),
        },
        Err(_) => Verdict::Mismatch,
    }
}

/// Spends the same time as a real verification, for logins naming no known user, so that
/// response time does not tell which emails have accounts.
pub fn verify_dummy(password: &str) {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let stored = DUMMY.get_or_init(|| hash("sensei-dummy-password"));
    let _ = verify(password, stored);
}

/// Memory one Argon2id hash or verification takes with the parameters above.
pub const HASH_MEMORY_BYTES: u64 = 19 * 1024 * 1024;

/// Runs password hashing off the async threads, at most `max` at a time. Each Argon2id run
/// holds 19 MiB and a core for tens of milliseconds, so without a cap a burst of logins
/// takes the machine's memory and every thread of the blocking pool; with it, the burst
/// waits its turn here (the queue is measured: `sensei_password_hash_queue`).
pub struct HashGate {
    permits: tokio::sync::Semaphore,
    max: usize,
    waiting: std::sync::atomic::AtomicUsize,
    done: std::sync::atomic::AtomicU64,
}

impl HashGate {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: tokio::sync::Semaphore::new(max),
            max,
            waiting: std::sync::atomic::AtomicUsize::new(0),
            done: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many hashes may run at once when the operator does not say: one per core, fewer
    /// when a quarter of the available memory would not hold them.
    pub fn default_concurrency() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| kib * 1024);
        let by_memory = available.map_or(cores, |bytes| {
            usize::try_from(bytes / 4 / HASH_MEMORY_BYTES).unwrap_or(usize::MAX)
        });
        cores.min(by_memory).max(1)
    }

    /// Runs `work` (a hash or a verification) when a slot is free.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashTaskFailed> {
        use std::sync::atomic::Ordering;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = self.permits.acquire().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let _permit = permit.map_err(|_| HashTaskFailed)?;
        let result = tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| HashTaskFailed);
        self.done.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hashes running now.
    pub fn running(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Hashes and verifications run since start.
    pub fn completed(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// A hashing task panicked or the gate was closed.
#[derive(Debug, thiserror::Error)]
#[error("password hashing task failed")]
pub struct HashTaskFailed;

/// `<iterations>$<salt>$<base64 sha256 digest>`
fn verify_django(password: &str, rest: &str) -> bool {
    let mut parts = rest.splitn(3, '$');
    let (Some(iterations), Some(salt), Some(expected)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Ok(iterations) = iterations.parse::<u32>() else {
        return false;
    };
    if iterations == 0 || iterations > MAX_PBKDF2_ITERATIONS {
        return false;
    }
    let Ok(expected) = base64::engine::general_purpose::STANDARD.decode(expected) else {
        return false;
    };
    let mut derived = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(
        password.as_bytes(),
        salt.as_bytes(),
        iterations,
        &mut derived,
    );
    derived.as_slice().ct_eq(expected.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let stored = hash("correct horse battery");
        assert!(stored.starts_with("$argon2id$"));
        assert_eq!(
            verify("correct horse battery", &stored),
            Verdict::Match { rehash: false }
        );
        assert_eq!(verify("wrong horse battery", &stored), Verdict::Mismatch);
    }

    #[test]
    fn django_hash_verifies_and_asks_for_rehash() {
        // Django's format, computed with Python's hashlib.pbkdf2_hmac("sha256",
        // b"django-imported-pw", b"saltsaltsalt", 600000) and base64: what Django 4.2 stores.
        let stored = include_str!("../../tests-data/django_pbkdf2.txt").trim();
        assert_eq!(
            verify("django-imported-pw", stored),
            Verdict::Match { rehash: true }
        );
        assert_eq!(verify("django-imported-px", stored), Verdict::Mismatch);
    }

    #[test]
    fn malformed_stored_hashes_never_match() {
        for stored in [
            "",
            "pbkdf2_sha256$",
            "pbkdf2_sha256$abc$salt$AAAA",
            "pbkdf2_sha256$0$salt$AAAA",
            "pbkdf2_sha256$999999999$salt$AAAA",
            "$argon2id$garbage",
            "plaintext-password",
        ] {
            assert_eq!(
                verify("plaintext-password", stored),
                Verdict::Mismatch,
                "{stored}"
            );
        }
    }

    #[test]
    fn policy_bounds() {
        assert_eq!(check_policy("short"), Err(WeakPassword));
        assert_eq!(check_policy(&"x".repeat(MAX_LEN + 1)), Err(WeakPassword));
        assert_eq!(check_policy("long enough pw"), Ok(()));
    }
}
