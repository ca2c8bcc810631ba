//! The HTTPS API: routes, access control, errors.
//!
//! The router is built from the handlers' OpenAPI annotations (utoipa-axum), so the document
//! served at `/openapi.json` lists exactly the routes that exist.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::Router;
use deadpool_postgres::Pool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use crate::app::metrics::Metrics;
use crate::runners::agent::AgentHub;
use crate::secrets::field_crypto::FieldKeys;

pub mod access;
pub mod account;
pub mod api_keys;
pub mod audit_routes;
pub mod audit_sinks;
pub mod auth_routes;
pub mod cross_site;
pub mod deployments;
pub mod dns;
pub mod edge;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod live;
pub mod members;
pub mod mfa;
pub mod page;
pub mod password_reset;
pub mod projects;
pub mod roles;
pub mod rollouts;
pub mod servers;
pub mod sso;
pub mod system;
pub mod webauthn;

/// The audit event for an action a signed-in caller took on `target` (type and id).
pub fn actor_event(
    principal: &crate::identity::auth::Principal,
    meta: &extract::ClientMeta,
    action: &'static str,
    target: (&'static str, uuid::Uuid),
    metadata: serde_json::Value,
) -> crate::audit::AuditEvent {
    crate::audit::AuditEvent {
        account_id: Some(principal.account_id),
        actor: principal.actor(),
        client_ip: Some(meta.ip.to_string()),
        user_agent: Some(meta.user_agent.clone()),
        action,
        target: Some(target),
        outcome: crate::audit::Outcome::Success,
        metadata,
    }
}

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<StateInner>);

pub struct StateInner {
    pub pool: Pool,
    pub keys: Arc<FieldKeys>,
    pub metrics: Metrics,
    pub binary_sha256: String,
    pub agents: Arc<AgentHub>,
    /// The agents' CAs; the presented one's `SHA256:…` is shown with servers so that
    /// operators can pin it (it follows a CA rotation).
    pub ca_authority: Arc<crate::runners::agent::authority::Authority>,
    /// The job-signing keys (current, and previous during a rotation).
    pub job_keys: Arc<crate::secrets::job_signing::JobKeys>,
    /// Where agents connect, as given to them.
    pub agent_endpoint: String,
    /// How long a queued deployment waits for its agent.
    pub dispatch_timeout: std::time::Duration,
    /// Password-reset and invitation emails.
    pub mailer: Arc<crate::identity::mailer::Mailer>,
    /// The API's address as users reach it (`https://…`, no trailing slash), for links in
    /// emails.
    pub public_url: String,
    /// The public URL's origin: what a browser's `Origin` must say on a cookie request.
    pub public_origin: cross_site::WebOrigin,
    /// Who may create an account (`--signup`).
    pub signup: crate::identity::signup::SignupPolicy,
    /// Open live-follow streams and the changes they wait for.
    pub live: Arc<live::LiveStreams>,
    /// Load balancers whose forwarding headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Password hashing, a bounded number at a time.
    pub hashing: Arc<crate::identity::passwords::HashGate>,
    /// The SSH runner's slots on this replica (for the in-flight gauge).
    pub ssh_permits: Arc<tokio::sync::Semaphore>,
    /// Bearer token `/metrics` requires, when set.
    pub metrics_token: Option<String>,
    /// Whether the API listener serves `/metrics` (not when it has a listener of its own).
    pub metrics_on_api: bool,
    /// Where the control plane may connect on a tenant's behalf (SSH servers, DNS servers,
    /// audit sinks), checked when configured and again at every connection.
    pub outbound: crate::egress::TargetPolicy,
    /// What this replica's audit-sink deliveries did, for `/metrics`.
    pub sink_counters: Arc<crate::audit::sinks::delivery::DeliveryCounters>,
    /// OpenID providers' discovery documents and keys, cached for every account's SSO.
    pub oidc_providers: crate::identity::oidc::SharedProviders,
}

