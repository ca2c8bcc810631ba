//! `sensei-loadgen`: holds a simulated fleet against a real control plane and prints figures.
//!
//! ```text
//! cargo build --release -p sensei-control-plane -p sensei-agent -p sensei-loadgen
//! target/release/sensei-loadgen fleet --agents 10000 --json fleet-10k.json
//! target/release/sensei-loadgen footprint --secs 300
//! target/release/sensei-loadgen logins --clients 64 --secs 30
//! target/release/sensei-loadgen renewals --agents 1000 --spread-secs 60
//! target/release/sensei-loadgen handshakes --rounds 2000
//! taskset -c 1 target/release/sensei-loadgen fleet --agents 10000 --storm-only --plane-cpus 0
//! target/release/sensei-loadgen replicas --replicas 2 --agents 10000
//! target/release/sensei-loadgen soak --agents 10000 --minutes 30
//! ```
//!
//! `fleet` runs, in order: idle density, dispatch latency, an all-at-once and a batched
//! rollout, and a reconnect storm (it restarts the control plane, so it comes last).
//! `renewals` connects the fleet, then every agent renews its certificate over its live
//! session (the real agent's exchange) and reconnects with the new one.
//! `replicas` splits the fleet over several replicas on one database: idle cost per replica,
//! dispatch and revocation across replicas, and failover after one is killed with SIGKILL.
//! `soak` holds the fleet for many minutes while 1 % of it restarts every minute and a
//! deployment arrives every few seconds, and reports memory and errors minute by minute.
//! `footprint` enrolls and runs the real `sensei-agent` binary and reads its memory.
//! `handshakes` measures what a full handshake costs each side on this machine (in memory,
//! no network): the physical limit the reconnect figures are compared with.

mod dbshare;
mod fleet;
mod logins;
mod plane;
mod replicas;
mod soak;
mod stats;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::fleet::{Fleet, SimIdentity};
use crate::plane::{Plane, PlaneConfig};
use crate::stats::{Report, Spread};

#[derive(Parser)]
#[command(
    name = "sensei-loadgen",
    about = "Simulate a fleet of agents against a real control plane"
)]
struct Cli {
    /// Write the figures as JSON here too.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
    /// Keep the (first) control plane's log here instead of in its data directory, which is
    /// removed at the end: what a run that went wrong leaves to read.
    #[arg(long, global = true)]
    plane_log: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Idle density, dispatch latency, rollouts and a reconnect storm with N simulated agents.
    Fleet(FleetOptions),
    /// The real agent binary: idle memory after SECS connected, and its size.
    Footprint {
        #[arg(long, default_value_t = 300)]
        secs: u64,
    },
    /// Sign-ins per second the control plane sustains, and /healthz latency meanwhile.
    Logins(logins::LoginOptions),
    /// Several replicas on one database: idle cost, dispatch and revocation across them,
    /// failover after SIGKILL.
    Replicas(replicas::ReplicaOptions),
    /// A long run with churn and deployments: memory must stay flat, nothing may fail.
    Soak(soak::SoakOptions),
    /// N connected agents renew their certificates over their sessions and reconnect.
    Renewals(RenewalOptions),
    /// Full mutual-TLS handshakes in a tight loop, in memory, with the gateway's and the
    /// agent's own configurations: the machine's physical limit, CPU per side.
    Handshakes {
        #[arg(long, default_value_t = 2000)]
        rounds: u32,
    },
}

/// How the simulated fleet connects.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct Connecting {
    /// Client UDP sockets the simulated agents share.
    #[arg(long, default_value_t = 8)]
    endpoints: usize,
    /// Handshakes in flight at most while the fleet first connects.
    #[arg(long, default_value_t = 256)]
    ramp: usize,
}

#[derive(clap::Args, Clone, Copy)]
struct RenewalOptions {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Each agent renews at a moment drawn uniformly over this many seconds (0: all at once).
    #[arg(long, default_value_t = 60)]
    spread_secs: u64,
    #[command(flatten)]
    connecting: Connecting,
}

#[derive(clap::Args, Clone)]
struct FleetOptions {
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds of idle CPU measurement.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Deployments queued one after another for the dispatch latency.
    #[arg(long, default_value_t = 200)]
    dispatches: usize,
    #[command(flatten)]
    connecting: Connecting,
    #[command(flatten)]
    liveness: Liveness,
    /// Stop after the idle density figures (for the largest fleets).
    #[arg(long)]
    idle_only: bool,
    /// Connect the fleet, then go straight to the reconnect storm.
    #[arg(long, conflicts_with = "idle_only")]
    storm_only: bool,
    /// Stop after the rollouts (no reconnect storm).
    #[arg(long, conflicts_with_all = ["idle_only", "storm_only"])]
    no_storm: bool,
    /// One rollout in batches of this percentage of the fleet, instead of the two standard
    /// ones (all at once, then four batches).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    batch_percent: Option<u8>,
    /// Run the control plane on these CPUs only (`taskset -c LIST`, e.g. `0`).
    #[arg(long)]
    plane_cpus: Option<String>,
}

