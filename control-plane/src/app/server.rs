//! Starting and stopping a control plane: database (external or embedded), migrations, the
//! CA, and the HTTPS API. `serve`, `quickstart` and the tests all start it through here.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::Pool;
use sensei_certs::Fingerprint;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState, Metrics, StateInner};
use crate::runners::agent::gateway::{self, GatewayContext};
use crate::runners::agent::{cert_events, AgentHub};
use crate::secrets::field_crypto::FieldKeys;
use crate::secrets::pki;
use crate::store::db;
use crate::store::postgres_cluster::{ClusterError, ClusterOptions, PostgresCluster};

/// Where the database is.
#[derive(Debug, Clone)]
pub enum DatabaseSource {
    /// `DATABASE_URL`.
    Url(String),
    /// A private cluster in `<data-dir>/postgres`, started and stopped with the control plane.
    Embedded,
}

/// Everything needed to start.
pub struct ServeOptions {
    pub api_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub database: DatabaseSource,
    /// The owner role's connection string (`DATABASE_OWNER_URL`): migrations run as it.
    /// Without it an external database must already be migrated.
    pub database_owner_url: Option<String>,
    pub field_keys: Arc<FieldKeys>,
    /// Names (DNS or IP) the API certificate is issued for.
    pub api_names: Vec<String>,
    pub pool_size: usize,
    /// UDP address of the agent gateway.
    pub agent_addr: SocketAddr,
    /// The address agents are told to connect to (`HOST:PORT`); default: `agent_addr`.
    pub agent_endpoint: Option<String>,
    /// How often agents send heartbeats.
    pub agent_heartbeat: std::time::Duration,
    /// How long an agent connection may stay silent before both sides end it.
    pub agent_idle_timeout: std::time::Duration,
    /// How long the agent certificates this control plane issues are valid (enrolled or
    /// renewed); agents renew at about two thirds of it. Tests set seconds.
    pub agent_cert_lifetime: std::time::Duration,
    /// How long a queued deployment waits for its server's agent before it fails as
    /// "agent offline".
    pub dispatch_timeout: std::time::Duration,
    /// Outgoing email.
    pub mail: crate::identity::mailer::MailSettings,
    /// The API's URL as users reach it, for links in emails; default `https://<api addr>`.
    pub public_url: Option<String>,
    /// Peers whose `X-Forwarded-For` and `x-request-id` are believed: the load
    /// balancers in front of the API. Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Password hashes run at once; default from the cores and memory.
    pub max_concurrent_hashes: Option<usize>,
    /// Serve `/metrics` on this address instead of the API's.
    pub metrics_addr: Option<SocketAddr>,
    /// Require `Authorization: Bearer <token>` on `/metrics`.
    pub metrics_token: Option<String>,
    /// The longest an SSH deploy may run.
    pub ssh_job_timeout: std::time::Duration,
    /// Networks SSH targets may not resolve to (besides the control plane's own addresses).
    pub ssh_deny_networks: Vec<ipnet::IpNet>,
    /// Who may create an account through the API.
    pub signup: crate::identity::signup::SignupPolicy,
    /// Live-follow streams (logs, rollout events) this replica holds open at most.
    pub max_live_streams: usize,
    /// How long a quiet live-follow stream waits before its keep-alive comment.
    pub live_keep_alive: std::time::Duration,
    /// How long a presence stream lasts before the browser opens a new one.
    pub presence_lifetime: std::time::Duration,
    /// How audit sinks are delivered (poll, batch, timeout, backoff).
    pub audit_sinks: crate::audit::sinks::delivery::DeliverySettings,
    /// New agent handshakes admitted per second; default: measured at start (see
    /// `backoff::reconnect_rate`) with headroom.
    pub agent_handshake_rate: Option<f64>,
}

