//! Several control-plane replicas as real processes on one PostgreSQL: one is killed with
//! SIGKILL in the middle of a rollout; its agents are shown offline on the other replica, and
//! the rollout still finishes, with no deployment run twice and none lost. An agent that
//! comes back from a killed replica without the job it was running frees its server at its
//! first poll, not after the orphan grace.

use std::process::Stdio;
use std::time::Duration;

use sensei_control_plane::secrets::field_crypto::FieldKeys;
use sensei_e2e::{control_plane_binary, fresh_database, git_repo, open_tempdir};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

struct Replica {
    child: tokio::process::Child,
    fingerprint: String,
    _dir: tempfile::TempDir,
}

async fn replica(db: &str, key: &str, api: u16, agent: u16) -> Replica {
    let dir = open_tempdir();
    let mut child = tokio::process::Command::new(control_plane_binary())
        .env("DATABASE_URL", sensei_e2e::app_conninfo(db))
        .env("DATABASE_OWNER_URL", db)
        .env("SENSEI_SIGNUP", "open")
        .env("CODESENSEI_FIELD_KEY", key)
        .env_remove("SENSEI_DATA_DIR")
        .args(["--data-dir", &dir.path().display().to_string(), "serve"])
        .args([
            "--api-addr",
            &format!("127.0.0.1:{api}"),
            "--agent-addr",
            &format!("127.0.0.1:{agent}"),
        ])
        .args(["--agent-heartbeat-secs", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn a replica");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut fingerprint = String::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("replica did not start")
    {
        if let Some(fp) = line.strip_prefix("CA fingerprint: ") {
            fingerprint = fp.to_owned();
            break;
        }
    }
    assert!(fingerprint.starts_with("SHA256:"), "replica did not start");
    // Keep reading stdout so the replica never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Replica {
        child,
        fingerprint,
        _dir: dir,
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

impl Api {
    /// Whether the API shows server `id`'s agent as connected.
    async fn agent_connected(&self, id: &str) -> Option<bool> {
        self.call(reqwest::Method::GET, &format!("/v1/servers/{id}"), None)
            .await
            .1["agent"]["connected"]
            .as_bool()
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("cookie", &self.cookie);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Signs up through the replica whose API listens on `api_port`.
async fn sign_up(db: &str, api_port: u16) -> Api {
    let ca_pem = {
        let conn = sensei_e2e::connect(db).await;
        conn.query_one("SELECT cert_pem FROM pki_material WHERE name = 'ca'", &[])
            .await
            .expect("ca")
            .get::<_, String>(0)
    };
    let http = sensei_e2e::api_client(&ca_pem, &format!("https://127.0.0.1:{api_port}"));
    let signup = http
        .post(format!("https://localhost:{api_port}/v1/auth/signup"))
        .json(&json!({"email": "ha@example.com", "password": "correct horse battery", "account_name": "HA"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(signup.status(), 201);
    let cookie = sensei_e2e::session_cookie(&signup).expect("cookie");
    Api {
        http,
        base: format!("https://localhost:{api_port}"),
        cookie,
    }
}

/// Creates a server named `name`, enrolls a real agent for it through the gateway at
/// `gateway` (state in `dir`) and runs it until the answered sender says stop. Returns once
/// the agent is shown connected.
async fn run_agent(
    api: &Api,
    name: &str,
    gateway: u16,
    ca_fingerprint: &str,
    dir: &std::path::Path,
) -> (String, tokio::sync::watch::Sender<bool>) {
    let (status, server) = api
        .call(
            reqwest::Method::POST,
            "/v1/servers",
            Some(json!({"name": name, "host": "h", "transport": "agent"})),
        )
        .await;
    assert_eq!(status, 201, "{server}");
    let options = sensei_agent::enroll::EnrollOptions {
        control_plane: format!("127.0.0.1:{gateway}"),
        token: server["enrollment_token"]
            .as_str()
            .expect("token")
            .to_owned(),
        ca_fingerprint: ca_fingerprint.parse().expect("fingerprint"),
        expected_server_id: None,
        state_dir: sensei_agent::identity::StateDir::new(dir.join("state")),
    };
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let state = options.state_dir.clone();
    tokio::spawn(async move {
        sensei_agent::session::run(&state, sensei_agent::jobs::JobPolicy::default(), stopped).await
    });
    let id = server["id"].as_str().expect("id").to_owned();
    assert!(
        sensei_e2e::eventually(Duration::from_secs(30), || async {
            api.agent_connected(&id).await == Some(true)
        })
        .await,
        "agent {id} did not connect"
    );
    (id, stop)
}

/// Two replicas on a fresh database, signed up through B.
struct Pair {
    db: String,
    key: String,
    a: Replica,
    b: Replica,
    api: Api,
    /// A's API and agent ports, for a replica that takes its place.
    a_ports: (u16, u16),
}

async fn two_replicas() -> Pair {
    let db = fresh_database().await;
    let key = FieldKeys::generate_key();
    let (api_a, udp_a, api_b, udp_b) = (
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
    );
    let a = replica(&db, &key, api_a, udp_a).await;
    let b = replica(&db, &key, api_b, udp_b).await;
    assert_eq!(a.fingerprint, b.fingerprint, "replicas share one CA");
    let api = sign_up(&db, api_b).await;
    Pair {
        db,
        key,
        a,
        b,
        api,
        a_ports: (api_a, udp_a),
    }
}

#[tokio::test]
async fn a_replica_killed_mid_rollout_does_not_stop_the_rollout() {
    let Pair {
        db,
        key,
        mut a,
        b,
        api,
        a_ports: (api_a, udp_a),
    } = two_replicas().await;

    // Two agents, connected to replica A.
    let mut servers = Vec::new();
    let mut stops = Vec::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| open_tempdir()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let (id, stop) =
            run_agent(&api, &format!("web-{i}"), udp_a, &a.fingerprint, dir.path()).await;
        stops.push(stop);
        servers.push(id);
    }

    let work = open_tempdir();
    let repo = git_repo(work.path(), &["v1"]);
    let app = work.path().join("app");
    let (_, project) = api
        .call(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": "ha", "repo_url": repo.display().to_string(), "deploy_path": app.display().to_string(),
                        "hooks": {"build": ["sleep 3"]}})),
        )
        .await;
    let (status, rollout) = api
        .call(
            reqwest::Method::POST,
            "/v1/rollouts",
            Some(
                json!({"project_id": project["id"], "ref": "main", "server_ids": servers,
                        "strategy": {"canary": 0, "batch_size": 1, "max_failures": 0}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_str().expect("id").to_owned();

    // Kill A while the first deploy runs on its agent.
    assert!(
        sensei_e2e::eventually(Duration::from_secs(30), || async {
            let r = api
                .call(reqwest::Method::GET, &format!("/v1/rollouts/{id}"), None)
                .await
                .1;
            r["targets"][0]["status"] == "running"
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.child.start_kill().expect("SIGKILL");
    let _ = a.child.wait().await;
    let killed_at = chrono::Utc::now();
    // Nothing writes for A's agents any more and their rows still name A: they stop counting
    // as connected once A misses its replica heartbeats, and their last sighting is A's last
    // heartbeat, not a time after the kill.
    for id in &servers {
        assert!(
            sensei_e2e::eventually(Duration::from_secs(30), || async {
                api.agent_connected(id).await == Some(false)
            })
            .await,
            "agent {id} still shown connected to a killed replica"
        );
        let (_, server) = api
            .call(reqwest::Method::GET, &format!("/v1/servers/{id}"), None)
            .await;
        let seen: chrono::DateTime<chrono::Utc> = server["agent"]["last_seen_at"]
            .as_str()
            .expect("last seen")
            .parse()
            .expect("a time");
        assert!(seen <= killed_at, "{seen} is after the kill at {killed_at}");
        assert!(
            killed_at - seen < chrono::Duration::seconds(10),
            "last seen {seen}: long before the kill at {killed_at}"
        );
    }
    // B's sweep then releases them in the database too (what rotations read).
    let conn = sensei_e2e::connect(&db).await;
    for id in &servers {
        assert!(
            sensei_e2e::eventually(Duration::from_secs(40), || async {
                conn.query_one(
                    "SELECT connected_replica IS NULL FROM servers WHERE id = $1::text::uuid",
                    &[id],
                )
                .await
                .expect("server")
                .get::<_, bool>(0)
            })
            .await,
            "server {id} still names the killed replica"
        );
    }
    // Traffic for A's address now reaches another replica (as a load balancer would send it).
    let _a2 = replica(&db, &key, api_a, udp_a).await;

    let mut last = Value::Null;
    for _ in 0..480 {
        last = api
            .call(reqwest::Method::GET, &format!("/v1/rollouts/{id}"), None)
            .await
            .1;
        if last["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(last["state"], "succeeded", "{last}");
    for target in last["targets"].as_array().expect("targets") {
        assert_eq!(target["status"], "succeeded", "{last}");
    }
    // Exactly one deployment per server: nothing ran twice, nothing was lost.
    let conn = sensei_e2e::connect(&db).await;
    for server in &servers {
        let n: i64 = conn
            .query_one(
                "SELECT count(*) FROM deployments WHERE server_id = $1::text::uuid",
                &[server],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 1, "server {server} has {n} deployments");
    }
    for stop in stops {
        let _ = stop.send(true);
    }
    drop(b);
}

/// Replica A dies with SIGKILL while its agent runs a long deploy, with the server's next
/// deploy queued behind it. The agent notices the silence, its deploy stops with the
/// connection, and it comes back (to a fresh replica at A's address) with no result to report.
/// Its first poll fails the lost job at once, far inside the 180 s orphan grace, and the
/// queued deploy then runs: nothing runs twice, nothing is left hanging, and `current` ends on
/// a complete release.
#[tokio::test]
async fn an_agent_back_from_a_killed_replica_frees_its_server_at_its_first_poll() {
    let Pair {
        db,
        key,
        mut a,
        b,
        api,
        a_ports: (api_a, udp_a),
    } = two_replicas().await;
    let agent_dir = open_tempdir();
    let (server, stop) = run_agent(&api, "web", udp_a, &a.fingerprint, agent_dir.path()).await;

    let work = open_tempdir();
    let repo = git_repo(work.path(), &["v1"]);
    let app = work.path().join("app");
    // Builds are quick unless the marker exists.
    let marker = work.path().join("slow");
    let (status, project) = api
        .call(
            reqwest::Method::POST,
            "/v1/projects",
            Some(json!({"name": "lost", "repo_url": repo.display().to_string(),
                        "deploy_path": app.display().to_string(),
                        "hooks": {"build": [format!("test ! -e {} || sleep 120", marker.display())]}})),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let deploy = || async {
        let (status, d) = api
            .call(
                reqwest::Method::POST,
                "/v1/deployments",
                Some(json!({"project_id": project["id"], "server_id": server, "ref": "main"})),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        d["id"].as_str().expect("id").to_owned()
    };
    let status_of = |id: String| {
        let api = &api;
        async move {
            api.call(reqwest::Method::GET, &format!("/v1/deployments/{id}"), None)
                .await
                .1
        }
    };
    let first = deploy().await;
    assert!(
        sensei_e2e::eventually(Duration::from_secs(60), || async {
            status_of(first.clone()).await["status"] == "succeeded"
        })
        .await,
        "the first deploy did not succeed"
    );

    std::fs::write(&marker, "").expect("marker");
    let lost = deploy().await;
    assert!(
        sensei_e2e::eventually(Duration::from_secs(30), || async {
            status_of(lost.clone()).await["status"] == "running"
        })
        .await
    );
    let next = deploy().await;
    // Let the build reach its sleep; the next deploy waits behind it (one job at a time).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status_of(next.clone()).await["status"], "queued");

    a.child.start_kill().expect("SIGKILL");
    let _ = a.child.wait().await;
    let killed = std::time::Instant::now();
    std::fs::remove_file(&marker).expect("remove the marker");
    // Traffic for A's address now reaches a fresh replica.
    let _a2 = replica(&db, &key, api_a, udp_a).await;

    assert!(
        sensei_e2e::eventually(Duration::from_secs(90), || async {
            status_of(lost.clone()).await["status"] == "failed"
        })
        .await,
        "the lost job was not failed within 90 s of the kill"
    );
    let failed_after = killed.elapsed();
    let lost_row = status_of(lost.clone()).await;
    assert_eq!(lost_row["error"]["step"], "run", "{lost_row}");
    assert!(
        lost_row["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("came back on a new connection without a result"),
        "failed by the agent's first poll, not the orphan sweep: {lost_row}"
    );
    assert!(
        failed_after
            < Duration::from_secs(sensei_control_plane::jobs::sweep::ORPHAN_GRACE_SECS as u64),
        "{failed_after:?}"
    );
    // The next deploy runs once the lost one is failed, and succeeds.
    assert!(
        sensei_e2e::eventually(Duration::from_secs(60), || async {
            status_of(next.clone()).await["status"] == "succeeded"
        })
        .await,
        "the queued deploy did not run after the lost one was failed: {}",
        status_of(next.clone()).await
    );
    let next_row = status_of(next.clone()).await;
    let release = next_row["release_id"].as_str().expect("release");
    assert_eq!(
        std::fs::read_link(app.join("current")).expect("current"),
        std::path::PathBuf::from(format!("releases/{release}"))
    );
    assert_eq!(
        std::fs::read_to_string(app.join("current/index.html")).expect("index"),
        "v1"
    );
    // Nothing ran twice: three deployments, one each.
    let conn = sensei_e2e::connect(&db).await;
    let n: i64 = conn
        .query_one(
            "SELECT count(*) FROM deployments WHERE server_id = $1::text::uuid",
            &[&server],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 3);
    let _ = stop.send(true);
    drop(b);
}
