//! Attempts counted per client address or per server over a sliding window, in PostgreSQL so
//! that every replica counts the same ones: signups per address, enrollments per address and
//! per server. Sign-in failures have their own, older table (`login_throttle`).
//!
//! An attempt is **reserved** before the work it gates (hashing a password, signing a
//! certificate): under an advisory lock on the limit and key, the window is counted and the
//! attempt inserted in one transaction, so a parallel burst gets at most the limit through.
//! An attempt that should not count (a successful enrollment) is released afterwards.

use std::net::IpAddr;

use tokio_postgres::GenericClient;

/// A limit: at most `max` attempts of `kind` per key within `window_secs`.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub kind: &'static str,
    pub max: i64,
    pub window_secs: i64,
}

/// Account creations one address may attempt per hour.
pub const SIGNUP_PER_ADDRESS: Limit = Limit {
    kind: "signup-ip",
    max: 10,
    window_secs: 3600,
};

/// Failed enrollments from one address before its enrollments are refused for a while.
pub const ENROLL_PER_ADDRESS: Limit = Limit {
    kind: "enroll-ip",
    max: 20,
    window_secs: 15 * 60,
};

/// Failed enrollments against one server (a leaked, spent or expired token replayed).
pub const ENROLL_PER_SERVER: Limit = Limit {
    kind: "enroll-server",
    max: 10,
    window_secs: 15 * 60,
};

/// A throttled key's refusal is audited once per window, not once per attempt.
pub const ENROLL_THROTTLED_AUDIT: Limit = Limit {
    kind: "enroll-throttled-audit",
    max: 1,
    window_secs: 15 * 60,
};

/// Single sign-on starts one address may make in a window: each stores a started sign-in.
pub const SSO_START_PER_ADDRESS: Limit = Limit {
    kind: "sso-start-ip",
    max: 60,
    window_secs: 15 * 60,
};

/// The longest window of any limit: older attempts are pruned.
const LONGEST_WINDOW_SECS: i64 = 3600;

/// The key an address is counted under: an IPv4 address itself, an IPv6 address's /64.
pub fn address_key(ip: IpAddr) -> String {
    crate::identity::login_throttle::throttle_key(ip)
}

/// A counted attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation(i64);

/// The key is at its limit: try again in this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub retry_after_secs: u64,
}

/// Reserves one attempt of `limit` for `key`, or refuses it when the window is full.
pub async fn reserve(
    client: &mut tokio_postgres::Client,
    limit: Limit,
    key: &str,
) -> Result<Result<Reservation, Refused>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('sensei-admission:' || $1 || ':' || $2, 0))",
        &[&limit.kind, &key],
    )
    .await?;
    if let Some(refused) = refused(&tx, limit, key).await? {
        return Ok(Err(refused));
    }
    let id: i64 = tx
        .query_one(
            "INSERT INTO admission_attempts (kind, key) VALUES ($1, $2) RETURNING id",
            &[&limit.kind, &key],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok(Ok(Reservation(id)))
}

/// Whether `key` is at its limit now (without counting an attempt).
pub async fn refused(
    client: &impl GenericClient,
    limit: Limit,
    key: &str,
) -> Result<Option<Refused>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM min(at) + make_interval(secs => $3) - now()), 0)::bigint \
             FROM admission_attempts WHERE kind = $1 AND key = $2 AND at > now() - make_interval(secs => $3)",
            &[&limit.kind, &key, &(limit.window_secs as f64)],
        )
        .await?;
    let (count, wait): (i64, i64) = (row.get(0), row.get(1));
    Ok((count >= limit.max).then_some(Refused {
        retry_after_secs: wait.max(1) as u64,
    }))
}

/// Takes back an attempt that should not count.
pub async fn release(
    client: &impl GenericClient,
    reservation: Reservation,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM admission_attempts WHERE id = $1",
            &[&reservation.0],
        )
        .await?;
    Ok(())
}

/// Forgets attempts older than every window; the maintenance job calls it.
pub async fn prune(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM admission_attempts WHERE at < now() - make_interval(secs => $1)",
            &[&(LONGEST_WINDOW_SECS as f64)],
        )
        .await
}