impl ServeOptions {
    /// The options for `data_dir`, `database` and `field_keys` with every other setting at its
    /// default (the API and the gateway on free loopback ports).
    pub fn new(data_dir: PathBuf, database: DatabaseSource, field_keys: Arc<FieldKeys>) -> Self {
        Self {
            api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            database,
            database_owner_url: None,
            field_keys,
            api_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            pool_size: 16,
            agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            agent_endpoint: None,
            agent_heartbeat: std::time::Duration::from_secs(
                sensei_shared::protocol::DEFAULT_HEARTBEAT_SECS.into(),
            ),
            agent_idle_timeout: crate::runners::agent::gateway::IDLE_TIMEOUT,
            agent_cert_lifetime: AGENT_CERT_LIFETIME,
            dispatch_timeout: std::time::Duration::from_secs(600),
            mail: Default::default(),
            public_url: None,
            trusted_proxies: Vec::new(),
            max_concurrent_hashes: None,
            metrics_addr: None,
            metrics_token: None,
            ssh_job_timeout: crate::runners::ssh::DEFAULT_JOB_TIMEOUT,
            ssh_deny_networks: crate::egress::default_denied_networks(),
            signup: crate::identity::signup::SignupPolicy::Closed,
            max_live_streams: crate::api::live::DEFAULT_PER_REPLICA,
            live_keep_alive: crate::api::live::DEFAULT_KEEP_ALIVE,
            presence_lifetime: crate::api::live::DEFAULT_PRESENCE_LIFETIME,
            audit_sinks: Default::default(),
            agent_handshake_rate: None,
        }
    }
}

/// Measures what a full agent handshake costs this machine (in the background: some 0.1 s of
/// one core) and sizes the reconnect rate a restart spreads the fleet over from it.
fn measure_handshake_cost(hub: Arc<AgentHub>) {
    tokio::task::spawn_blocking(move || {
        match sensei_certs::handshake_cost::measure(MEASURED_HANDSHAKES) {
            Ok(cost) => {
                let rate = hub.set_handshake_cost(cost.server);
                tracing::info!(
                    server_micros = cost.server.as_micros() as u64,
                    reconnects_per_sec = rate as u64,
                    "agent gateway: measured the cost of a full handshake; a restart spreads \
                     the fleet's reconnects at this rate"
                );
            }
            Err(e) => tracing::warn!(
                error = %e,
                "agent gateway: could not measure the handshake cost; a restart spreads \
                 reconnects at a conservative rate"
            ),
        }
    });
}

/// Handshakes in the start-up measurement: enough to average out a cold cache.
const MEASURED_HANDSHAKES: u32 = 100;

