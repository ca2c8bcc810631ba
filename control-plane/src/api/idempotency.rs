//! `Idempotency-Key` on the requests that queue work (`POST /v1/deployments`,
//! `POST /v1/rollouts`, rollbacks): a client that retries after a timeout is answered with
//! what its first request created (the same status, and that deployment or rollout as it is
//! now) and nothing new is queued. Only the created object's id is kept, never a copy of the
//! answer, so a rollout of many thousand servers costs one row.
//!
//! The key is claimed with an insert in the request's own transaction: a concurrent retry
//! waits on that row until the first request commits (then it replays the answer) or rolls
//! back (then it does the work itself). A key is tied to the request it first came with; the
//! same key with another request is refused rather than silently answered with the wrong
//! thing. Keys are kept [`KEPT_FOR`] and then pruned.

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::{ApiError, ErrorCode};

/// The header clients send.
pub const HEADER: &str = "idempotency-key";
/// Set on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// How long a key is remembered.
pub const KEPT_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Longest key accepted.
const MAX_KEY_LEN: usize = 255;

/// The request's `Idempotency-Key`, when it sent one.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(HEADER) else {
            return Ok(Self(None));
        };
        let key = value
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .filter(|k| k.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| {
                ApiError::unprocessable(
                    ErrorCode::InvalidIdempotencyKey,
                    format!(
                        "Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters \
                         without spaces (a UUID is a good choice)"
                    ),
                )
            })?;
        Ok(Self(Some(key.to_owned())))
    }
}

/// What to do with a request that carries a key.
pub enum Claim {
    /// First time: do the work, then [`IdempotencyKey::record`] what it created.
    Fresh,
    /// Seen before: answer with `status` and the object the first request created.
    Replay { status: StatusCode, resource: Uuid },
}

/// Marks an answer as a replay of an earlier request's.
pub fn replayed(answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, http::HeaderValue::from_static("true"));
    response
}

impl IdempotencyKey {
    /// Claims the key for `route` and this `request` (any value that identifies it), inside
    /// the transaction that will do the work.
    pub async fn claim(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        account: Uuid,
        route: &str,
        request: &serde_json::Value,
    ) -> Result<Claim, ApiError> {
        let Some(key) = &self.0 else {
            return Ok(Claim::Fresh);
        };
        let hash = Sha256::digest(request.to_string().as_bytes()).to_vec();
        // A key past its time is forgotten first, so that it can be used afresh.
        tx.execute(
            "DELETE FROM idempotency_keys WHERE account_id = $1 AND route = $2 AND key = $3 \
             AND created_at < now() - make_interval(secs => $4)",
            &[&account, &route, key, &KEPT_FOR.as_secs_f64()],
        )
        .await?;
        let inserted = tx
            .execute(
                "INSERT INTO idempotency_keys (account_id, route, key, request_hash) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&account, &route, key, &hash],
            )
            .await?;
        if inserted == 1 {
            return Ok(Claim::Fresh);
        }
        let row = tx
            .query_one(
                "SELECT request_hash, status, resource_id FROM idempotency_keys \
                 WHERE account_id = $1 AND route = $2 AND key = $3",
                &[&account, &route, key],
            )
            .await?;
        let stored: Vec<u8> = row.get("request_hash");
        if stored != hash {
            return Err(ApiError::unprocessable(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request; use a new key for a new \
                 request",
            ));
        }
        let status: Option<i16> = row.get("status");
        let resource: Option<Uuid> = row.get("resource_id");
        let status = status
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok());
        match (status, resource) {
            (Some(status), Some(resource)) => Ok(Claim::Replay { status, resource }),
            // Written in the same transaction as the answer, so this cannot be seen.
            _ => Err(ApiError::internal(
                "idempotency key without a recorded answer",
            )),
        }
    }

    /// Stores what the work created, in the same transaction as the work.
    pub async fn record(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        account: Uuid,
        route: &str,
        status: StatusCode,
        resource: Uuid,
    ) -> Result<(), ApiError> {
        let Some(key) = &self.0 else {
            return Ok(());
        };
        let status = i16::try_from(status.as_u16()).unwrap_or(200);
        tx.execute(
            "UPDATE idempotency_keys SET status = $4, resource_id = $5 \
             WHERE account_id = $1 AND route = $2 AND key = $3",
            &[&account, &route, key, &status, &resource],
        )
        .await?;
        Ok(())
    }
}

/// Forgets keys older than [`KEPT_FOR`]; the maintenance job calls it.
pub async fn prune(client: &tokio_postgres::Client) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
            &[&KEPT_FOR.as_secs_f64()],
        )
        .await
}