impl AppState {
    pub fn new(inner: StateInner) -> Self {
        Self(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = StateInner;
    fn deref(&self) -> &StateInner {
        &self.0
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Sensei control plane", description = "Deploy onto your own servers. Errors are `{\"error\": {\"code\", \"message\"}}`."),
    tags(
        (name = "system", description = "health, metrics, this document"),
        (name = "auth", description = "accounts, sign-in and sessions"),
        (name = "api-keys", description = "API keys for automation"),
        (name = "members", description = "members, roles and invitations"),
        (name = "account", description = "account settings, ownership, deletion"),
        (name = "audit", description = "the audit log"),
        (name = "servers", description = "deploy targets and their agents"),
        (name = "projects", description = "what to deploy and how"),
        (name = "deployments", description = "deploys, their logs, rollbacks"),
        (name = "rollouts", description = "fleet-wide rollouts in batches"),
    )
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::healthz))
        .routes(routes!(system::livez))
        .routes(routes!(system::readyz))
        .routes(routes!(system::metrics))
        .routes(routes!(system::openapi_json))
        .routes(routes!(auth_routes::signup))
        .routes(routes!(auth_routes::login))
        .routes(routes!(auth_routes::logout))
        .routes(routes!(auth_routes::list_sessions))
        .routes(routes!(auth_routes::revoke_session))
        .routes(routes!(auth_routes::sign_out_everywhere))
        .routes(routes!(auth_routes::me))
        .routes(routes!(mfa::enroll))
        .routes(routes!(mfa::confirm))
        .routes(routes!(mfa::disable))
        .routes(routes!(auth_routes::login_webauthn))
        .routes(routes!(webauthn::start_registration))
        .routes(routes!(webauthn::register, webauthn::list))
        .routes(routes!(webauthn::rename, webauthn::remove))
        .routes(routes!(password_reset::request))
        .routes(routes!(password_reset::confirm))
        .routes(routes!(members::list))
        .routes(routes!(members::change_role, members::remove))
        .routes(routes!(members::invite, members::list_invitations))
        .routes(routes!(members::revoke_invitation))
        .routes(routes!(members::accept))
        .routes(routes!(roles::list, roles::create))
        .routes(routes!(roles::update, roles::delete))
        .routes(routes!(account::show, account::update, account::delete))
        .routes(routes!(account::transfer_ownership))
        .routes(routes!(sso::show, sso::set, sso::remove))
        .routes(routes!(api_keys::create, api_keys::list))
        .routes(routes!(api_keys::revoke))
        .routes(routes!(audit_routes::list))
        .routes(routes!(audit_routes::export))
        .routes(routes!(audit_sinks::create, audit_sinks::list))
        .routes(routes!(audit_sinks::delete))
        .routes(routes!(servers::create, servers::list))
        .routes(routes!(servers::show, servers::delete))
        .routes(routes!(servers::events))
        .routes(routes!(servers::revoke_certificate))
        .routes(routes!(servers::new_enrollment_token))
        .routes(routes!(projects::create, projects::list))
        .routes(routes!(projects::show, projects::update, projects::delete))
        .routes(routes!(dns::show, dns::set, dns::remove))
        .routes(routes!(deployments::create, deployments::list))
        .routes(routes!(deployments::show))
        .routes(routes!(deployments::logs))
        .routes(routes!(deployments::rollback))
        .routes(routes!(rollouts::create, rollouts::list))
        .routes(routes!(rollouts::show))
        .routes(routes!(rollouts::targets))
        .routes(routes!(rollouts::events))
        .routes(routes!(rollouts::pause))
        .routes(routes!(rollouts::resume))
        .routes(routes!(rollouts::abort))
        .routes(routes!(rollouts::approve))
}

/// The OpenAPI document, rendered once.
pub fn openapi_document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let (_, doc) = routes().split_for_parts();
        doc.to_json().unwrap_or_else(|_| "{}".into())
    })
}

async fn not_found() -> error::ApiError {
    error::ApiError::new(
        http::StatusCode::NOT_FOUND,
        error::ErrorCode::NoSuchRoute,
        "no such route; see /openapi.json",
    )
}

/// The access log: one line per request, at its end, in the span `edge::request_span` opens
/// (method, route template, status, latency, request id, client, account; never the path's
/// values, the query, a header or a body).
pub fn access_log<S>(router: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(
        tower_http::trace::TraceLayer::new_for_http()
            .make_span_with(edge::request_span)
            .on_request(())
            .on_response(
                tower_http::trace::DefaultOnResponse::new()
                    .level(tracing::Level::INFO)
                    .latency_unit(tower_http::LatencyUnit::Millis),
            )
            .on_failure(()),
    )
}

/// The complete API router.
pub fn router(state: AppState) -> Router {
    let (router, _) = routes().split_for_parts();
    let router = router
        .route_layer(from_fn_with_state(state.clone(), access::authorize))
        .route_layer(from_fn_with_state(state.clone(), system::track))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    access_log(router)
        .layer(from_fn_with_state(state.clone(), edge::request_context))
        .with_state(state)
}

/// The router of the separate metrics listener (`--metrics-addr`): `/metrics` only.
pub fn metrics_router(state: AppState) -> Router {
    let router = Router::new()
        .route("/metrics", axum::routing::get(system::metrics_endpoint))
        .fallback(not_found);
    access_log(router)
        .layer(from_fn_with_state(state.clone(), edge::request_context))
        .with_state(state)
}