/// How the control plane keeps its agents' connections alive (production defaults unless
/// told otherwise).
#[derive(clap::Args, Clone, Copy, Debug)]
pub(crate) struct Liveness {
    /// Agent heartbeat interval the control plane asks for.
    #[arg(long, default_value_t = sensei_shared::protocol::DEFAULT_HEARTBEAT_SECS.into())]
    pub heartbeat_secs: u64,
    /// The agents' QUIC idle timeout the control plane asks for (`--agent-idle-timeout-secs`).
    #[arg(long, default_value_t = sensei_shared::protocol::AGENT_IDLE_TIMEOUT_SECS.into())]
    pub idle_timeout_secs: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            heartbeat_secs: sensei_shared::protocol::DEFAULT_HEARTBEAT_SECS.into(),
            idle_timeout_secs: sensei_shared::protocol::AGENT_IDLE_TIMEOUT_SECS.into(),
        }
    }
}

/// `--plane-log`, for [`Setup::new`].
static PLANE_LOG: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

/// What every scenario runs against.
pub(crate) struct Setup {
    _cluster: sensei_control_plane::store::postgres_cluster::PostgresCluster,
    _dirs: Vec<tempfile::TempDir>,
    config: PlaneConfig,
    plane: Option<Plane>,
    /// Further replicas on the same database (the `replicas` scenario).
    extra: Vec<(PlaneConfig, Option<Plane>)>,
    http: reqwest::Client,
    db: tokio_postgres::Client,
    /// The plane's database as the superuser, for PostgreSQL's statistics (`dbshare`).
    superuser: tokio_postgres::Client,
    pg_data: std::path::PathBuf,
    cookie: String,
    account: Uuid,
    project: String,
}

