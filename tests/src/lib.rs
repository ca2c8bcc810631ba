//! The end-to-end test harness.
//!
//! - [`cluster`]: one throwaway PostgreSQL cluster per test binary, started from the system's
//!   binaries in a temp dir (as the `postgres` user when we are root) and removed at exit;
//!   every test gets a database of its own, so tests run in parallel.
//! - [`TestPlane`]: a control plane started in-process on a random loopback port, with an
//!   HTTPS client that trusts its CA.

#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, OnceLock};

use sensei_control_plane::secrets::field_crypto::FieldKeys;
use sensei_control_plane::store::postgres_cluster::{ClusterOptions, PostgresCluster};
use sensei_control_plane::{ControlPlane, DatabaseSource, ServeOptions};
use serde_json::Value;

pub mod browser;
pub mod peers;

/// A loopback port for a server a test starts (sshd, chromedriver, named, rsyslog, a
/// replica's listeners, ...), free for TCP and UDP.
///
/// Binding port 0 and handing the number on leaves a window in which the kernel may give the
/// same port to someone else, most often as the source port of an outgoing connection, which a
/// busy parallel run makes all the time. So ports come from below Linux's ephemeral range
/// (32768–60999), where the kernel never picks one by itself, each one handed out once per
/// test process (a counter from a random start, so concurrent test processes seldom walk the
/// same numbers), and checked free before they are given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const HIGH: u32 = 32_768;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let next = NEXT.get_or_init(|| AtomicU32::new(rand::random::<u32>() % (HIGH - LOW)));
    for _ in 0..(HIGH - LOW) {
        let port = (LOW + next.fetch_add(1, Ordering::Relaxed) % (HIGH - LOW)) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {HIGH}");
}

struct SharedCluster {
    cluster: PostgresCluster,
    _dir: tempfile::TempDir,
}

static CLUSTER: OnceLock<SharedCluster> = OnceLock::new();

extern "C" fn stop_cluster_at_exit() {
    if let Some(shared) = CLUSTER.get() {
        shared.cluster.stop();
        let _ = std::fs::remove_dir_all(
            shared
                .cluster
                .root()
                .parent()
                .unwrap_or(shared.cluster.root()),
        );
    }
}

/// A temp dir the `postgres` user can enter (tempfile makes 0700 directories).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sensei-test-")
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod temp dir");
    dir
}

/// The shared cluster of this test binary, started on first use.
pub fn cluster() -> &'static PostgresCluster {
    &CLUSTER
        .get_or_init(|| {
            sensei_certs::tls::install_default_provider();
            let dir = open_tempdir();
            let cluster = PostgresCluster::start(
                &dir.path().join("pg"),
                &ClusterOptions {
                    throwaway: true,
                    ..ClusterOptions::default()
                },
            )
            .expect("start the test PostgreSQL cluster");
            // SAFETY: registering a plain extern "C" function with no captured state.
            unsafe {
                libc::atexit(stop_cluster_at_exit);
            }
            SharedCluster { cluster, _dir: dir }
        })
        .cluster
}

/// The role test control planes serve as (cluster-wide; its rights are granted per database).
pub const APP_ROLE: &str = "sensei_app";

/// Creates an empty database on the shared cluster and returns its connection string, as the
/// cluster's superuser: the owner role that runs migrations (and, in tests, tampers).
/// [`app_conninfo`] gives the application role's string for the same database.
pub async fn fresh_database() -> String {
    let cluster = cluster();
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (client, conn) =
        tokio_postgres::connect(&cluster.conninfo("postgres"), tokio_postgres::NoTls)
            .await
            .expect("connect to the test cluster");
    tokio::spawn(conn);
    // Tests create databases in parallel: a concurrent CREATE ROLE may fail either way.
    client
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .await
        .expect("create the application role");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    cluster.conninfo(&name)
}

/// The application role's connection string for the database `owner_conninfo` names.
pub fn app_conninfo(owner_conninfo: &str) -> String {
    assert!(owner_conninfo.contains("user=postgres"), "{owner_conninfo}");
    owner_conninfo.replace("user=postgres", &format!("user={APP_ROLE}"))
}

/// Connects straight to a test database, bypassing the control plane (to inspect rows, or
/// to tamper with them the way a database administrator could).
pub async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}

/// The field key of this test process (the text, for commands run as a child process).
pub fn test_field_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(FieldKeys::generate_key)
}

