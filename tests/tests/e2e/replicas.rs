//! Several control-plane replicas as real processes on one PostgreSQL: one is killed with
//! SIGKILL in the middle of a rollout; its agents are shown offline on the other replica, and
//! the rollout still finishes, with no deployment run twice and none lost.

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

#[tokio::test]
async fn a_replica_killed_mid_rollout_does_not_stop_the_rollout() {
    let db = fresh_database().await;
    let key = FieldKeys::generate_key();
    let (api_a, udp_a, api_b, udp_b) = (
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
        sensei_e2e::free_port(),
    );
    let mut a = replica(&db, &key, api_a, udp_a).await;
    let b = replica(&db, &key, api_b, udp_b).await;
    assert_eq!(a.fingerprint, b.fingerprint, "replicas share one CA");

    // Sign up through B.
    let ca_pem = {
        let conn = sensei_e2e::connect(&db).await;
        conn.query_one("SELECT cert_pem FROM pki_material WHERE name = 'ca'", &[])
            .await
            .expect("ca")
            .get::<_, String>(0)
    };
    let http = sensei_e2e::api_client(&ca_pem, &format!("https://127.0.0.1:{api_b}"));
    let signup = http
        .post(format!("https://localhost:{api_b}/v1/auth/signup"))
        .json(&json!({"email": "ha@example.com", "password": "correct horse battery", "account_name": "HA"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(signup.status(), 201);
    let cookie = sensei_e2e::session_cookie(&signup).expect("cookie");
    let api = Api {
        http,
        base: format!("https://localhost:{api_b}"),
        cookie,
    };

    // Two agents, connected to replica A.
    let mut servers = Vec::new();
    let mut stops = Vec::new();
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| open_tempdir()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        let (status, server) = api
            .call(
                reqwest::Method::POST,
                "/v1/servers",
                Some(json!({"name": format!("web-{i}"), "host": "h", "transport": "agent"})),
            )
            .await;
        assert_eq!(status, 201, "{server}");
        let options = sensei_agent::enroll::EnrollOptions {
            control_plane: format!("127.0.0.1:{udp_a}"),
            token: server["enrollment_token"]
                .as_str()
                .expect("token")
                .to_owned(),
            ca_fingerprint: a.fingerprint.parse().expect("fingerprint"),
            expected_server_id: None,
            state_dir: sensei_agent::identity::StateDir::new(dir.path().join("state")),
        };
        sensei_agent::enroll::enroll(&options)
            .await
            .expect("enroll");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let state = options.state_dir.clone();
        tokio::spawn(async move {
            sensei_agent::session::run(&state, sensei_agent::jobs::JobPolicy::default(), stopped)
                .await
        });
        stops.push(stop);
        servers.push(server["id"].as_str().expect("id").to_owned());
    }
    for id in &servers {
        assert!(
            sensei_e2e::eventually(Duration::from_secs(30), || async {
                api.call(reqwest::Method::GET, &format!("/v1/servers/{id}"), None)
                    .await
                    .1["agent"]["connected"]
                    == true
            })
            .await,
            "agent {id} did not connect"
        );
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
                api.call(reqwest::Method::GET, &format!("/v1/servers/{id}"), None)
                    .await
                    .1["agent"]["connected"]
                    == false
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