impl Setup {
    pub(crate) async fn new(liveness: Liveness, cpus: Option<String>) -> anyhow::Result<Self> {
        let pg_dir = plane::open_tempdir("sensei-loadgen-pg-")?;
        // A durable cluster (fsync on), as in production: acknowledgements are real commits.
        let cluster = sensei_control_plane::store::postgres_cluster::PostgresCluster::start(
            &pg_dir.path().join("pg"),
            &sensei_control_plane::store::postgres_cluster::ClusterOptions {
                settings: dbshare::cluster_settings(),
                ..Default::default()
            },
        )?;
        let (admin, conn) =
            tokio_postgres::connect(&cluster.conninfo("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin.batch_execute("CREATE DATABASE sensei").await?;
        admin.batch_execute("CREATE ROLE sensei_app LOGIN").await?;
        let (superuser, conn) =
            tokio_postgres::connect(&cluster.conninfo("sensei"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        dbshare::install(&superuser).await?;
        let pg_data = pg_dir.path().join("pg").join("pgdata");
        // Two roles, as in production: the plane migrates as the owner, serves as sensei_app.
        let owner_url = cluster.conninfo("sensei");
        let database_url = cluster.conninfo_as("sensei", "sensei_app");
        let data_dir = plane::open_tempdir("sensei-loadgen-data-")?;
        let config = PlaneConfig {
            binary: plane::sibling_binary("sensei-control-plane")?,
            database_url: database_url.clone(),
            owner_url: owner_url.clone(),
            field_key: sensei_control_plane::secrets::field_crypto::FieldKeys::generate_key(),
            data_dir: data_dir.path().to_owned(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], plane::free_port(false)?)),
            agent_addr: SocketAddr::from(([127, 0, 0, 1], plane::free_port(true)?)),
            heartbeat_secs: liveness.heartbeat_secs,
            idle_timeout_secs: liveness.idle_timeout_secs,
            log: PLANE_LOG
                .get()
                .cloned()
                .flatten()
                .unwrap_or_else(|| data_dir.path().join("control-plane.log")),
            cpus,
        };
        let plane = Plane::start(&config)?;
        let http = plane::client_for(&config.data_dir, &config.public_url()).await?;
        plane::wait_healthy(&http, config.api_addr, Duration::from_secs(60)).await?;
        let (db, conn) = tokio_postgres::connect(&owner_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let base = config.public_url();
        let signup = http
            .post(format!("{base}/v1/auth/signup"))
            .json(&json!({"email": "load@sensei.test", "password": "load generator password", "account_name": "Load"}))
            .send()
            .await?;
        if signup.status() != 201 {
            bail!("signup failed: {}", signup.status());
        }
        let cookie = signup
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("sensei_session="))
            .and_then(|v| v.split(';').next())
            .context("no session cookie")?
            .to_owned();
        let body: Value = signup.json().await?;
        let account: Uuid = body["account"]["id"]
            .as_str()
            .context("account id")?
            .parse()?;
        let project: Value = http
            .post(format!("{base}/v1/projects"))
            .header("cookie", &cookie)
            .json(&json!({"name": "load", "repo_url": "https://example.com/load.git", "deploy_path": "/srv/load"}))
            .send()
            .await?
            .json()
            .await?;
        let project = project["id"].as_str().context("project id")?.to_owned();
        Ok(Self {
            _cluster: cluster,
            _dirs: vec![pg_dir, data_dir],
            config,
            plane: Some(plane),
            extra: Vec::new(),
            http,
            db,
            superuser,
            pg_data,
            cookie,
            account,
            project,
        })
    }

    pub(crate) fn base(&self) -> String {
        self.config.public_url()
    }

    /// Starts `count` more replicas of the control plane on the same database (each with
    /// its own ports and data directory) and waits until they answer.
    pub(crate) async fn add_replicas(&mut self, count: usize) -> anyhow::Result<()> {
        for _ in 0..count {
            let data_dir = plane::open_tempdir("sensei-loadgen-data-")?;
            let config = PlaneConfig {
                data_dir: data_dir.path().to_owned(),
                api_addr: SocketAddr::from(([127, 0, 0, 1], plane::free_port(false)?)),
                agent_addr: SocketAddr::from(([127, 0, 0, 1], plane::free_port(true)?)),
                log: data_dir.path().join("control-plane.log"),
                ..self.config.clone()
            };
            let replica = Plane::start(&config)?;
            plane::wait_healthy(&self.http, config.api_addr, Duration::from_secs(60)).await?;
            self._dirs.push(data_dir);
            self.extra.push((config, Some(replica)));
        }
        Ok(())
    }

    /// Every replica's agent gateway, the first replica's first.
    pub(crate) fn gateways(&self) -> Vec<SocketAddr> {
        std::iter::once(self.config.agent_addr)
            .chain(self.extra.iter().map(|(c, _)| c.agent_addr))
            .collect()
    }

    /// Replica `i` (0: the first), if it runs.
    pub(crate) fn replica(&self, i: usize) -> anyhow::Result<&Plane> {
        match i {
            0 => self.plane(),
            i => self
                .extra
                .get(i - 1)
                .and_then(|(_, p)| p.as_ref())
                .with_context(|| format!("replica {i} is not running")),
        }
    }

    /// Replica `i`'s API address.
    pub(crate) fn replica_api(&self, i: usize) -> SocketAddr {
        match i {
            0 => self.config.api_addr,
            i => self.extra[i - 1].0.api_addr,
        }
    }

    async fn db_reading(&self) -> anyhow::Result<dbshare::DbReading> {
        dbshare::read(&self.superuser, &self.pg_data).await
    }

    fn plane(&self) -> anyhow::Result<&Plane> {
        self.plane
            .as_ref()
            .context("the control plane is not running")
    }

    /// One unlabelled figure from the running plane's `/metrics`.
    async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.replica_metric(0, name).await
    }

    /// One unlabelled figure from replica `i`'s `/metrics`.
    pub(crate) async fn replica_metric(&self, i: usize, name: &str) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!(
                "https://localhost:{}/metrics",
                self.replica_api(i).port()
            ))
            .send()
            .await?
            .text()
            .await?;
        sensei_control_plane::app::metrics::unlabelled_value(&text, name)
            .with_context(|| format!("{name} is not in /metrics"))
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base()))
            .header("cookie", &self.cookie)
            .json(&body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Queues a deployment of the load project to `server`; answers its id.
    pub(crate) async fn queue_deployment(&self, server: Uuid) -> anyhow::Result<Uuid> {
        let (status, body) = self
            .post(
                "/v1/deployments",
                json!({"project_id": self.project, "server_id": server, "ref": "main"}),
            )
            .await?;
        if status != 201 {
            bail!("queueing a deployment failed: {status} {body}");
        }
        Ok(body["id"].as_str().context("deployment id")?.parse()?)
    }

    /// `DELETE path` through the first replica's API; answers the status.
    pub(crate) async fn delete(&self, path: &str) -> anyhow::Result<u16> {
        let r = self
            .http
            .delete(format!("{}{path}", self.base()))
            .header("cookie", &self.cookie)
            .send()
            .await?;
        Ok(r.status().as_u16())
    }

    /// Creates the servers and their certificate rows, and tells the running control plane
    /// (the same notification enrollment sends).
    async fn register(&self, identities: &[SimIdentity]) -> anyhow::Result<()> {
        for chunk in identities.chunks(5000) {
            let ids: Vec<Uuid> = chunk.iter().map(|i| i.server_id).collect();
            let names: Vec<String> = chunk
                .iter()
                .map(|i| format!("load-{}", i.server_id.simple()))
                .collect();
            let fps: Vec<Vec<u8>> = chunk.iter().map(|i| i.fingerprint.to_vec()).collect();
            let serials: Vec<String> = chunk.iter().map(|i| i.serial_hex.clone()).collect();
            let not_after: Vec<f64> = chunk
                .iter()
                .map(|i| i.not_after.unix_timestamp() as f64)
                .collect();
            self.db
                .execute(
                    "INSERT INTO servers (id, account_id, name, host, transport, labels) \
                     SELECT id, $2, name, '127.0.0.1', 'agent', '{\"fleet\":\"load\"}' \
                     FROM unnest($1::uuid[], $3::text[]) AS t(id, name)",
                    &[&ids, &self.account, &names],
                )
                .await?;
            self.db
                .execute(
                    "INSERT INTO agent_certificates (fingerprint, server_id, serial, not_after) \
                     SELECT fp, id, serial, to_timestamp(na) \
                     FROM unnest($1::bytea[], $2::uuid[], $3::text[], $4::float8[]) AS t(fp, id, serial, na)",
                    &[&fps, &ids, &serials, &not_after],
                )
                .await?;
            self.db
                .execute(
                    "SELECT pg_notify('sensei_agent_certs', 'allow:' || encode(fingerprint, 'hex') || ':' || server_id || ':' || extract(epoch FROM not_after)::bigint) \
                     FROM agent_certificates WHERE server_id = ANY($1)",
                    &[&ids],
                )
                .await?;
        }
        Ok(())
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Issues `agents` certificates, registers their servers and connects them all (at most
/// `ramp` handshakes in flight), agent `i` to replica `i mod replicas`. Returns the fleet and
/// its servers' ids.
async fn connect_fleet(
    report: &mut Report,
    setup: &Setup,
    agents: usize,
    Connecting { endpoints, ramp }: Connecting,
) -> anyhow::Result<(Fleet, Vec<Uuid>)> {
    let started = Instant::now();
    let pool = sensei_control_plane::store::db::connect(&setup.config.database_url, 2).await?;
    let keys =
        sensei_control_plane::secrets::field_crypto::FieldKeys::parse(&setup.config.field_key)?;
    let ca = sensei_control_plane::secrets::pki::certificate_authority(&pool, &keys).await?;
    let job_key = sensei_control_plane::secrets::job_signing::load_or_create(&pool, &keys)
        .await?
        .verifying_key();
    pool.close();
    let ca_pem = ca.cert_pem().to_owned();
    let identities = tokio::task::spawn_blocking(move || fleet::issue(&ca, agents)).await??;
    let server_ids: Vec<Uuid> = identities.iter().map(|i| i.server_id).collect();
    report.add(
        "setup",
        "identities",
        format!(
            "{agents} certificates issued by the CA library (not the enrollment path) in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        json!({"agents": agents, "issued_by": "ca_library", "secs": started.elapsed().as_secs_f64()}),
    );
    setup.register(&identities).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let fleet = Fleet::start(
        identities,
        &ca_pem,
        job_key,
        &setup.gateways(),
        endpoints,
        ramp,
    )?;
    let Some(took) = fleet.wait_connected(agents, Duration::from_secs(600)).await else {
        bail!(
            "only {} of {agents} agents connected within 600 s",
            fleet.shared.connected.load(Ordering::Relaxed)
        );
    };
    let first = fleet.shared.take_handshakes();
    report.add(
        "idle",
        "connect all (ramp)",
        format!(
            "{agents} agents in {:.2} s ({:.0}/s), handshake {}",
            took.as_secs_f64(),
            agents as f64 / took.as_secs_f64(),
            Spread::of(&first).map(|s| s.text()).unwrap_or_default()
        ),
        json!({"secs": took.as_secs_f64(), "handshake": Spread::of(&first).map(|s| s.json()),
               "failed_attempts": fleet.shared.failed_attempts.load(Ordering::Relaxed)}),
    );
    Ok((fleet, server_ids))
}

/// Idle density, dispatch latency and rollouts on the connected fleet. Answers the run's
/// metadata when the run ends here (`--idle-only`).
async fn steady_state(
    report: &mut Report,
    setup: &Setup,
    fleet: &Fleet,
    server_ids: &[Uuid],
    baseline: u64,
    options: &FleetOptions,
) -> anyhow::Result<Option<Value>> {
    let FleetOptions {
        agents,
        idle_secs,
        dispatches,
        ..
    } = *options;
    let cpu_before = setup.plane()?.cpu();
    let db_before = setup.db_reading().await?;
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let db_after = setup.db_reading().await?;
    let (text, value) = dbshare::share(&db_before, &db_after, agents);
    report.add("idle", "database share", text, value);
    let idle_cpu =
        (setup.plane()?.cpu() - cpu_before).as_secs_f64() / measured.elapsed().as_secs_f64();
    let rss = setup.plane()?.rss_kib();
    let per_agent = (rss.saturating_sub(baseline)) as f64 / agents as f64;
    report.add(
        "idle",
        "control-plane RSS",
        format!(
            "{:.1} MiB with {agents} agents (baseline {:.1} MiB): {per_agent:.1} KiB per agent",
            mib(rss),
            mib(baseline)
        ),
        json!({"rss_kib": rss, "baseline_kib": baseline, "per_agent_kib": per_agent}),
    );
    report.add(
        "idle",
        "control-plane idle CPU",
        format!("{:.1}% of one core over {idle_secs} s", idle_cpu * 100.0),
        json!({"core_fraction": idle_cpu, "secs": idle_secs}),
    );
    if options.idle_only {
        return Ok(Some(
            json!({"agents": agents, "idle_secs": idle_secs, "idle_only": true}),
        ));
    }

    // 2. Dispatch latency: one deployment at a time to a random agent.
    let servers = (0..dispatches).map(|i| server_ids[(i * 7919) % server_ids.len()]);
    let (latencies, api) = dispatch_latency(setup, fleet, servers).await?;
    let spread = Spread::of(&latencies).context("no dispatches")?;
    report.add(
        "dispatch",
        "API call → agent verified job",
        spread.text(),
        json!({"latency": spread.json(), "api": Spread::of(&api).map(|s| s.json()), "connected": agents}),
    );
    report.add(
        "dispatch",
        "of which the API call",
        Spread::of(&api).map(|s| s.text()).unwrap_or_default(),
        Value::Null,
    );

    // 3. Rollouts: all at once, then in four batches.
    let strategies = match options.batch_percent {
        Some(p) => vec![(
            format!("batches of {p} %"),
            json!({"canary": 0, "batch_percent": p}),
        )],
        None => vec![
            (
                "all at once".to_owned(),
                json!({"canary": 0, "batch_percent": 100}),
            ),
            (
                "4 batches".to_owned(),
                json!({"canary": 0, "batch_percent": 25}),
            ),
        ],
    };
    for (label, strategy) in strategies {
        let cpu_before = setup.plane()?.cpu();
        let db_before = setup.db_reading().await?;
        let verified_before = fleet.shared.verified_count();
        // Datagrams the kernel dropped since the rollout began: at the gateway, at the agents.
        let gateway_port = [setup.config.agent_addr.port()];
        let drops_now = || {
            (
                plane::udp_drops(&gateway_port),
                plane::udp_drops(&fleet.ports),
            )
        };
        let drops_before = drops_now();
        let drops_since = || {
            let now = drops_now();
            (now.0 - drops_before.0, now.1 - drops_before.1)
        };
        let sent = Instant::now();
        let (status, body) = setup
            .post(
                "/v1/rollouts",
                json!({"project_id": setup.project, "ref": "main", "selector": {"labels": {"fleet": "load"}},
                       "strategy": strategy}),
            )
            .await?;
        if status != 201 {
            bail!("starting a rollout failed: {status} {body}");
        }
        let rollout: Uuid = body["id"].as_str().context("rollout id")?.parse()?;
        let deadline = Instant::now() + Duration::from_secs(900);
        // Counting the rollout's acks in the database reads every target: at 100k agents
        // that query, every 20 ms, would be a large part of the database's work. The agents'
        // own count of verified jobs is free, and every ack follows a verification.
        let sessions_before = fleet.shared.sessions.load(Ordering::Relaxed);
        let mut looked = Instant::now();
        while fleet.shared.verified_count() < verified_before + agents && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A rollout that halts never gets every ack: say so at once, with what the
            // fleet went through meanwhile.
            if looked.elapsed() >= Duration::from_secs(1) {
                looked = Instant::now();
                let row = setup
                    .db
                    .query_one(
                        "SELECT state, halted_reason FROM rollouts WHERE id = $1",
                        &[&rollout],
                    )
                    .await?;
                if row.get::<_, &str>(0) == "halted" {
                    let failures: Vec<String> = setup
                        .db
                        .query(
                            "SELECT status, coalesce(error, ''), count(*) FROM rollout_targets \
                             WHERE rollout_id = $1 AND status IN ('failed', 'unreachable') \
                             GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
                            &[&rollout],
                        )
                        .await?
                        .iter()
                        .map(|r| {
                            format!(
                                "{} x {} ({})",
                                r.get::<_, i64>(2),
                                r.get::<_, &str>(0),
                                r.get::<_, &str>(1)
                            )
                        })
                        .collect();
                    let drops = drops_since();
                    bail!(
                        "rollout {label} halted after {:.1} s: {}; {} of {agents} jobs verified, {} new sessions meanwhile; \
                         failed targets: {}; UDP datagrams dropped by the kernel: {} at the gateway, {} at the agents",
                        sent.elapsed().as_secs_f64(),
                        row.get::<_, Option<String>>(1).unwrap_or_default(),
                        fleet.shared.verified_count() - verified_before,
                        fleet.shared.sessions.load(Ordering::Relaxed) - sessions_before,
                        failures.join("; "),
                        drops.0,
                        drops.1,
                    );
                }
            }
        }
        loop {
            let row = setup
                .db
                .query_one(
                    "SELECT count(*) FILTER (WHERE d.status = 'succeeded'), count(*) \
                     FROM rollout_targets t LEFT JOIN deployments d ON d.id = t.deployment_id \
                     WHERE t.rollout_id = $1",
                    &[&rollout],
                )
                .await?;
            let (done, total): (i64, i64) = (row.get(0), row.get(1));
            if total as usize == agents && done == total {
                break;
            }
            if Instant::now() > deadline {
                bail!("rollout {label}: {done} of {total} acknowledged after 900 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = sent.elapsed();
        let reconnects = fleet.shared.sessions.load(Ordering::Relaxed) - sessions_before;
        let drops = drops_since();
        let cpu = setup.plane()?.cpu() - cpu_before;
        let db_after = setup.db_reading().await?;
        let jobs: Vec<Uuid> = setup
            .db
            .query(
                "SELECT deployment_id FROM rollout_targets WHERE rollout_id = $1",
                &[&rollout],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let per_agent: Vec<Duration> = jobs
            .iter()
            .filter_map(|j| fleet.shared.verified_at(*j))
            .map(|at| at.saturating_duration_since(sent))
            .collect();
        let spread = Spread::of(&per_agent).context("no verified jobs")?;
        report.add(
            "rollout",
            &format!("{label}: every ack committed"),
            format!(
                "{agents} agents in {:.2} s; per agent {}; control-plane CPU {:.1} s; {reconnects} new sessions meanwhile; \
                 UDP datagrams dropped by the kernel: {} at the gateway, {} at the agents",
                wall.as_secs_f64(),
                spread.text(),
                cpu.as_secs_f64(),
                drops.0,
                drops.1
            ),
            json!({"wall_secs": wall.as_secs_f64(), "per_agent": spread.json(), "cpu_secs": cpu.as_secs_f64(),
                   "new_sessions": reconnects, "udp_drops_gateway": drops.0, "udp_drops_agents": drops.1}),
        );
        let (text, value) = dbshare::share(&db_before, &db_after, agents);
        report.add("rollout", &format!("{label}: database share"), text, value);
    }

    Ok(None)
}

/// Queues one deployment at a time (through the first replica's API) for each server in
/// turn and waits until its agent verified it. Answers each latency from the API call to the
/// agent's verification, and each API call's own.
pub(crate) async fn dispatch_latency(
    setup: &Setup,
    fleet: &Fleet,
    servers: impl Iterator<Item = Uuid>,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut latencies = Vec::new();
    let mut api = Vec::new();
    for server in servers {
        let sent = Instant::now();
        let job = setup.queue_deployment(server).await?;
        api.push(sent.elapsed());
        let Some(at) = fleet::wait_for_mark(
            &fleet.shared.verified_signal,
            Duration::from_secs(30),
            || fleet.shared.verified_at(job),
        )
        .await
        else {
            bail!("deployment {job} was never verified by its agent");
        };
        latencies.push(at.saturating_duration_since(sent));
    }
    Ok((latencies, api))
}

async fn fleet_scenarios(report: &mut Report, options: FleetOptions) -> anyhow::Result<Value> {
    let FleetOptions {
        agents,
        idle_secs,
        dispatches,
        connecting,
        liveness,
        storm_only,
        plane_cpus,
        ..
    } = options.clone();
    let mut setup = Setup::new(liveness, plane_cpus.clone()).await?;
    // 1. Idle density (the baseline before any agent is there).
    let baseline = setup.plane()?.rss_kib();
    let (fleet, server_ids) = connect_fleet(report, &setup, agents, connecting).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    if !storm_only {
        if let Some(meta) =
            steady_state(report, &setup, &fleet, &server_ids, baseline, &options).await?
        {
            fleet.stop().await;
            return Ok(meta);
        }
    }
    let meta = json!({"agents": agents, "idle_secs": idle_secs, "dispatches": dispatches,
                      "endpoints": connecting.endpoints, "heartbeat_secs": liveness.heartbeat_secs,
                      "idle_timeout_secs": liveness.idle_timeout_secs,
                      "no_storm": options.no_storm});
    if options.no_storm {
        fleet.stop().await;
        return Ok(meta);
    }

    // 4. Reconnect storm: restart the control plane with every agent connected.
    let _ = fleet.shared.take_handshakes();
    let failed_before = fleet.shared.failed_attempts.load(Ordering::Relaxed);
    let sessions_before = fleet.shared.sessions.load(Ordering::Relaxed);
    let schedule_rate = setup.metric("sensei_agent_reconnect_rate").await?;
    let old = setup.plane.take().context("plane")?;
    let old_cpu = old.cpu();
    let loadgen_cpu_before = plane::proc_cpu(std::process::id());
    let stopping = Instant::now();
    let old_stop_cpu = tokio::task::spawn_blocking(move || old.terminate())
        .await??
        .saturating_sub(old_cpu);
    let stopped = stopping.elapsed();
    let restarted = Plane::start(&setup.config)?;
    plane::wait_healthy(&setup.http, setup.config.api_addr, Duration::from_secs(60)).await?;
    let ready = restarted.started.elapsed();
    setup.plane = Some(restarted);
    // Every agent must make a new session: one that missed its close would still count as
    // connected until its idle timeout.
    if fleet
        .wait_sessions(sessions_before, agents, Duration::from_secs(180))
        .await
        .is_none()
    {
        bail!(
            "after the restart only {} of {agents} agents made a new session within 180 s",
            fleet.shared.sessions.load(Ordering::Relaxed) - sessions_before
        );
    };
    let since_start = setup.plane()?.started.elapsed();
    // The new process's whole CPU until the last agent was back (its start included), and
    // the old one's from the close to its exit.
    let storm_cpu = setup.plane()?.cpu() + old_stop_cpu;
    // The simulated agents' side of the same reconnects (their handshakes, on this machine).
    let loadgen_cpu = plane::proc_cpu(std::process::id()).saturating_sub(loadgen_cpu_before);
    let handshakes = fleet.shared.take_handshakes();
    let failed = fleet.shared.failed_attempts.load(Ordering::Relaxed) - failed_before;
    let deferred = setup
        .metric("sensei_agent_handshakes_deferred_total")
        .await?;
    report.add(
        "reconnect",
        "restart → all agents back",
        format!(
            "{agents} agents back {:.2} s after the new process started (stop took {:.2} s, ready after {:.2} s); \
             handshake {}; failed attempts {failed}; control-plane CPU {:.2} s ({:.2} s per 1k reconnects); \
             load generator CPU {:.2} s; spread at {schedule_rate:.0}/s, {deferred:.0} first packets deferred by admission",
            since_start.as_secs_f64(),
            stopped.as_secs_f64(),
            ready.as_secs_f64(),
            Spread::of(&handshakes).map(|s| s.text()).unwrap_or_default(),
            storm_cpu.as_secs_f64(),
            storm_cpu.as_secs_f64() * 1000.0 / agents as f64,
            loadgen_cpu.as_secs_f64(),
        ),
        json!({"back_after_start_secs": since_start.as_secs_f64(), "stop_secs": stopped.as_secs_f64(),
               "ready_secs": ready.as_secs_f64(), "handshake": Spread::of(&handshakes).map(|s| s.json()),
               "failed_attempts": failed, "cpu_secs": storm_cpu.as_secs_f64(),
               "schedule_rate": schedule_rate, "deferred": deferred,
               "loadgen_cpu_secs": loadgen_cpu.as_secs_f64(),
               "plane_cpus": plane_cpus}),
    );
    let refused = fleet.shared.refused.load(Ordering::Relaxed);
    if refused > 0 {
        bail!("{refused} jobs failed verification");
    }
    fleet.stop().await;
    Ok(meta)
}

/// Every connected agent renews its certificate over its live session and reconnects with it.
async fn renewals(report: &mut Report, options: RenewalOptions) -> anyhow::Result<Value> {
    let RenewalOptions {
        agents,
        spread_secs,
        connecting,
    } = options;
    let setup = Setup::new(Liveness::default(), None).await?;
    let (fleet, _) = connect_fleet(report, &setup, agents, connecting).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let _ = fleet.shared.take_handshakes();
    let failed_before = fleet.shared.failed_attempts.load(Ordering::Relaxed);
    let sessions_before = fleet.shared.sessions.load(Ordering::Relaxed);
    let cpu_before = setup.plane()?.cpu();
    let spread = Duration::from_secs(spread_secs);
    let within = spread + Duration::from_secs(600);
    fleet.renew(spread);
    let Some(wall) = fleet.wait_reconnected(agents, within).await else {
        bail!(
            "after {} s only {} of {agents} agents renewed ({} renewals failed) and {} reconnected with the new certificate",
            within.as_secs(),
            fleet.shared.renewed.load(Ordering::Relaxed),
            fleet.shared.renewal_failures.load(Ordering::Relaxed),
            fleet.shared.reconnected.load(Ordering::Relaxed),
        );
    };
    let cpu = setup.plane()?.cpu() - cpu_before;
    let sessions = fleet.shared.sessions.load(Ordering::Relaxed) - sessions_before;
    let failed_attempts = fleet.shared.failed_attempts.load(Ordering::Relaxed) - failed_before;
    let renewal_failures = fleet.shared.renewal_failures.load(Ordering::Relaxed);
    let round_trips = fleet.shared.take_renewal_round_trips();
    let handshakes = fleet.shared.take_renewed_handshakes();
    // What the control plane recorded: one new certificate per agent.
    let certificates: i64 = setup
        .db
        .query_one("SELECT count(*) FROM agent_certificates", &[])
        .await?
        .get(0);
    let secs = wall.as_secs_f64();
    report.add(
        "renewal",
        "wave → every agent reconnected with its new certificate",
        format!(
            "{agents} agents renewed over {spread_secs} s of spread in {secs:.2} s: {:.0} renewals/s, \
             {:.0} handshakes/s ({sessions} sessions); control-plane CPU {:.1} s; \
             failed renewals {renewal_failures}, failed connection attempts {failed_attempts}; \
             {certificates} certificate rows",
            agents as f64 / secs,
            sessions as f64 / secs,
            cpu.as_secs_f64()
        ),
        json!({"agents": agents, "spread_secs": spread_secs, "wall_secs": secs,
               "renewals_per_sec": agents as f64 / secs, "handshakes_per_sec": sessions as f64 / secs,
               "sessions": sessions, "cpu_secs": cpu.as_secs_f64(),
               "renewal_failures": renewal_failures, "failed_attempts": failed_attempts,
               "certificate_rows": certificates}),
    );
    report.add(
        "renewal",
        "renewal round trip (key pair, CSR → certificate, stored)",
        Spread::of(&round_trips)
            .map(|s| s.text())
            .unwrap_or_default(),
        json!(Spread::of(&round_trips).map(|s| s.json())),
    );
    report.add(
        "renewal",
        "reconnect handshake with the new certificate",
        Spread::of(&handshakes)
            .map(|s| s.text())
            .unwrap_or_default(),
        json!(Spread::of(&handshakes).map(|s| s.json())),
    );
    fleet.stop().await;
    if renewal_failures > 0 || failed_attempts > 0 {
        bail!("{renewal_failures} renewals and {failed_attempts} connection attempts failed");
    }
    Ok(json!({"agents": agents, "spread_secs": spread_secs, "endpoints": connecting.endpoints}))
}

/// The real agent binary, enrolled and connected: its memory after `secs`, and its size.
async fn footprint(report: &mut Report, secs: u64) -> anyhow::Result<Value> {
    let setup = Setup::new(Liveness::default(), None).await?;
    let agent_bin = plane::sibling_binary("sensei-agent")?;
    let (status, server) = setup
        .post(
            "/v1/servers",
            json!({"name": "footprint", "host": "127.0.0.1", "transport": "agent"}),
        )
        .await?;
    if status != 201 {
        bail!("creating the server failed: {status} {server}");
    }
    let state = plane::open_tempdir("sensei-loadgen-agent-")?;
    let enroll = std::process::Command::new(&agent_bin)
        .args(["enroll", "--control-plane"])
        .arg(server["agent_endpoint"].as_str().context("endpoint")?)
        .arg("--token")
        .arg(server["enrollment_token"].as_str().context("token")?)
        .arg("--ca-fingerprint")
        .arg(server["ca_fingerprint"].as_str().context("fingerprint")?)
        .arg("--state-dir")
        .arg(state.path())
        .output()?;
    if !enroll.status.success() {
        bail!("enroll failed: {}", String::from_utf8_lossy(&enroll.stderr));
    }
    let mut agent = std::process::Command::new(&agent_bin)
        .arg("run")
        .arg("--state-dir")
        .arg(state.path())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        peak = peak.max(plane::proc_rss_kib(agent.id()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss = plane::proc_rss_kib(agent.id());
    let connected: Value = setup
        .http
        .get(format!(
            "{}/v1/servers/{}",
            setup.base(),
            server["id"].as_str().unwrap_or_default()
        ))
        .header("cookie", &setup.cookie)
        .send()
        .await?
        .json()
        .await?;
    let _ = agent.kill();
    let _ = agent.wait();
    if connected["agent"]["connected"] != true {
        bail!("the agent was not connected at the end: {connected}");
    }
    let size = std::fs::metadata(&agent_bin)?.len();
    report.add(
        "footprint",
        "agent idle RSS",
        format!(
            "{:.1} MiB after {secs} s connected (peak {:.1} MiB)",
            mib(rss),
            mib(peak)
        ),
        json!({"rss_kib": rss, "peak_kib": peak, "secs": secs}),
    );
    report.add(
        "footprint",
        "agent binary (stripped release)",
        format!("{:.1} MiB", size as f64 / (1024.0 * 1024.0)),
        json!({"bytes": size}),
    );
    Ok(json!({"secs": secs}))
}

fn handshakes(report: &mut Report, rounds: u32) -> anyhow::Result<Value> {
    let cost = sensei_certs::handshake_cost::measure(rounds)?;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    report.add(
        "handshakes",
        "full mutual-TLS handshake, CPU per side",
        format!(
            "server {:.0} µs, client {:.0} µs (mean of {}): {:.0} handshakes/s per core for the \
             server alone, {:.0}/s per core with both sides on it",
            micros(cost.server),
            micros(cost.client),
            cost.rounds,
            cost.server_per_core_per_sec(),
            1.0 / (cost.server + cost.client).as_secs_f64()
        ),
        json!({"server_us": micros(cost.server), "client_us": micros(cost.client),
               "server_per_core_per_sec": cost.server_per_core_per_sec()}),
    );
    Ok(json!({"rounds": rounds}))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = PLANE_LOG.set(cli.plane_log.clone());
    sensei_certs::tls::install_default_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    let mut report = Report::default();
    let meta = runtime.block_on(async {
        match cli.command {
            Scenario::Fleet(options) => fleet_scenarios(&mut report, options).await,
            Scenario::Footprint { secs } => footprint(&mut report, secs).await,
            Scenario::Logins(options) => logins::run(&mut report, options).await,
            Scenario::Renewals(options) => renewals(&mut report, options).await,
            Scenario::Replicas(options) => replicas::run(&mut report, options).await,
            Scenario::Soak(options) => soak::run(&mut report, options).await,
            Scenario::Handshakes { rounds } => handshakes(&mut report, rounds),
        }
    })?;
    if let Some(path) = cli.json {
        let meta = json!({
            "run": meta,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&report.json(meta))?)?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
