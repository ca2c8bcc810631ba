//! Throttling of failed logins, per client address and per account, kept in PostgreSQL so
//! that every replica counts the same attempts.
//!
//! An attempt **reserves** its place before the password is checked: under an advisory lock
//! per address and per account, the window's count (failures and attempts still in flight) is
//! checked and the attempt inserted in one transaction. A burst of parallel guesses therefore
//! gets at most the limit through, not the whole burst. A successful sign-in releases its
//! reservation; a failed one keeps it as the failure. IPv6 clients are counted by their /64,
//! which one host can fill with addresses.

use std::net::IpAddr;

use tokio_postgres::GenericClient;
use uuid::Uuid;

/// The window failures are counted over.
pub const WINDOW_SECS: i64 = 15 * 60;
/// Failures from one address within the window before its attempts are refused.
pub const MAX_PER_IP: i64 = 20;
/// Failures against one account within the window before its logins are refused.
pub const MAX_PER_ACCOUNT: i64 = 10;

/// The key an address is counted under: an IPv4 address itself, an IPv6 address's /64.
pub fn throttle_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
            format!("{net}/64")
        }
    }
}

/// What a throttle counts failures of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// The client's address (its /64 for IPv6).
    Address,
    /// The account signed in to.
    Account,
}

/// Why a sign-in attempt was not let through.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// Too many failures within the window; the next attempt may come in `retry_after_secs`.
    #[error("too many failed sign-in attempts {}; try again later", match .subject {
        Subject::Address => "from this address",
        Subject::Account => "for this account",
    })]
    Throttled {
        subject: Subject,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// A reserved attempt: released on success, kept as the failure otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation(i64);

/// Reserves a sign-in attempt from `ip` against `account`, or refuses it (429) when the
/// address or the account is at its limit.
pub async fn reserve(
    client: &mut tokio_postgres::Client,
    ip: IpAddr,
    account: Option<Uuid>,
    email_hash: &str,
) -> Result<Reservation, ThrottleError> {
    let key = throttle_key(ip);
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('sensei-login-ip:' || $1, 0))",
        &[&key],
    )
    .await?;
    if let Some(account) = account {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('sensei-login-account:' || $1, 0))",
            &[&account.to_string()],
        )
        .await?;
    }
    check(&tx, Subject::Address, &key).await?;
    if let Some(account) = &account {
        check(&tx, Subject::Account, account).await?;
    }
    let id: i64 = tx
        .query_one(
            "INSERT INTO login_failures (ip, account_id, email_hash) VALUES ($1, $2, $3) RETURNING id",
            &[&key, &account, &email_hash],
        )
        .await?
        .try_get("id")?;
    tx.commit().await?;
    Ok(Reservation(id))
}

/// The attempt succeeded: it does not count as a failure.
pub async fn release(
    client: &impl GenericClient,
    reservation: Reservation,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM login_failures WHERE id = $1",
            &[&reservation.0],
        )
        .await?;
    Ok(())
}

/// Forgets failures older than the window; the maintenance job calls it.
pub async fn prune(client: &impl GenericClient) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM login_failures WHERE at < now() - make_interval(secs => $1)",
            &[&(WINDOW_SECS as f64)],
        )
        .await
}

async fn check(
    client: &impl GenericClient,
    subject: Subject,
    value: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<(), ThrottleError> {
    let (column, max) = match subject {
        Subject::Address => ("ip", MAX_PER_IP),
        Subject::Account => ("account_id", MAX_PER_ACCOUNT),
    };
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) AS n, COALESCE(EXTRACT(EPOCH FROM min(at) + make_interval(secs => $2) - now()), 0)::bigint AS wait \
                 FROM login_failures WHERE {column} = $1 AND at > now() - make_interval(secs => $2)"
            ),
            &[value, &(WINDOW_SECS as f64)],
        )
        .await?;
    let count: i64 = row.try_get("n")?;
    if count >= max {
        let wait: i64 = row.try_get("wait")?;
        return Err(ThrottleError::Throttled {
            subject,
            retry_after_secs: u64::try_from(wait.max(1)).unwrap_or(1),
        });
    }
    Ok(())
}

/// Refuses when the client address has failed too often.
pub async fn check_ip(client: &impl GenericClient, ip: IpAddr) -> Result<(), ThrottleError> {
    check(client, Subject::Address, &throttle_key(ip)).await
}

/// Refuses when the account has seen too many failures.
pub async fn check_account(
    client: &impl GenericClient,
    account: Uuid,
) -> Result<(), ThrottleError> {
    check(client, Subject::Account, &account).await
}

/// Counts one failure.
pub async fn record(
    client: &impl GenericClient,
    ip: IpAddr,
    account: Option<Uuid>,
    email_hash: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO login_failures (ip, account_id, email_hash) VALUES ($1, $2, $3)",
            &[&throttle_key(ip), &account, &email_hash],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(throttle_key(a), throttle_key(b));
        assert_eq!(throttle_key(a), "2001:db8:1:2::/64");
        assert_ne!(throttle_key(a), throttle_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(throttle_key(mapped), "192.0.2.7");
    }

    #[test]
    fn a_throttled_attempt_says_what_was_counted() {
        let e = ThrottleError::Throttled {
            subject: Subject::Account,
            retry_after_secs: 3,
        };
        assert_eq!(
            e.to_string(),
            "too many failed sign-in attempts for this account; try again later"
        );
    }
}