/// Default lifetime of agent certificates, in days: agents renew them over their connection
/// at about two thirds of it (`--agent-cert-days`).
pub const AGENT_CERT_DAYS: u64 = 90;
const AGENT_CERT_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(AGENT_CERT_DAYS * 86_400);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("embedded PostgreSQL: {0}")]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("certificates: {0}")]
    Pki(#[from] pki::PkiError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] sensei_certs::tls::TlsConfigError),
    #[error("cannot listen for the API on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error(transparent)]
    Gateway(#[from] crate::runners::agent::gateway::GatewayError),
    #[error(transparent)]
    Mail(#[from] crate::identity::mailer::MailConfigError),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("public URL {0:?} is not an https:// (or http://) URL with a host")]
    PublicUrl(String),
    #[error("agent liveness: {0}")]
    Liveness(#[from] sensei_shared::protocol::LivenessError),
}

/// A running control plane.
pub struct ControlPlane {
    api_addr: SocketAddr,
    public_url: String,
    live: Arc<crate::api::live::LiveStreams>,
    metrics_addr: Option<SocketAddr>,
    agent_addr: SocketAddr,
    agents: Arc<AgentHub>,
    job_keys: Arc<crate::secrets::job_signing::JobKeys>,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    ca_fingerprint: Fingerprint,
    ca_pem: String,
    pool: Pool,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    // Dropped last: stops the embedded database after everything using it.
    cluster: Option<PostgresCluster>,
}

/// Creates the data directory: traversable but not listable by others (the embedded
/// PostgreSQL runs as another user and must reach its own subdirectory).
pub fn prepare_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |e: std::io::Error| StartError::DataDir {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(err)?;
    }
    Ok(())
}

/// The opened database: the application's pool and connection string, and the embedded
/// cluster when there is one.
pub struct OpenedDatabase {
    pub pool: Pool,
    /// The application role's connection string (for LISTEN connections).
    pub url: String,
    pub cluster: Option<PostgresCluster>,
}

/// Opens the database as the application role, migrated to this binary's schema, and loads
/// the audit keys into `keys`.
///
/// With `DATABASE_URL`: migrations run as `owner_url`'s role when it is given (and the
/// application role is granted what it needs); without it the schema must already be current
/// (`sensei-control-plane migrate`). The embedded cluster (created and started on demand, with
/// a `sensei` database) migrates as its superuser and serves as [`db::EMBEDDED_APP_ROLE`].
/// `serve` then checks that the role cannot rewrite the audit log
/// ([`db::check_application_role`]); commands that only read may run as the owner.
pub async fn open_database(
    source: &DatabaseSource,
    owner_url: Option<&str>,
    keys: &FieldKeys,
    data_dir: &Path,
    pool_size: usize,
) -> Result<OpenedDatabase, StartError> {
    let (url, cluster) = match source {
        DatabaseSource::Url(url) => {
            match owner_url {
                Some(owner_url) => {
                    let owner = db::connect(owner_url, 1).await?;
                    let migrated = db::migrate(&owner, Some(&db::role_of(url)?)).await;
                    owner.close();
                    migrated?;
                }
                None => {
                    let pool = db::connect(url, 1).await?;
                    let current = db::ensure_current(&pool).await;
                    pool.close();
                    current?;
                }
            }
            (url.clone(), None)
        }
        DatabaseSource::Embedded => {
            prepare_data_dir(data_dir)?;
            let root = data_dir.join("postgres");
            let cluster = tokio::task::spawn_blocking(move || {
                PostgresCluster::start(&root, &ClusterOptions::default())
            })
            .await
            .map_err(|e| ClusterError::Step {
                step: "starting postgres",
                detail: e.to_string(),
            })??;
            let admin = db::connect(&cluster.conninfo("postgres"), 1).await?;
            let client = admin
                .get()
                .await
                .map_err(|e| db::DbError::Connect(e.to_string()))?;
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = 'sensei'", &[])
                .await
                .map_err(|e| db::DbError::Connect(db::describe(&e)))?;
            if exists.is_none() {
                client
                    .batch_execute("CREATE DATABASE sensei")
                    .await
                    .map_err(|e| db::DbError::Connect(db::describe(&e)))?;
            }
            let role = client
                .query_opt(
                    "SELECT 1 FROM pg_roles WHERE rolname = $1",
                    &[&db::EMBEDDED_APP_ROLE],
                )
                .await
                .map_err(|e| db::DbError::Connect(db::describe(&e)))?;
            if role.is_none() {
                client
                    .batch_execute(&format!("CREATE ROLE {} LOGIN", db::EMBEDDED_APP_ROLE))
                    .await
                    .map_err(|e| db::DbError::Connect(db::describe(&e)))?;
            }
            drop(client);
            admin.close();
            let owner = db::connect(&cluster.conninfo("sensei"), 1).await?;
            let migrated = db::migrate(&owner, Some(db::EMBEDDED_APP_ROLE)).await;
            owner.close();
            migrated?;
            (
                cluster.conninfo_as("sensei", db::EMBEDDED_APP_ROLE),
                Some(cluster),
            )
        }
    };
    let pool = db::connect(&url, pool_size).await?;
    crate::audit::keys::load(&pool, keys)
        .await
        .map_err(|e| StartError::Audit(e.to_string()))?;
    Ok(OpenedDatabase { pool, url, cluster })
}

fn binary_sha256() -> String {
    std::env::current_exe()
        .and_then(std::fs::read)
        .map(|bytes| hex::encode(Sha256::digest(bytes)))
        .unwrap_or_else(|_| "unknown".into())
}

impl ControlPlane {
    /// Starts everything and returns once the API is listening.
    pub async fn start(options: ServeOptions) -> Result<Self, StartError> {
        sensei_shared::protocol::check_liveness(
            options.agent_heartbeat,
            options.agent_idle_timeout,
        )?;
        let mailer = Arc::new(crate::identity::mailer::Mailer::new(&options.mail)?);
        let OpenedDatabase {
            pool,
            url: database_url,
            cluster,
        } = open_database(
            &options.database,
            options.database_owner_url.as_deref(),
            &options.field_keys,
            &options.data_dir,
            options.pool_size,
        )
        .await?;
        db::check_application_role(&pool).await?;
        let keys = options.field_keys;
        crate::audit::seal_unkeyed_chains(&pool, keys.audit_keys())
            .await
            .map_err(|e| StartError::Audit(e.to_string()))?;
        let ring = crate::runners::agent::ca_rotation::load(&pool, &keys).await?;
        // The CA clients pin: during a CA rotation, still the previous one.
        let ca = ring.presented();
        // Clients (curl, the quickstart, agents' operators) need the CA to trust the API.
        prepare_data_dir(&options.data_dir)?;
        let ca_path = options.data_dir.join("ca.pem");
        std::fs::write(&ca_path, ca.cert_pem()).map_err(|e| StartError::DataDir {
            path: ca_path.display().to_string(),
            message: e.to_string(),
        })?;
        let api_cert = pki::api_certificate(&pool, &keys, ca, &options.api_names).await?;
        let (ca_fingerprint, ca_pem) = (ca.fingerprint(), ca.cert_pem().to_owned());
        let tls = sensei_certs::tls::https_server_config(&api_cert.chain_pem, &api_cert.key_pem)?;
        let listener =
            TcpListener::bind(options.api_addr)
                .await
                .map_err(|e| StartError::Listen {
                    addr: options.api_addr,
                    message: e.to_string(),
                })?;
        let api_addr = listener.local_addr().map_err(|e| StartError::Listen {
            addr: options.api_addr,
            message: e.to_string(),
        })?;
        let sha = tokio::task::spawn_blocking(binary_sha256)
            .await
            .unwrap_or_else(|_| "unknown".into());

        // Agents: the job-signing keys they pin, the live certificate set, the QUIC gateway.
        let job_keys = crate::secrets::job_signing::JobKeys::new(
            crate::secrets::job_signing::load_ring(&pool, &keys).await?,
        );
        let hub = Arc::new(AgentHub::new());
        cert_events::load_all(&pool, &hub)
            .await
            .map_err(|e| db::DbError::Connect(db::describe(&e)))?;
        let authority = crate::runners::agent::authority::Authority::new(
            ring,
            &api_cert.chain_pem,
            &api_cert.key_pem,
            options.api_names.clone(),
            hub.certificates.clone(),
        )?;
        let gateway_ctx = Arc::new(GatewayContext {
            pool: pool.clone(),
            authority: authority.clone(),
            hub: hub.clone(),
            heartbeat: options.agent_heartbeat,
            idle_timeout: options.agent_idle_timeout,
            agent_cert_lifetime: options.agent_cert_lifetime,
            job_keys: job_keys.clone(),
            keys: keys.clone(),
            jobs: crate::jobs::batch::JobBatches::spawn(
                pool.clone(),
                keys.clone(),
                job_keys.clone(),
                hub.replica_id,
            ),
            presence: crate::runners::agent::presence::Presence::spawn(
                pool.clone(),
                hub.replica_id,
            ),
            handshake_rate: options.agent_handshake_rate,
        });
        measure_handshake_cost(hub.clone());
        let endpoint = gateway::bind(options.agent_addr, &gateway_ctx)?;
        let agent_addr = endpoint.local_addr().map_err(|e| StartError::Listen {
            addr: options.agent_addr,
            message: e.to_string(),
        })?;
        let agent_endpoint = options
            .agent_endpoint
            .clone()
            .unwrap_or_else(|| agent_addr.to_string());

        let public_url = options
            .public_url
            .clone()
            .unwrap_or_else(|| format!("https://{api_addr}"))
            .trim_end_matches('/')
            .to_owned();
        let public_origin = crate::api::cross_site::WebOrigin::of_url(&public_url)
            .ok_or_else(|| StartError::PublicUrl(public_url.clone()))?;
        let state_keys = keys.clone();
        let ssh_permits = Arc::new(tokio::sync::Semaphore::new(
            crate::runners::ssh::DEFAULT_CONCURRENCY,
        ));
        let hashing = Arc::new(crate::identity::passwords::HashGate::new(
            options
                .max_concurrent_hashes
                .unwrap_or_else(crate::identity::passwords::HashGate::default_concurrency),
        ));
        let metrics_listener = match options.metrics_addr {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| StartError::Listen {
                        addr,
                        message: e.to_string(),
                    })?,
            ),
        };
        // Where a tenant's SSH servers, DNS servers and audit sinks may not be: the denied
        // networks, and every listener of this control plane.
        let outbound = crate::egress::TargetPolicy {
            denied_networks: options.ssh_deny_networks.clone(),
            own: [
                Some(api_addr),
                Some(agent_addr),
                metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        let sink_counters = Arc::new(crate::audit::sinks::delivery::DeliveryCounters::default());
        let sink_delivery = Arc::new(crate::audit::sinks::delivery::Delivery {
            pool: pool.clone(),
            keys: keys.clone(),
            policy: outbound.clone(),
            settings: options.audit_sinks.clone(),
            replica: hub.replica_id,
            origin: reqwest::Url::parse(&public_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| "-".into()),
            counters: sink_counters.clone(),
        });
        let live = crate::api::live::LiveStreams::with_presence_lifetime(
            options.max_live_streams,
            options.live_keep_alive,
            options.presence_lifetime,
        );
        let live_streams = live.clone();
        let state = AppState::new(StateInner {
            pool: pool.clone(),
            keys,
            metrics: Metrics::default(),
            binary_sha256: sha,
            dispatch_timeout: options.dispatch_timeout,
            agents: hub.clone(),
            ca_authority: authority.clone(),
            job_keys: job_keys.clone(),
            agent_endpoint,
            mailer,
            public_url: public_url.clone(),
            public_origin,
            signup: options.signup,
            live: live.clone(),
            trusted_proxies: options.trusted_proxies.clone(),
            hashing,
            ssh_permits: ssh_permits.clone(),
            metrics_token: options.metrics_token.clone(),
            metrics_on_api: metrics_listener.is_none(),
            outbound: outbound.clone(),
            sink_counters,
            oidc_providers: Default::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        // Alive before the first agent is accepted: another replica's sweep releases the
        // agents of replicas it does not see alive.
        crate::jobs::sweep::heartbeat(&pool, hub.replica_id).await;
        let tasks = vec![
            tokio::spawn(gateway::run(
                endpoint.clone(),
                gateway_ctx,
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::api::live::listen(
                database_url.clone(),
                live,
                shutdown_rx.clone(),
            )),
            tokio::spawn(cert_events::listen(
                pool.clone(),
                database_url,
                hub.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::runners::agent::authority::follow(
                authority,
                hub.clone(),
                pool.clone(),
                state_keys.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::runners::agent::job_key_rotation::follow(
                job_keys.clone(),
                hub.clone(),
                pool.clone(),
                state_keys.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::app::maintenance::run(
                pool.clone(),
                state_keys.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::rollouts::run(
                pool.clone(),
                hub.clone(),
                state_keys.clone(),
                live_streams.rollout_activity(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(
                Arc::new(crate::runners::ssh::SshRunner {
                    pool: pool.clone(),
                    keys: state_keys.clone(),
                    job_keys: job_keys.clone(),
                    hub: hub.clone(),
                    permits: ssh_permits,
                    max_job: options.ssh_job_timeout,
                    running: Default::default(),
                    targets: outbound.clone(),
                })
                .run(shutdown_rx.clone()),
            ),
            tokio::spawn(crate::dns::run(
                pool.clone(),
                state_keys.clone(),
                outbound,
                shutdown_rx.clone(),
            )),
            tokio::spawn(sink_delivery.run(shutdown_rx.clone())),
            tokio::spawn(crate::jobs::sweep::run(
                pool.clone(),
                hub.replica_id,
                shutdown_rx.clone(),
            )),
        ];
        let mut tasks = tasks;
        let metrics_addr = match metrics_listener {
            None => None,
            Some(listener) => {
                let addr = listener.local_addr().ok();
                tasks.push(tokio::spawn(crate::app::https::serve(
                    listener,
                    tls.clone(),
                    api::metrics_router(state.clone()),
                    shutdown_rx.clone(),
                )));
                addr
            }
        };
        let server = tokio::spawn(crate::app::https::serve(
            listener,
            tls,
            // The dashboard and the API share the listener: `/` and `/ui/…` are the
            // dashboard's, everything else the API's (which answers unknown paths).
            crate::web::router(state.clone()).merge(api::router(state)),
            shutdown_rx,
        ));
        tracing::info!(%api_addr, %agent_addr, %ca_fingerprint, "control plane listening");
        Ok(Self {
            api_addr,
            public_url,
            live: live_streams,
            metrics_addr,
            agent_addr,
            agents: hub,
            job_keys,
            endpoint,
            tasks,
            ca_fingerprint,
            ca_pem,
            pool,
            shutdown,
            server,
            cluster,
        })
    }

    /// UDP address of the agent gateway.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agent_addr
    }

    /// This replica's live agent state.
    pub fn agents(&self) -> &Arc<AgentHub> {
        &self.agents
    }

    /// The job-signing keys this replica signs with now.
    pub fn job_keys(&self) -> &Arc<crate::secrets::job_signing::JobKeys> {
        &self.job_keys
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Live-follow streams this replica holds open now.
    pub fn live_streams_open(&self) -> usize {
        self.live.open_count()
    }

    /// The API's address as users reach it (`--public-url`, else `https://<api address>`):
    /// browsers' cookie requests must come from its origin.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    /// Where `/metrics` is served when it has a listener of its own.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn ca_fingerprint(&self) -> Fingerprint {
        self.ca_fingerprint
    }

    /// The CA certificate (PEM) clients trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Stops accepting connections, closes the pool and stops the embedded database.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        // Tell connected agents when to come back, spread so that a restart does not turn
        // into a reconnect storm.
        let connected = self.agents.connected_count();
        self.agents.close_all_for_restart();
        // Wait for the peers to acknowledge their close (wait_idle), but only for the drain:
        // long enough for every close frame to leave (an agent that misses its close only
        // notices after its 60 s idle timeout), where waiting for every acknowledgement could
        // hold a restart for the full idle timeout.
        let drain = sensei_shared::backoff::restart_drain(connected);
        let _ = tokio::time::timeout(drain, self.endpoint.wait_idle()).await;
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutdown");
        let _ = self.server.await;
        for task in self.tasks {
            let _ = task.await;
        }
        self.pool.close();
        if let Some(cluster) = self.cluster {
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        }
    }
}
