//! Health, metrics and the OpenAPI document.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the database cannot be reached.
    pub status: String,
    pub version: String,
    /// SHA-256 of the running executable, to compare with the packaged binary.
    pub binary_sha256: String,
    /// `ok` or `unreachable`.
    pub database: String,
}

/// How long a health probe may wait for the database before it says "unreachable".
const PROBE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// What is running, and whether it can reach its database.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, body = Health), (status = 503, body = Health, description = "database unreachable")))]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let db_ok = crate::store::db::probe(&state.pool, PROBE_DEADLINE).await
        == crate::store::db::Probe::Answered;
    let status = if db_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if db_ok { "ok" } else { "degraded" }.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            binary_sha256: state.binary_sha256.clone(),
            database: if db_ok { "ok" } else { "unreachable" }.into(),
        }),
    )
}

#[derive(Serialize, ToSchema)]
pub struct Liveness {
    /// Always `alive`: the process answers HTTP.
    pub status: String,
}

/// The process is alive (no database check: a load balancer or supervisor restarts on this
/// failing, and a database outage is not cured by restarting the control plane).
#[utoipa::path(get, path = "/livez", tag = "system", responses((status = 200, body = Liveness)))]
pub async fn livez() -> Json<Liveness> {
    Json(Liveness {
        status: "alive".into(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`, or `not_ready` when the database or its schema is not usable.
    pub status: String,
    /// `ok` or `unreachable`.
    pub database: String,
    /// `current`, `behind` (the database lacks migrations this binary needs), `ahead` (a
    /// newer binary migrated it) or `unknown` (the database did not answer).
    pub migrations: String,
    /// The newest migration this binary carries.
    pub migrations_expected: i32,
    /// The newest migration applied to the database, when it answered.
    pub migrations_applied: Option<i32>,
}

/// Ready for traffic: the database answers and its schema is exactly the one this binary
/// was built for.
#[utoipa::path(get, path = "/readyz", tag = "system",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness, description = "database unreachable or schema not current")))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let expected = crate::store::db::latest_migration();
    let reachable = crate::store::db::probe(&state.pool, PROBE_DEADLINE).await
        == crate::store::db::Probe::Answered;
    let applied = if reachable {
        tokio::time::timeout(
            PROBE_DEADLINE,
            crate::store::db::applied_migration(&state.pool),
        )
        .await
        .ok()
        .and_then(Result::ok)
    } else {
        None
    };
    let migrations = match applied {
        None => "unknown",
        Some(v) if v == expected => "current",
        Some(v) if v < expected => "behind",
        Some(_) => "ahead",
    };
    let ready = migrations == "current";
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" }.into(),
            database: if applied.is_some() {
                "ok"
            } else {
                "unreachable"
            }
            .into(),
            migrations: migrations.into(),
            migrations_expected: expected,
            migrations_applied: applied,
        }),
    )
}

/// Prometheus metrics. When the control plane has `--metrics-token`, only with
/// `Authorization: Bearer <token>`; with `--metrics-addr`, only on that listener.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, content_type = "text/plain", description = "Prometheus text format"),
              (status = 401, body = crate::api::error::ErrorBody, description = "bearer token required"),
              (status = 404, body = crate::api::error::ErrorBody, description = "served on the metrics listener instead")))]
pub async fn metrics(State(state): State<AppState>, headers: http::HeaderMap) -> Response {
    if !state.metrics_on_api {
        return crate::api::error::ApiError::new(
            StatusCode::NOT_FOUND,
            crate::api::error::ErrorCode::NoSuchRoute,
            "metrics are served on the control plane's metrics listener",
        )
        .into_response();
    }
    metrics_endpoint(State(state), headers).await
}

/// `/metrics` itself, on whichever listener serves it.
pub async fn metrics_endpoint(State(state): State<AppState>, headers: http::HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time: the comparison must not tell how much of a guess was right.
        let ok: bool =
            subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), expected.as_bytes()).into();
        if !ok {
            return crate::api::error::ApiError::unauthenticated(
                "metrics need Authorization: Bearer <the control plane's --metrics-token>",
            )
            .into_response();
        }
    }
    let fleet = fleet_figures(&state).await;
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.pool.status(), &fleet),
    )
        .into_response()
}

/// Gathers the fleet figures for one scrape; the database's share within a deadline, so that
/// a slow database makes the scrape say so (`sensei_metrics_database_up 0`), not hang.
async fn fleet_figures(state: &AppState) -> crate::app::metrics::FleetFigures {
    use crate::app::metrics::{DatabaseFigures, FleetFigures, ProcessFigures};
    let database = async {
        let client = state.pool.get().await.ok()?;
        let expiring = client
            .query_one(
                "SELECT count(*) AS n, \
                        count(*) FILTER (WHERE not_after < now() + interval '7 days') AS soon \
                 FROM agent_certificates \
                 WHERE revoked_at IS NULL AND retired_at IS NULL AND not_after > now() \
                 AND not_after < now() + interval '30 days'",
                &[],
            )
            .await
            .ok()?;
        let by = |sql: &'static str| {
            let client = &client;
            async move {
                client.query(sql, &[]).await.ok().map(|rows| {
                    rows.iter()
                        .map(|r| (r.get::<_, String>("k"), r.get::<_, i64>("n")))
                        .collect()
                })
            }
        };
        let deployments = crate::jobs::history::count_by_status(&client)
            .await
            .ok()?
            .into_iter()
            .map(|(status, n)| (status.as_str().to_owned(), n))
            .collect();
        let rollouts = by("SELECT state AS k, count(*) AS n FROM rollouts \
                           WHERE finished_at IS NULL GROUP BY state")
        .await?;
        let audit_sinks = crate::audit::sinks::figures(&**client).await.ok()?;
        Some(DatabaseFigures {
            certificates_expiring_30d: expiring.get("n"),
            certificates_expiring_7d: expiring.get("soon"),
            deployments,
            rollouts,
            audit_sinks,
        })
    };
    let database = tokio::time::timeout(PROBE_DEADLINE, database)
        .await
        .ok()
        .flatten();
    FleetFigures {
        version: env!("CARGO_PKG_VERSION").into(),
        binary_sha256: state.binary_sha256.clone(),
        connected_agents: state.agents.connected_count(),
        agent_handshakes_deferred: state.agents.handshakes_deferred(),
        agent_handshakes_retried: state.agents.handshakes_retried(),
        agent_reconnect_rate: state.agents.reconnect_rate(),
        ssh_jobs_in_flight: crate::runners::ssh::DEFAULT_CONCURRENCY
            .saturating_sub(state.ssh_permits.available_permits()),
        hash_queue: state.hashing.waiting(),
        hashes_running: state.hashing.running(),
        hashes_total: state.hashing.completed(),
        audit_sink_deliveries: state.sink_counters.snapshot(),
        database,
        process: ProcessFigures::read(),
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, content_type = "application/json", description = "OpenAPI 3.1 document")))]
pub async fn openapi_json() -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        super::openapi_document(),
    )
        .into_response()
}

/// Route middleware recording request counts and latencies.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    tracing::Span::current().record("route", tracing::field::display(&route));
    let start = Instant::now();
    let response = next.run(req).await;
    state
        .metrics
        .observe(&method, &route, response.status().as_u16(), start.elapsed());
    response
}
