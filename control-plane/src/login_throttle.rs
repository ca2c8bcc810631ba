//! Throttling of failed logins, per client address and per account, kept in PostgreSQL so
//! that every replica counts the same attempts.

use std::net::IpAddr;

use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::api::error::ApiError;

/// The window failures are counted over.
pub const WINDOW_SECS: i64 = 15 * 60;
/// Failures from one address within the window before its attempts are refused.
pub const MAX_PER_IP: i64 = 20;
/// Failures against one account within the window before its logins are refused.
pub const MAX_PER_ACCOUNT: i64 = 10;

async fn check(
    client: &impl GenericClient,
    column: &str,
    value: &(dyn tokio_postgres::types::ToSql + Sync),
    max: i64,
    what: &str,
) -> Result<(), ApiError> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM min(at) + make_interval(secs => $2) - now()), 0)::bigint \
                 FROM login_failures WHERE {column} = $1 AND at > now() - make_interval(secs => $2)"
            ),
            &[value, &(WINDOW_SECS as f64)],
        )
        .await?;
    let count: i64 = row.get(0);
    if count >= max {
        let wait: i64 = row.get(1);
        return Err(ApiError::too_many(
            format!("too many failed sign-in attempts {what}; try again later"),
            wait.max(1) as u64,
        ));
    }
    Ok(())
}

/// Refuses when the client address has failed too often.
pub async fn check_ip(client: &impl GenericClient, ip: IpAddr) -> Result<(), ApiError> {
    check(
        client,
        "ip",
        &ip.to_string(),
        MAX_PER_IP,
        "from this address",
    )
    .await
}

/// Refuses when the account has seen too many failures.
pub async fn check_account(client: &impl GenericClient, account: Uuid) -> Result<(), ApiError> {
    check(
        client,
        "account_id",
        &account,
        MAX_PER_ACCOUNT,
        "for this account",
    )
    .await
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
            &[&ip.to_string(), &account, &email_hash],
        )
        .await?;
    Ok(())
}