/// Field keys for one control plane (each instance holds its own audit ring).
pub fn test_keys() -> Arc<FieldKeys> {
    Arc::new(FieldKeys::parse(test_field_key()).expect("generated key parses"))
}

/// A control plane on a random port, on its own database.
pub struct TestPlane {
    pub plane: ControlPlane,
    pub conninfo: String,
    pub http: reqwest::Client,
    pub base: String,
    pub data_dir: tempfile::TempDir,
    pub keys: Arc<FieldKeys>,
}

impl TestPlane {
    pub async fn start() -> Self {
        let conninfo = fresh_database().await;
        Self::start_on(conninfo, test_keys()).await
    }

    /// Starts on an existing database (a restart, or a second replica).
    pub async fn start_on(conninfo: String, keys: Arc<FieldKeys>) -> Self {
        Self::start_at(conninfo, keys, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts on an existing database with the agent gateway on `agent_addr`.
    pub async fn start_at(conninfo: String, keys: Arc<FieldKeys>, agent_addr: SocketAddr) -> Self {
        Self::start_configured(conninfo, keys, agent_addr, |_| {}).await
    }

    /// Starts with options adjusted by `adjust`.
    pub async fn start_configured(
        conninfo: String,
        keys: Arc<FieldKeys>,
        agent_addr: SocketAddr,
        adjust: impl FnOnce(&mut ServeOptions),
    ) -> Self {
        let (options, data_dir) = Self::options(&conninfo, keys.clone(), agent_addr, adjust);
        let plane = ControlPlane::start(options)
            .await
            .expect("control plane starts");
        let http = api_client(plane.ca_pem(), plane.public_url());
        let base = format!("https://localhost:{}", plane.api_addr().port());
        Self {
            plane,
            conninfo,
            http,
            base,
            data_dir,
            keys,
        }
    }

    /// The options a test plane starts with (adjusted by `adjust`), and its data directory:
    /// for a test of a start that must fail.
    pub fn options(
        conninfo: &str,
        keys: Arc<FieldKeys>,
        agent_addr: SocketAddr,
        adjust: impl FnOnce(&mut ServeOptions),
    ) -> (ServeOptions, tempfile::TempDir) {
        sensei_certs::tls::install_default_provider();
        let data_dir = open_tempdir();
        let mut options = ServeOptions {
            pool_size: 8,
            agent_addr,
            agent_heartbeat: std::time::Duration::from_secs(1),
            dispatch_timeout: std::time::Duration::from_secs(60),
            ..ServeOptions::new(
                data_dir.path().to_owned(),
                DatabaseSource::Url(app_conninfo(conninfo)),
                keys,
            )
        };
        options.database_owner_url = Some(conninfo.to_owned());
        // Tests make their tenants by signing up; the closed default has tests of its own.
        options.signup = sensei_control_plane::identity::signup::SignupPolicy::Open;
        adjust(&mut options);
        (options, data_dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A direct database connection.
    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.conninfo).await
    }

    /// Signs up a new account; returns the session cookie and the signup answer.
    pub async fn signup(&self, email: &str, password: &str) -> (String, Value) {
        let response = self
            .http
            .post(self.url("/v1/auth/signup"))
            .json(
                &serde_json::json!({"email": email, "password": password, "account_name": "Acme"}),
            )
            .send()
            .await
            .expect("signup request");
        assert_eq!(response.status(), 201, "signup failed");
        let cookie = session_cookie(&response).expect("signup sets a cookie");
        (cookie, response.json().await.expect("json"))
    }

    /// Signs in; returns the cookie.
    pub async fn login(&self, email: &str, password: &str) -> String {
        let response = self
            .http
            .post(self.url("/v1/auth/login"))
            .json(&serde_json::json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login request");
        assert_eq!(response.status(), 200, "login failed");
        session_cookie(&response).expect("login sets a cookie")
    }

    /// GET with a session cookie, returning status and JSON body.
    pub async fn get(&self, path: &str, cookie: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .header("cookie", cookie)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with a session cookie.
    pub async fn post(&self, path: &str, cookie: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("cookie", cookie)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The one number a `SELECT count(*) …` answers.
    pub async fn count(&self, sql: &str) -> i64 {
        self.db()
            .await
            .query_one(sql, &[])
            .await
            .expect("count")
            .get(0)
    }

    /// PATCH JSON with a session cookie.
    pub async fn patch(&self, path: &str, cookie: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .patch(self.url(path))
            .header("cookie", cookie)
            .json(&body)
            .send()
            .await
            .expect("patch");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET with an API key.
    pub async fn get_with_key(&self, path: &str, key: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The /metrics page.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }

    /// A gauge or counter from /metrics (without labels).
    pub async fn metric(&self, name: &str) -> f64 {
        sensei_control_plane::app::metrics::unlabelled_value(&self.metrics_text().await, name)
            .unwrap_or_else(|| panic!("{name} is not in /metrics"))
    }

    /// Every (METHOD, path template) of the plane's OpenAPI document.
    pub async fn documented_routes(&self) -> Vec<(String, String)> {
        let doc: Value = self
            .http
            .get(self.url("/openapi.json"))
            .send()
            .await
            .expect("openapi")
            .json()
            .await
            .expect("json");
        let mut routes = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("item").keys() {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
        routes
    }

    /// Audit actions of the whole database, oldest first.
    pub async fn audit_actions(&self) -> Vec<String> {
        self.db()
            .await
            .query("SELECT action FROM audit_log ORDER BY id", &[])
            .await
            .expect("audit query")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// An HTTPS client trusting the plane's CA that sends `Origin: <public_url>` as the plane's
/// own pages would (a cookie request from any other origin is refused).
pub fn api_client(ca_pem: &str, public_url: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ORIGIN,
        public_url.parse().expect("origin header"),
    );
    client_builder(ca_pem)
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// An HTTPS client trusting the plane's CA that sends no `Origin` (curl, scripts).
pub fn client_without_origin(ca_pem: &str) -> reqwest::Client {
    client_builder(ca_pem).build().expect("http client")
}

fn client_builder(ca_pem: &str) -> reqwest::ClientBuilder {
    let tls = sensei_certs::tls::client_config_trusting(ca_pem).expect("client tls");
    reqwest::Client::builder().use_preconfigured_tls(tls)
}

/// The `name=value` of the session cookie a response sets.
pub fn session_cookie(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("sensei_session="))
        .and_then(|v| v.split(';').next())
        .map(str::to_owned)
}

/// The error code of an API error body.
pub fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// The `sensei-control-plane` executable built alongside this test binary
/// (`cargo test --workspace` builds it).
pub fn control_plane_binary() -> std::path::PathBuf {
    workspace_binary("sensei-control-plane")
}

/// An executable of the workspace (`sensei-control-plane`, `sensei-agent`, `sensei`), built
/// alongside this test binary by `cargo test --workspace`.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        bin.display()
    );
    bin
}

/// A session driven by the test with an enrolled agent's identity, for what no real agent
/// would send. Dropping it ends the session (the control stream is held here).
pub struct DrivenSession {
    pub endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub control: (quinn::SendStream, quinn::RecvStream),
    /// What the control plane answered the hello with, if anything within 5 s.
    pub welcome: Option<sensei_shared::protocol::ControlMessage>,
}

/// Opens a job stream on `connection` and polls, as an agent that pinned nothing yet: the
/// stream and the control plane's first answer within 20 s (a job, once one is queued).
pub async fn poll_on(
    connection: &quinn::Connection,
) -> (
    quinn::SendStream,
    quinn::RecvStream,
    Option<sensei_shared::protocol::ControlMessage>,
) {
    use sensei_shared::codec::io::{read_frame, write_frame};
    use sensei_shared::protocol::AgentMessage;
    let (mut send, mut recv) = connection.open_bi().await.expect("job stream");
    write_frame(
        &mut send,
        &AgentMessage::Poll {
            highest_sequence: 0,
        },
    )
    .await
    .expect("poll");
    let answer = tokio::time::timeout(std::time::Duration::from_secs(20), read_frame(&mut recv))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    (send, recv, answer)
}

/// Connects to the gateway `identity` names, with its certificate, and says hello as
/// `version`.
pub async fn driven_session(
    identity: &sensei_agent::identity::Identity,
    version: &str,
) -> DrivenSession {
    use sensei_shared::codec::io::{read_frame, write_frame};
    use sensei_shared::protocol::{AgentMessage, ControlMessage, ALPN};
    let verifier = sensei_certs::tls::verifier_trusting(&identity.ca_pem).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(
        verifier,
        Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
        ALPN,
    )
    .expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let gateway = tokio::net::lookup_host(&identity.meta.control_plane)
        .await
        .expect("gateway address")
        .next()
        .expect("an address");
    let host = identity
        .meta
        .control_plane
        .rsplit_once(':')
        .map_or("localhost", |(host, _)| host)
        .to_owned();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connection = endpoint
        .connect_with(config, gateway, &host)
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("control stream");
    write_frame(
        &mut send,
        &AgentMessage::Hello {
            server_id: identity.meta.server_id,
            agent_version: version.to_owned(),
        },
    )
    .await
    .expect("hello");
    let welcome = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        read_frame::<ControlMessage, _>(&mut recv),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .flatten();
    DrivenSession {
        endpoint,
        connection,
        control: (send, recv),
        welcome,
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns whether it held.
#[must_use = "a condition that did not hold must fail the test"]
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An agent enrolled against a test control plane, running in this process.
pub struct TestAgent {
    pub state: sensei_agent::identity::StateDir,
    pub server_id: uuid::Uuid,
    pub stop: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<
        Result<sensei_agent::session::RunOutcome, sensei_agent::session::RunError>,
    >,
    _dir: tempfile::TempDir,
}

impl TestPlane {
    /// `HOST:PORT` of the agent gateway (an address the certificate names).
    pub fn agent_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.plane.agent_addr().port())
    }

    /// Creates an agent server; returns its id and enrollment token.
    pub async fn create_agent_server(
        &self,
        cookie: &str,
        name: &str,
        labels: Value,
    ) -> (uuid::Uuid, String) {
        let (status, body) = self
            .post(
                "/v1/servers",
                cookie,
                serde_json::json!({"name": name, "host": format!("{name}.example"), "transport": "agent", "labels": labels}),
            )
            .await;
        assert_eq!(status, 201, "create server: {body}");
        let id = body["id"].as_str().expect("id").parse().expect("uuid");
        (
            id,
            body["enrollment_token"].as_str().expect("token").to_owned(),
        )
    }

    /// Options to enroll with `token` into a fresh state directory.
    pub fn enroll_options(
        &self,
        token: &str,
        dir: &std::path::Path,
    ) -> sensei_agent::enroll::EnrollOptions {
        sensei_agent::enroll::EnrollOptions {
            control_plane: self.agent_endpoint(),
            token: token.to_owned(),
            ca_fingerprint: self.plane.ca_fingerprint(),
            expected_server_id: None,
            state_dir: sensei_agent::identity::StateDir::new(dir.join("state")),
        }
    }

    /// Creates a server, enrolls an agent for it and starts the agent's loop.
    pub async fn start_agent(&self, cookie: &str, name: &str) -> TestAgent {
        self.start_agent_with(cookie, name, sensei_agent::jobs::JobPolicy::default())
            .await
    }

    /// Like [`TestPlane::start_agent`], with this server's own job policy.
    pub async fn start_agent_with(
        &self,
        cookie: &str,
        name: &str,
        policy: sensei_agent::jobs::JobPolicy,
    ) -> TestAgent {
        self.start_labelled_agent(cookie, name, serde_json::json!({}), policy)
            .await
    }

    /// Like [`TestPlane::start_agent_with`], for a server with these labels.
    pub async fn start_labelled_agent(
        &self,
        cookie: &str,
        name: &str,
        labels: Value,
        policy: sensei_agent::jobs::JobPolicy,
    ) -> TestAgent {
        let (server_id, token) = self.create_agent_server(cookie, name, labels).await;
        let dir = open_tempdir();
        let options = self.enroll_options(&token, dir.path());
        sensei_agent::enroll::enroll(&options)
            .await
            .expect("enroll");
        let state = options.state_dir.clone();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let run_state = state.clone();
        let task =
            tokio::spawn(
                async move { sensei_agent::session::run(&run_state, policy, stopped).await },
            );
        TestAgent {
            state,
            server_id,
            stop,
            task,
            _dir: dir,
        }
    }

    /// Creates an SSH server reached through `sshd` as [`DEPLOY_USER`], with `extra` fields
    /// (auth, password, host_key) in the request; installs the key it was given, if any, in
    /// `sshd`'s authorized_keys. Returns the API's answer.
    pub async fn create_ssh_server(
        &self,
        cookie: &str,
        name: &str,
        sshd: &SshServer,
        extra: Value,
    ) -> Value {
        let mut body = serde_json::json!({"name": name, "host": "127.0.0.1", "port": sshd.port, "username": DEPLOY_USER, "transport": "ssh"});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, server) = self.post("/v1/servers", cookie, body).await;
        assert_eq!(status, 201, "{server}");
        if let Some(line) = server["public_key"].as_str() {
            sshd.set_authorized_keys(&format!("{line}\n"));
        }
        server
    }

    /// Queues a deploy of `project` at `git_ref` to `server` and waits until it has ended;
    /// returns its JSON.
    pub async fn deploy_and_wait(
        &self,
        cookie: &str,
        project: &str,
        server: &str,
        git_ref: &str,
    ) -> Value {
        let (status, d) = self
            .post(
                "/v1/deployments",
                cookie,
                serde_json::json!({"project_id": project, "server_id": server, "ref": git_ref}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        self.wait_deployment(cookie, d["id"].as_str().expect("id"))
            .await
    }

    /// The deployment's log as (stream, line) pairs, the stream as the API names it
    /// (`sensei`, `stdout`, `stderr`).
    pub async fn log_lines(&self, cookie: &str, deployment: &Value) -> Vec<(String, String)> {
        let id = deployment["id"].as_str().expect("id");
        let (status, log) = self
            .get(&format!("/v1/deployments/{id}/logs"), cookie)
            .await;
        assert_eq!(status, 200, "{log}");
        log["lines"]
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| {
                let text = |key: &str| l[key].as_str().unwrap_or("").to_owned();
                (text("stream"), text("line"))
            })
            .collect()
    }

    /// Waits until the deployment has ended; returns its JSON.
    pub async fn wait_deployment(&self, cookie: &str, id: &str) -> Value {
        let mut last = Value::Null;
        // Up to 90 s: an upper bound for a loaded CI machine, not a timing.
        for _ in 0..1800 {
            let (_, body) = self.get(&format!("/v1/deployments/{id}"), cookie).await;
            if body["status"] == "succeeded" || body["status"] == "failed" {
                return body;
            }
            last = body;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("deployment {id} did not end: {last}");
    }

    /// Turns TOTP on for the signed-in user (enrolls and confirms it); returns the secret an
    /// authenticator would hold.
    pub async fn enable_totp(&self, cookie: &str) -> Vec<u8> {
        let (status, enrolled) = self
            .post("/v1/auth/mfa/totp", cookie, serde_json::json!({}))
            .await;
        assert_eq!(status, 201, "{enrolled}");
        let secret = base32_decode(enrolled["secret"].as_str().expect("secret"));
        let (status, body) = self
            .post(
                "/v1/auth/mfa/totp/confirm",
                cookie,
                serde_json::json!({"code": totp_code(&secret, 0)}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        secret
    }

    /// Whether the API shows the server's agent as connected.
    pub async fn agent_connected(&self, cookie: &str, server_id: uuid::Uuid) -> bool {
        let (_, body) = self.get(&format!("/v1/servers/{server_id}"), cookie).await;
        body["agent"]["connected"] == true
    }
}

impl TestAgent {
    /// Starts the agent loop again on the same identity (after a stop).
    pub fn restart(&mut self) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let state = self.state.clone();
        self.stop = stop;
        self.task = tokio::spawn(async move {
            sensei_agent::session::run(&state, sensei_agent::jobs::JobPolicy::default(), stopped)
                .await
        });
    }
}

/// Where `<app>/current` points (`releases/<id>`), or nothing when it does not exist.
pub fn current_link(app: &std::path::Path) -> String {
    std::fs::read_link(app.join("current"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A git repository with `index.html` committed once per version; returns its path.
pub fn git_repo(dir: &std::path::Path, versions: &[&str]) -> std::path::PathBuf {
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    git(&repo, &["init", "-q", "-b", "main"]);
    for v in versions {
        git_commit(&repo, v);
    }
    repo
}

/// Commits `index.html` with `content`; returns the commit id.
pub fn git_commit(repo: &std::path::Path, content: &str) -> String {
    std::fs::write(repo.join("index.html"), content).expect("write");
    git(repo, &["add", "."]);
    git(repo, &["commit", "-q", "-m", content]);
    git(repo, &["rev-parse", "HEAD"])
}

/// Runs git in `dir` (as the tests' author); returns its trimmed output.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "safe.directory=*",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The non-root user SSH deploys log in as in the tests.
pub const DEPLOY_USER: &str = "sensei-deploy";
/// Its password, for the legacy password flow.
pub const DEPLOY_PASSWORD: &str = "sensei-test-login-pw";

/// Creates the deploy user once (tests run as root, as CI does) and returns its uid and gid.
pub fn deploy_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        let exists = std::process::Command::new("id")
            .arg(DEPLOY_USER)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !exists {
            let out = std::process::Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/sh", DEPLOY_USER])
                .output()
                .expect("useradd (the SSH tests run as root)");
            assert!(
                out.status.success(),
                "useradd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut chpasswd = std::process::Command::new("chpasswd")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("chpasswd");
        use std::io::Write;
        chpasswd
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{DEPLOY_USER}:{DEPLOY_PASSWORD}\n").as_bytes())
            .expect("write");
        assert!(chpasswd.wait().expect("chpasswd").success());
        let id = |flag: &str| -> u32 {
            let out = std::process::Command::new("id")
                .args([flag, DEPLOY_USER])
                .output()
                .expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        // Test repositories belong to root; git refuses other users' repositories unless told
        // otherwise. This is the test user's own configuration, nobody else's.
        let gitconfig = std::path::PathBuf::from(format!("/home/{DEPLOY_USER}/.gitconfig"));
        std::fs::write(&gitconfig, "[safe]\n\tdirectory = *\n").expect("gitconfig");
        std::os::unix::fs::chown(&gitconfig, Some(uid), Some(gid)).expect("chown gitconfig");
        (uid, gid)
    })
}

/// Gives `path` (recursively) to the deploy user.
pub fn give_to_deploy_user(path: &std::path::Path) {
    let out = std::process::Command::new("chown")
        .args(["-R", &format!("{DEPLOY_USER}:{DEPLOY_USER}")])
        .arg(path)
        .output()
        .expect("chown");
    assert!(out.status.success());
}

/// A real OpenSSH server on a loopback port, with its own host key and authorized_keys.
pub struct SshServer {
    pub port: u16,
    pub host_key_public: String,
    authorized_keys: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SshServer {
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// An sshd with `extra` appended to its configuration (e.g. a `ForceCommand` that
    /// misbehaves).
    pub fn start_with(extra: &str) -> Self {
        Self::start_inner(extra, None)
    }

    /// An sshd whose logins see `disk` at `at`: it runs in a mount namespace of its own with
    /// `disk` bind-mounted there. Many of them on one machine are many servers with the same
    /// deploy path, each with its own disk (the fleet benchmarks).
    pub fn start_seeing(disk: &std::path::Path, at: &std::path::Path) -> Self {
        Self::start_inner("", Some((disk, at)))
    }

    /// The sshd listener's process id (its sessions are its children).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start_inner(extra: &str, mount: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        deploy_user();
        let dir = open_tempdir();
        let host_key = dir.path().join("host_key");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .output()
            .expect("ssh-keygen (openssh-client)");
        assert!(out.status.success());
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(&authorized_keys, "").expect("authorized_keys");
        std::fs::set_permissions(&authorized_keys, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let port = free_port();
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
                 PasswordAuthentication yes\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin no\nAllowUsers {DEPLOY_USER}\nMaxStartups 100\nLogLevel VERBOSE\n{extra}\n",
                host_key.display(),
                dir.path().join("sshd.pid").display(),
                authorized_keys.display()
            ),
        )
        .expect("sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("privilege separation directory");
        let log = std::fs::File::create(dir.path().join("sshd.log")).expect("log");
        let mut command = match mount {
            None => std::process::Command::new("/usr/sbin/sshd"),
            Some((disk, at)) => {
                let mut c = std::process::Command::new("unshare");
                // `exec`: the child is sshd itself, so dropping this kills it.
                c.args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    "mount --bind \"$0\" \"$1\" && shift && exec /usr/sbin/sshd \"$@\"",
                ])
                .arg(disk)
                .arg(at);
                c
            }
        };
        let child = command
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(log)
            .spawn()
            .expect("sshd (openssh-server; ./test installs it)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "sshd did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let host_key_public = std::fs::read_to_string(dir.path().join("host_key.pub"))
            .expect("host key")
            .trim()
            .to_owned();
        Self {
            port,
            host_key_public,
            authorized_keys,
            child,
            _dir: dir,
        }
    }

    /// Replaces authorized_keys with `content`.
    pub fn set_authorized_keys(&self, content: &str) {
        std::fs::write(&self.authorized_keys, content).expect("authorized_keys");
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undoes quoted-printable soft line breaks, as a mail client would (the token's line is
/// longer than the 76 characters a 7-bit body allows).
pub fn unfold(raw: &str) -> String {
    raw.replace("=\r\n", "")
        .replace("=\n", "")
        .replace("=3D", "=")
}

/// A real SMTP server (Python's aiosmtpd) on a loopback port, delivering into a maildir.
pub struct SmtpSink {
    pub port: u16,
    maildir: std::path::PathBuf,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SmtpSink {
    pub fn start() -> Self {
        let dir = open_tempdir();
        let maildir = dir.path().join("mail");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("smtpd.log")).expect("log");
        // SENSEI_TEST_PYTHON: the interpreter with Debian's python3-aiosmtpd (./test sets it).
        let python = std::env::var_os("SENSEI_TEST_PYTHON").unwrap_or_else(|| "python3".into());
        let child = std::process::Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("python3 -m aiosmtpd (./test installs python3-aiosmtpd)");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(15),
                "aiosmtpd did not start: {}",
                std::fs::read_to_string(dir.path().join("smtpd.log")).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self {
            port,
            maildir,
            child,
            _dir: dir,
        }
    }

    /// `smtp://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message delivered so far, raw (headers and body).
    pub fn messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.maildir.join("new")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// RFC 4648 base32, as an authenticator app reads the secret.
pub fn base32_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut out, mut buffer, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in text.bytes() {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base32") as u32;
        buffer = (buffer << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

/// The code an authenticator shows `offset` steps from now.
pub fn totp_code(secret: &[u8], offset: i64) -> String {
    let step =
        sensei_control_plane::identity::totp::step_at(chrono::Utc::now().timestamp()) + offset;
    format!(
        "{:06}",
        sensei_control_plane::identity::totp::hotp(secret, step as u64)
    )
}

/// Puts a trigger named `name` on the updates of `table` whose rows match `when` (over `OLD`
/// and `NEW`): each firing counts in the sequence `name`, which is not rolled back with its
/// statement, and the update is refused when `refuse` is set. What a test uses to make the
/// database fail one kind of write, and to see it tried. Dropped with
/// `DROP TRIGGER {name} ON {table}`.
pub async fn watch_updates(
    db: &tokio_postgres::Client,
    table: &str,
    name: &str,
    when: &str,
    refuse: bool,
) {
    let verdict = if refuse {
        "RAISE EXCEPTION 'refused by the test'"
    } else {
        "RETURN NEW"
    };
    db.batch_execute(&format!(
        "CREATE SEQUENCE {name}; \
         GRANT USAGE ON SEQUENCE {name} TO {APP_ROLE}; \
         CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM nextval('{name}'); {verdict}; END $$; \
         CREATE TRIGGER {name} BEFORE UPDATE ON {table} FOR EACH ROW \
         WHEN ({when}) EXECUTE FUNCTION {name}();"
    ))
    .await
    .expect("trigger on updates");
}

/// The rows of `deployments` a job's end changes (over `OLD` and `NEW`), for [`watch_updates`].
pub const JOB_ENDS: &str = "OLD.status = 'running' AND NEW.status <> 'running'";

/// Has the database refuse every job's end (the trigger `name` of [`watch_updates`]).
pub async fn refuse_job_ends(db: &tokio_postgres::Client, name: &str) {
    watch_updates(db, "deployments", name, JOB_ENDS, true).await;
}

/// Waits (up to a minute) until the trigger `name` of [`watch_updates`] fired more than
/// `times` times; answers how often it fired.
pub async fn fired_more_than(db: &tokio_postgres::Client, name: &str, times: i64) -> i64 {
    let mut fired = 0;
    for _ in 0..1200 {
        let row = db
            .query_one(&format!("SELECT last_value, is_called FROM {name}"), &[])
            .await
            .expect("sequence");
        fired = if row.get(1) { row.get::<_, i64>(0) } else { 0 };
        if fired > times {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    fired
}
