//! `sensei-control-plane quickstart`: the whole product on one machine with nothing
//! configured. It starts the control plane on the embedded database, with a development field
//! key kept in the data directory, and says loudly that this is not the production setup.
//! Then it signs up a demo account, enrolls a local agent (its own state directory), creates a
//! small git repository, and deploys it into `<data-dir>/deploy/demo` through the agent, over
//! the real API and the real QUIC connection.
//!
//! Every run on the same data directory reuses what the first one made: the demo sign-in is
//! kept in `quickstart-login.json` (mode 0600), and the server, its agent identity and the
//! project are found again by name instead of being added anew.
//!
//! With `--once` it exits 0 once that deploy has succeeded, printing the path of the `current`
//! link as its last line; otherwise it keeps serving so that you can try the API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::app::cli::{announce, serve_options, ServeArgs};
use crate::app::server::{prepare_data_dir, ControlPlane};
use crate::secrets::field_crypto::{FieldKeys, FIELD_KEY_ENV};

pub async fn run(args: &ServeArgs, data_dir: PathBuf, once: bool) -> anyhow::Result<i32> {
    prepare_data_dir(&data_dir)?;
    println!("Quickstart data directory: {}", data_dir.display());
    let keys = match FieldKeys::from_env() {
        Ok(keys) => keys,
        Err(crate::secrets::field_crypto::FieldKeyError::Missing) => {
            let (keys, path, created) = FieldKeys::load_or_create_dev_key(&data_dir)?;
            eprintln!(
                "WARNING: {FIELD_KEY_ENV} is not set; quickstart {} a DEVELOPMENT field key at {} \
                 (mode 0600). Never run production this way: set {FIELD_KEY_ENV} from your \
                 secret store and keep it out of the data directory.",
                if created { "created" } else { "is using" },
                path.display()
            );
            keys
        }
        Err(e) => return Err(e.into()),
    };
    let mut options = serve_options(args, data_dir.clone(), keys, once);
    // Development mode: without SMTP, reset and invitation emails go to the log.
    options.mail.log_when_unset = true;
    let smtp = options.mail.smtp_url.is_some();
    let keys = options.field_keys.clone();
    let plane = ControlPlane::start(options).await?;
    announce(&plane, &data_dir);
    let demo = Demo::new(&plane, &data_dir, keys)?;
    let result = demo.run(&plane).await;
    let (agent_stop, agent_task, current) = match result {
        Ok(parts) => parts,
        Err(e) => {
            plane.shutdown().await;
            return Err(e);
        }
    };
    if !once {
        println!();
        println!("The control plane keeps running; Ctrl-C stops it, its agent and its database.");
        if smtp {
            println!("Password reset and invitation emails go out through SENSEI_SMTP_URL.");
        } else {
            println!(
                "No SMTP configured (SENSEI_SMTP_URL): password reset and invitation emails are \
                 written to this log instead of being sent (development mode only)."
            );
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = agent_stop.send(true);
    let _ = agent_task.await;
    plane.shutdown().await;
    // The last line: where the deployed application is.
    println!("{}", current.display());
    Ok(0)
}

/// The demo server's and project's names, by which later runs find them.
const DEMO_SERVER: &str = "this-machine";
const DEMO_PROJECT: &str = "demo";
/// The demo account's sign-in, kept for the next run.
const DEMO_LOGIN_FILE: &str = "quickstart-login.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct KeptLogin {
    email: String,
    password: String,
}

struct DemoLogin {
    email: String,
    password: String,
    cookie: String,
}

/// The quickstart's deploy user, created (as a system user without a login) on first use.
const QUICKSTART_DEPLOY_USER: &str = "sensei-quickstart";

fn quickstart_deploy_user(data_dir: &Path) -> anyhow::Result<sensei_agent::policy::DeployUser> {
    if let Ok(user) = sensei_agent::policy::DeployUser::lookup(QUICKSTART_DEPLOY_USER) {
        return Ok(user);
    }
    let home = data_dir.join("deploy-home");
    let out = std::process::Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg("--home-dir")
        .arg(&home)
        .arg(QUICKSTART_DEPLOY_USER)
        .output()
        .context("useradd (creating the quickstart's unprivileged deploy user)")?;
    anyhow::ensure!(
        out.status.success(),
        "cannot create the deploy user {QUICKSTART_DEPLOY_USER}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let user = sensei_agent::policy::DeployUser::lookup(QUICKSTART_DEPLOY_USER)?;
    std::fs::create_dir_all(&home)?;
    chown_tree(&home, &user)?;
    Ok(user)
}

/// Gives `path` and everything below it to `user` (without following symlinks).
fn chown_tree(path: &Path, user: &sensei_agent::policy::DeployUser) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

/// `SHA256:…` of the identity's certificate, as the API shows it.
fn identity_fingerprint(identity: &sensei_agent::identity::Identity) -> Option<String> {
    let certs = sensei_certs::tls::certs_from_pem(&identity.cert_pem).ok()?;
    Some(sensei_certs::Fingerprint::of_der(certs.first()?.as_ref()).to_string())
}

/// Writes a file only its owner can read (created 0600, never widened in between).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

struct Demo {
    http: reqwest::Client,
    base: String,
    data_dir: PathBuf,
    /// The demo account is made as the operator would (signup stays closed).
    pool: deadpool_postgres::Pool,
    keys: std::sync::Arc<FieldKeys>,
}

type AgentHandle = (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
    PathBuf,
);

impl Demo {
    fn new(
        plane: &ControlPlane,
        data_dir: &Path,
        keys: std::sync::Arc<FieldKeys>,
    ) -> anyhow::Result<Self> {
        let tls = sensei_certs::tls::client_config_trusting(plane.ca_pem())?;
        Ok(Self {
            // Cookie requests must come from the plane's origin, as its pages' would.
            http: reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .default_headers(reqwest::header::HeaderMap::from_iter([(
                    reqwest::header::ORIGIN,
                    plane.public_url().parse()?,
                )]))
                .build()?,
            base: format!("https://{}", plane.api_addr()),
            data_dir: data_dir.to_owned(),
            pool: plane.pool().clone(),
            keys,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: Option<&str>,
        body: Option<Value>,
    ) -> anyhow::Result<(Value, Option<String>)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(c) = cookie {
            request = request.header(http::header::COOKIE, c);
        }
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await?;
        let status = response.status();
        let cookie = response
            .headers()
            .get(http::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        let value: Value = response.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{path}: {status} {value}");
        Ok((value, cookie))
    }

    async fn run(&self, plane: &ControlPlane) -> anyhow::Result<AgentHandle> {
        let (health, _) = self
            .call(reqwest::Method::GET, "/healthz", None, None)
            .await?;
        anyhow::ensure!(health["database"] == "ok", "health check: {health}");

        let login = self.sign_in().await?;
        let cookie = login.cookie.clone();
        println!(
            "API: {}  (sign in: {} / {})",
            self.base, login.email, login.password
        );
        // The same listener serves the dashboard; the browser will not know the quickstart's
        // own CA, so it says where that is.
        println!(
            "Dashboard: {}/  (same sign-in; the certificate is issued by the quickstart's CA, {})",
            self.base,
            self.data_dir.join("ca.pem").display()
        );

        let server_id = self.enrolled_server(plane, &cookie).await?;
        let state = sensei_agent::identity::StateDir::new(self.data_dir.join("agent"));
        let deploy_root = self.data_dir.join("deploy");
        std::fs::create_dir_all(&deploy_root)?;
        let repo = self.demo_repository()?;
        // As root, the demo deploys as an unprivileged user of its own, never as root, like
        // the packaged agent does with sensei-deploy.
        let deploy_user = if crate::store::postgres_cluster::running_as_root() {
            let user = quickstart_deploy_user(&self.data_dir)?;
            for path in [&deploy_root, &repo] {
                chown_tree(path, &user)?;
            }
            println!("deploys run as the unprivileged user {}", user.name);
            Some(user)
        } else {
            None
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let policy = sensei_agent::jobs::JobPolicy {
            allowed_roots: vec![deploy_root.clone()],
            deploy_user,
            ..Default::default()
        };
        let agent_task = tokio::spawn(async move {
            if let Err(e) = sensei_agent::session::run(&state, policy, stopped).await {
                eprintln!("quickstart agent: {e}");
            }
        });

        let deploy_path = deploy_root.join("demo");
        let project_id = self.demo_project(&cookie, &repo, &deploy_path).await?;
        let (deployment, _) = self
            .call(
                reqwest::Method::POST,
                "/v1/deployments",
                Some(&cookie),
                Some(json!({"project_id": project_id, "server_id": server_id, "ref": "main"})),
            )
            .await?;
        let id = deployment["id"]
            .as_str()
            .context("deployment id")?
            .to_owned();
        let mut done = Value::Null;
        for _ in 0..600 {
            let (d, _) = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/deployments/{id}"),
                    Some(&cookie),
                    None,
                )
                .await?;
            if d["status"] == "succeeded" || d["status"] == "failed" {
                done = d;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (log, _) = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/deployments/{id}/logs"),
                Some(&cookie),
                None,
            )
            .await?;
        for line in log["lines"].as_array().into_iter().flatten() {
            println!("  | {}", line["line"].as_str().unwrap_or(""));
        }
        anyhow::ensure!(
            done["status"] == "succeeded",
            "the demo deploy did not succeed: {done}"
        );
        let current = deploy_path.join("current");
        println!(
            "deployed commit {} as release {}",
            done["commit"].as_str().unwrap_or("?"),
            done["release_id"].as_str().unwrap_or("?")
        );
        println!("The demo application is live at {}", current.display());
        self.print_next_steps(&login);
        Ok((stop, agent_task, current))
    }

    /// Signs in with the kept demo login, or creates the demo account on the first run (or
    /// when the kept login no longer works, e.g. after the database was removed).
    async fn sign_in(&self) -> anyhow::Result<DemoLogin> {
        let path = self.data_dir.join(DEMO_LOGIN_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(kept) = serde_json::from_str::<KeptLogin>(&text) {
                let attempt = self
                    .call(
                        reqwest::Method::POST,
                        "/v1/auth/login",
                        None,
                        Some(json!({"email": kept.email, "password": kept.password})),
                    )
                    .await;
                if let Ok((_, Some(cookie))) = attempt {
                    return Ok(DemoLogin {
                        email: kept.email,
                        password: kept.password,
                        cookie,
                    });
                }
                eprintln!(
                    "quickstart: the kept demo login in {} no longer works; creating a new \
                     demo account",
                    path.display()
                );
            }
        }
        let email = format!(
            "demo-{}@example.com",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        crate::identity::signup::create_owner(
            &self.pool,
            &self.keys,
            &email,
            "Quickstart",
            Some(password.clone()),
        )
        .await?;
        let (_, cookie) = self
            .call(
                reqwest::Method::POST,
                "/v1/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await?;
        let cookie = cookie.context("the demo login set no session cookie")?;
        let kept = serde_json::to_vec_pretty(&KeptLogin {
            email: email.clone(),
            password: password.clone(),
        })?;
        write_private(&path, &kept)
            .with_context(|| format!("keeping the demo login in {}", path.display()))?;
        Ok(DemoLogin {
            email,
            password,
            cookie,
        })
    }

    /// The demo server, with the local agent enrolled for it. An identity from an earlier
    /// run is kept while the control plane still holds its certificate as valid; otherwise
    /// the server gets a new enrollment token and the agent enrolls again.
    async fn enrolled_server(&self, plane: &ControlPlane, cookie: &str) -> anyhow::Result<String> {
        let state = sensei_agent::identity::StateDir::new(self.data_dir.join("agent"));
        let (servers, _) = self
            .call(reqwest::Method::GET, "/v1/servers", Some(cookie), None)
            .await?;
        let existing = servers["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == DEMO_SERVER && s["transport"] == "agent")
            .cloned();
        let token = match existing {
            None => {
                let (server, _) = self
                    .call(
                        reqwest::Method::POST,
                        "/v1/servers",
                        Some(cookie),
                        Some(json!({"name": DEMO_SERVER, "host": "localhost", "transport": "agent", "labels": {"env": "demo"}})),
                    )
                    .await?;
                let id = server["id"].as_str().context("server id")?.to_owned();
                let token = server["enrollment_token"].as_str().context("token")?;
                (id, token.to_owned())
            }
            Some(server) => {
                let id = server["id"].as_str().context("server id")?.to_owned();
                let valid = server["agent"]["certificate_fingerprint"].as_str();
                if let Some(mut identity) = state.load().ok().filter(|i| {
                    i.meta.server_id.to_string() == id
                        && valid.is_some_and(|v| identity_fingerprint(i).as_deref() == Some(v))
                }) {
                    // The same server and certificate: only the gateway's port may differ
                    // (--once listens on a free one).
                    identity.meta.control_plane = plane.agent_addr().to_string();
                    state.save(&identity)?;
                    println!(
                        "agent of server {id} reused (state in {})",
                        state.path().display()
                    );
                    return Ok(id);
                }
                let (enrollment, _) = self
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/servers/{id}/enrollment-token"),
                        Some(cookie),
                        None,
                    )
                    .await?;
                let token = enrollment["enrollment_token"].as_str().context("token")?;
                (id, token.to_owned())
            }
        };
        let (server_id, token) = token;
        sensei_agent::enroll::enroll(&sensei_agent::enroll::EnrollOptions {
            control_plane: plane.agent_addr().to_string(),
            token,
            ca_fingerprint: plane.ca_fingerprint(),
            expected_server_id: server_id.parse().ok(),
            state_dir: state.clone(),
        })
        .await
        .context("enrolling the local agent")?;
        println!(
            "agent enrolled as server {server_id} (state in {})",
            state.path().display()
        );
        Ok(server_id)
    }

    /// The demo project, created on the first run.
    async fn demo_project(
        &self,
        cookie: &str,
        repo: &Path,
        deploy_path: &Path,
    ) -> anyhow::Result<String> {
        let (projects, _) = self
            .call(reqwest::Method::GET, "/v1/projects", Some(cookie), None)
            .await?;
        if let Some(id) = projects["projects"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == DEMO_PROJECT)
            .and_then(|p| p["id"].as_str())
        {
            return Ok(id.to_owned());
        }
        let (project, _) = self
            .call(
                reqwest::Method::POST,
                "/v1/projects",
                Some(cookie),
                Some(json!({
                    "name": DEMO_PROJECT,
                    "repo_url": repo.display().to_string(),
                    "deploy_path": deploy_path.display().to_string(),
                    "shared_paths": ["storage/"],
                    "hooks": {"build": ["echo \"building $(cat VERSION)\""]},
                    "health_check": "test -s index.html",
                    "env": {"GREETING": "hello from Sensei"},
                })),
            )
            .await?;
        Ok(project["id"].as_str().context("project id")?.to_owned())
    }

    fn print_next_steps(&self, login: &DemoLogin) {
        let ca = self.data_dir.join("ca.pem");
        let jar = self.data_dir.join("cookies.txt");
        println!();
        println!("Next steps:");
        println!("  # sign in, then list the servers:");
        println!(
            "  curl --cacert {} -c {} -H 'content-type: application/json' \\\n       \
             -d '{{\"email\":\"{}\",\"password\":\"{}\"}}' {}/v1/auth/login",
            ca.display(),
            jar.display(),
            login.email,
            login.password,
            self.base
        );
        println!(
            "  curl --cacert {} -b {} {}/v1/servers",
            ca.display(),
            jar.display(),
            self.base
        );
        // The CLI pins the CA by fingerprint (docs/cli.md); this one is the quickstart's own.
        let fingerprint = std::fs::read_to_string(&ca)
            .ok()
            .and_then(|pem| sensei_certs::tls::first_cert_der(&pem).ok())
            .map(|der| sensei_certs::Fingerprint::of_der(&der).to_string());
        if let Some(fingerprint) = fingerprint {
            println!(
                "  # or with the command-line client (`cargo run -p sensei-cli --` in the source):"
            );
            println!(
                "  echo '{}' | sensei login {} --email {} --password-stdin --ca-fingerprint {fingerprint}",
                login.password, self.base, login.email
            );
            println!("  sensei servers list && sensei history {DEMO_PROJECT}");
        }
        println!(
            "  # every route: {}/openapi.json; the guides: README.md and docs/ in the source",
            self.base
        );
    }

    /// A small repository to deploy, made on first use.
    fn demo_repository(&self) -> anyhow::Result<PathBuf> {
        let repo = self.data_dir.join("demo-repo");
        if repo.join(".git").exists() {
            return Ok(repo);
        }
        std::fs::create_dir_all(&repo)?;
        std::fs::write(repo.join("index.html"), "<h1>Hello from Sensei</h1>\n")?;
        std::fs::write(repo.join("VERSION"), "1\n")?;
        for args in [
            vec!["init", "-q", "-b", "main"],
            vec!["add", "."],
            vec!["commit", "-q", "-m", "demo site"],
        ] {
            let out = std::process::Command::new("git")
                .args([
                    "-c",
                    "user.name=Sensei quickstart",
                    "-c",
                    "user.email=quickstart@example.com",
                ])
                .args(&args)
                .current_dir(&repo)
                .output()
                .context("git is required for the quickstart (apt-get install git)")?;
            anyhow::ensure!(
                out.status.success(),
                "git {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(repo)
    }
}
