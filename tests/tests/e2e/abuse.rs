//! A hostile client against the control plane: parallel password guesses, forged tokens.

use std::time::Duration;

use sensei_e2e::{error_code, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

/// The counter of password hashes run, from /metrics.
async fn hashes(t: &TestPlane) -> u64 {
    t.metric("sensei_password_hashes_total").await as u64
}

#[tokio::test]
async fn a_parallel_burst_of_guesses_gets_no_more_through_than_the_limit() {
    let t = TestPlane::start().await;
    let email = format!("b{}@example.com", uuid::Uuid::new_v4().simple());
    t.signup(&email, PW).await;
    let guesses = (0..64).map(|i| {
        let (http, url, email) = (t.http.clone(), t.url("/v1/auth/login"), email.clone());
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"email": email, "password": format!("wrong guess {i}")}))
                .send()
                .await
                .expect("login");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&body).to_owned())
        })
    });
    let mut checked: i64 = 0;
    let mut throttled: i64 = 0;
    for g in guesses {
        match g.await.expect("task") {
            (401, code) if code == "invalid_credentials" => checked += 1,
            (429, code) if code == "too_many_attempts" => throttled += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("64 parallel guesses: {checked} checked, {throttled} throttled");
    assert_eq!(
        checked,
        sensei_control_plane::identity::login_throttle::MAX_PER_ACCOUNT,
        "exactly the account's limit of guesses was checked"
    );
    assert_eq!(checked + throttled, 64);
    // The right password is refused too now: the account is throttled, not the guesser.
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": PW}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn forged_reset_and_invitation_tokens_cost_no_password_hash() {
    let t = TestPlane::start().await;
    let before = hashes(&t).await;
    for i in 0..20 {
        let forged = format!("pr_{}_{}", uuid::Uuid::new_v4().simple(), "A".repeat(43));
        let r = t
            .http
            .post(t.url("/v1/auth/password-reset/confirm"))
            .json(&json!({"token": forged, "password": format!("a brand new password {i}")}))
            .send()
            .await
            .expect("confirm");
        assert_eq!(r.status(), 400);
        let body: Value = r.json().await.expect("json");
        assert_eq!(error_code(&body), "invalid_token");
        let forged = format!("iv_{}_{}", uuid::Uuid::new_v4().simple(), "A".repeat(43));
        let r = t
            .http
            .post(t.url("/v1/invitations/accept"))
            .json(&json!({"token": forged, "password": format!("a brand new password {i}")}))
            .send()
            .await
            .expect("accept");
        assert_eq!(r.status(), 400);
    }
    assert_eq!(
        hashes(&t).await,
        before,
        "a forged token made the control plane hash"
    );
}

/// The control plane as a process of its own, so that its memory can be read alone.
struct PlaneProcess {
    child: tokio::process::Child,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl PlaneProcess {
    async fn start(extra: &[&str]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let dir = sensei_e2e::open_tempdir();
        let owner = sensei_e2e::fresh_database().await;
        let mut child = tokio::process::Command::new(sensei_e2e::control_plane_binary())
            .env(
                "CODESENSEI_FIELD_KEY",
                sensei_control_plane::secrets::field_crypto::FieldKeys::generate_key(),
            )
            .env("DATABASE_URL", sensei_e2e::app_conninfo(&owner))
            .env("DATABASE_OWNER_URL", &owner)
            .env("SENSEI_SIGNUP", "open")
            .env("SENSEI_LOG", "warn")
            .args(["--data-dir", &dir.path().display().to_string(), "serve"])
            .args(["--api-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn serve");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut public_url = None;
        while let Ok(Some(line)) = stdout.next_line().await {
            if let Some(url) = line.strip_prefix("Sensei control plane listening on ") {
                public_url = Some(url.trim().to_owned());
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let public_url = public_url.expect("the control plane started");
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        let http = sensei_e2e::api_client(&ca, &public_url);
        Self {
            child,
            base: public_url.replace("127.0.0.1", "localhost"),
            http,
            _dir: dir,
        }
    }

    /// VmRSS and VmHWM (peak) of the process, in KiB.
    fn memory(&self) -> (u64, u64) {
        let pid = self.child.id().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("memory field")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    async fn post(&self, path: &str, cookie: Option<&str>, body: Value) -> Value {
        let mut r = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        let r = r.send().await.expect("request");
        assert!(r.status().is_success(), "{path}: {}", r.status());
        let cookie = sensei_e2e::session_cookie(&r);
        let mut v: Value = r.json().await.expect("json");
        if let Some(c) = cookie {
            v["_cookie"] = json!(c);
        }
        v
    }

    /// Signs up, adds an SSH server behind `sshd` and a project; returns the cookie, the
    /// server and the project.
    async fn ssh_target(&self, sshd: &sensei_e2e::SshServer) -> (String, String, String) {
        let signup = self
            .post(
                "/v1/auth/signup",
                None,
                json!({"email": format!("f{}@example.com", uuid::Uuid::new_v4().simple()),
                       "password": PW, "account_name": "F"}),
            )
            .await;
        let cookie = signup["_cookie"].as_str().expect("cookie").to_owned();
        let server = self
            .post(
                "/v1/servers",
                Some(&cookie),
                json!({"name": "hostile", "host": "127.0.0.1", "port": sshd.port,
                       "username": sensei_e2e::DEPLOY_USER, "transport": "ssh"}),
            )
            .await;
        sshd.set_authorized_keys(&format!(
            "{}\n",
            server["public_key"].as_str().expect("key")
        ));
        let project = self
            .post(
                "/v1/projects",
                Some(&cookie),
                json!({"name": "p", "repo_url": "/srv/git/none.git", "deploy_path": "/srv/none"}),
            )
            .await;
        (
            cookie,
            server["id"].as_str().expect("id").to_owned(),
            project["id"].as_str().expect("id").to_owned(),
        )
    }

    async fn deploy_and_wait(
        &self,
        cookie: &str,
        server: &str,
        project: &str,
    ) -> (Value, std::time::Duration) {
        let started = std::time::Instant::now();
        let d = self
            .post(
                "/v1/deployments",
                Some(cookie),
                json!({"project_id": project, "server_id": server, "ref": "main"}),
            )
            .await;
        let id = d["id"].as_str().expect("id").to_owned();
        for _ in 0..1200 {
            let v: Value = self
                .http
                .get(format!("{}/v1/deployments/{id}", self.base))
                .header("cookie", cookie)
                .send()
                .await
                .expect("get")
                .json()
                .await
                .expect("json");
            if v["status"] == "succeeded" || v["status"] == "failed" {
                return (v, started.elapsed());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the deployment never ended");
    }
}

/// A tenant's SSH server answers with endless bytes and no newline: the control plane keeps
/// one bounded line of it, not the stream. A first, smaller flood warms everything an SSH
/// deploy allocates anyway (connections, buffers, the allocator's arenas); ten times more
/// output must then cost (almost) nothing more.
#[tokio::test]
async fn an_ssh_server_flooding_output_cannot_grow_the_control_planes_memory() {
    if !sensei_control_plane::store::postgres_cluster::running_as_root() {
        return; // the SSH tests create their login user and run sshd as root
    }
    let small = sensei_e2e::SshServer::start_with("ForceCommand head -c 40000000 /dev/zero");
    let big = sensei_e2e::SshServer::start_with("ForceCommand head -c 400000000 /dev/zero");
    let plane = PlaneProcess::start(&[]).await;
    let (cookie, warm, project) = plane.ssh_target(&small).await;
    let (done, _) = plane.deploy_and_wait(&cookie, &warm, &project).await;
    assert_eq!(done["status"], "failed", "{done}");
    let (_, warmed_peak) = plane.memory();
    let (cookie, server, project) = plane.ssh_target(&big).await;
    let (done, _) = plane.deploy_and_wait(&cookie, &server, &project).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["error"]["message"], "the deploy script ended without finishing",
        "{done}"
    );
    let (_, peak) = plane.memory();
    let grown_mib = peak.saturating_sub(warmed_peak) / 1024;
    println!("400 MB without a newline after 40 MB: peak RSS grew by {grown_mib} MiB more");
    assert!(
        grown_mib < 64,
        "the control plane's memory grew by {grown_mib} MiB"
    );
    // What was kept of the line is bounded, and storable (NUL bytes replaced).
    let log: Value = plane
        .http
        .get(format!(
            "{}/v1/deployments/{}/logs",
            plane.base,
            done["id"].as_str().expect("id")
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("logs")
        .json()
        .await
        .expect("json");
    let longest = log["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l["line"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0);
    assert!(
        longest > 1000 && longest < sensei_shared::lines::MAX_LINE * 3 + 64,
        "{longest}"
    );
}

/// A tenant's SSH server that never ends the session is stopped at the deploy's deadline.
#[tokio::test]
async fn an_ssh_server_that_never_finishes_is_stopped_at_the_deadline() {
    if !sensei_control_plane::store::postgres_cluster::running_as_root() {
        return;
    }
    let sshd = sensei_e2e::SshServer::start_with("ForceCommand sleep 3600");
    let plane = PlaneProcess::start(&["--ssh-job-timeout-secs", "10"]).await;
    let (cookie, server, project) = plane.ssh_target(&sshd).await;
    let (done, took) = plane.deploy_and_wait(&cookie, &server, &project).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["step"], "run", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("deadline exceeded")),
        "{done}"
    );
    assert!(took < std::time::Duration::from_secs(100), "took {took:?}");
}

/// A tenant points an SSH server at the cloud metadata address, or at the control plane's own
/// API: the runner refuses to connect and says only "unreachable".
#[tokio::test]
async fn ssh_targets_cannot_be_metadata_or_the_control_plane_itself() {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("n{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "p", "repo_url": "/srv/git/none.git", "deploy_path": "/srv/none"}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let api_port = t.plane.api_addr().port();
    for (i, (host, port)) in [("169.254.169.254", 22), ("127.0.0.1", api_port)]
        .into_iter()
        .enumerate()
    {
        let (status, server) = t
            .post(
                "/v1/servers",
                &cookie,
                json!({"name": format!("probe-{i}"), "host": host, "port": port,
                       "username": "deploy", "transport": "ssh"}),
            )
            .await;
        assert_eq!(status, 201, "{server}");
        let (status, d) = t
            .post(
                "/v1/deployments",
                &cookie,
                json!({"project_id": project["id"], "server_id": server["id"], "ref": "main"}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        let done = t
            .wait_deployment(&cookie, d["id"].as_str().expect("id"))
            .await;
        assert_eq!(done["status"], "failed", "{done}");
        assert_eq!(done["error"]["step"], "connect", "{done}");
        assert_eq!(
            done["error"]["message"],
            format!("{host}:{port} is unreachable"),
            "nothing more is said about why"
        );
    }
}

#[tokio::test]
async fn while_200_logins_are_in_flight_health_and_an_agent_deploy_still_answer() {
    // Behind a trusted proxy (loopback), so that 200 clients each make one attempt and no
    // address reaches its throttle: every login costs a real Argon2 run.
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| {
            o.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")];
            // One hash at a time, on any machine: 200 of them take seconds to drain, so the
            // flood is still in flight while health and the deploy are tried.
            o.max_concurrent_hashes = Some(1);
        },
    )
    .await;
    let s = crate::deploys::setup_on(t, json!({})).await;
    let t = &s.t;
    let logins: Vec<_> = (0..200u32)
        .map(|i| {
            let (http, url) = (t.http.clone(), t.url("/v1/auth/login"));
            tokio::spawn(async move {
                http.post(url)
                    .header("x-forwarded-for", format!("198.18.{}.{}", i / 250, i % 250 + 1))
                    .json(&json!({"email": format!("nobody{i}@example.com"), "password": "a wrong password"}))
                    .send()
                    .await
                    .expect("login")
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let queued = sensei_e2e::eventually(Duration::from_secs(30), || async {
        t.metric("sensei_password_hash_queue").await > 0.0
    })
    .await;
    assert!(queued, "the logins never queued for hashing");

    let mut health = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let r = t.http.get(t.url("/healthz")).send().await.expect("healthz");
        health.push(started.elapsed());
        assert_eq!(r.status(), 200, "/healthz during the login flood");
    }
    let started = std::time::Instant::now();
    let deployment = s.deploy("main").await;
    let queue_time = started.elapsed();
    let still_queued = t.metric("sensei_password_hash_queue").await;
    println!(
        "during 200 logins in flight: /healthz {health:?}, deployment queued in {queue_time:?}, \
         {still_queued} hashes still waiting"
    );
    assert!(
        still_queued > 0.0,
        "the flood was over before health and the deploy were tried; nothing was shown"
    );
    let done = t
        .wait_deployment(&s.cookie, deployment["id"].as_str().expect("id"))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    for login in logins {
        assert_eq!(
            login.await.expect("task"),
            401,
            "every login got its answer"
        );
    }
}

/// Completes a QUIC handshake with the gateway as an enrolling agent does (no certificate),
/// and answers how long it took.
async fn handshake(ca_pem: String, gateway: std::net::SocketAddr) -> Result<Duration, String> {
    let verifier = sensei_certs::tls::verifier_trusting(&ca_pem).map_err(|e| e.to_string())?;
    let tls = sensei_certs::tls::agent_client_config(verifier, None, sensei_shared::protocol::ALPN)
        .map_err(|e| e.to_string())?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let connection = endpoint
        .connect_with(config, gateway, "127.0.0.1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let took = started.elapsed();
    connection.close(quinn::VarInt::from_u32(0), b"done");
    endpoint.wait_idle().await;
    Ok(took)
}

#[tokio::test]
async fn a_burst_of_handshakes_past_the_admission_rate_waits_and_gets_in_without_a_failure() {
    // One new handshake a second (and a burst of one): four at once are more than the gateway
    // admits. Each is first asked to prove its address (a stateless retry: the bucket is never
    // more than half full for unproven clients at this rate); proven, one gets the token and
    // the others go unanswered, send their first packet again after about 1 s, then 2 s, and
    // each time one more gets in.
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| o.agent_handshake_rate = Some(1.0),
    )
    .await;
    assert_eq!(
        t.metric("sensei_agent_handshakes_deferred_total").await,
        0.0
    );
    let burst: Vec<_> = (0..4)
        .map(|_| tokio::spawn(handshake(t.plane.ca_pem().to_owned(), t.plane.agent_addr())))
        .collect();
    // Nobody failed: the handshakes past the rate were left unanswered, and each client sent
    // its first packet again after its probe timeout until it was admitted.
    let mut took = Vec::new();
    for h in burst {
        took.push(
            h.await
                .expect("task")
                .expect("every handshake of the burst completes"),
        );
    }
    took.sort();
    let deferred = t.metric("sensei_agent_handshakes_deferred_total").await;
    assert!(deferred >= 3.0, "{deferred} first packets deferred");
    let retried = t.metric("sensei_agent_handshakes_retried_total").await;
    assert!(retried >= 4.0, "{retried} retries asked");
    // The first was admitted at once; the others waited for retransmissions, the last for at
    // least two (about 1 s and 2 s).
    assert!(took[0] < Duration::from_millis(900), "{took:?}");
    assert!(took[1] > Duration::from_millis(900), "{took:?}");
    assert!(took[3] > Duration::from_millis(2500), "{took:?}");
    // The rest of the plane answered throughout.
    let health = t.http.get(t.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
}

/// Anyone can send a request with a made-up method. Each used to become its own series in
/// `/metrics`, a map entry kept for the life of the process: memory an unauthenticated
/// client could grow without end. Now they all count as `OTHER`.
#[tokio::test]
async fn made_up_http_methods_do_not_grow_the_metrics() {
    let t = TestPlane::start().await;
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("MADEUP{i}").as_bytes()).expect("method");
        let r = t
            .http
            .request(method, t.url("/v1/projects"))
            .send()
            .await
            .expect("request");
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let text = t.metrics_text().await;
    assert!(!text.contains("MADEUP"), "a made-up method became a series");
    assert!(
        text.lines().any(
            |l| l.starts_with("sensei_http_requests_total{method=\"OTHER\"") && l.ends_with(" 200")
        ),
        "the made-up requests are counted together"
    );
    // One series for all of them, not 200 (counted by lines, not bytes: the text's length
    // also moves with figures that have nothing to do with this).
    let series = text
        .lines()
        .filter(|l| l.starts_with("sensei_http_requests_total{method=\"OTHER\""))
        .count();
    assert_eq!(series, 1, "{text}");
    let health = t.http.get(t.url("/healthz")).send().await.expect("healthz");
    assert_eq!(health.status(), 200);
}

/// Text a hostile agent sends (its version, its job's result) may hold NUL characters, which
/// PostgreSQL text cannot store. Written as sent, the version stopped this replica's presence
/// writes for good (every later agent's connection waited behind it), and the result failed
/// its whole batch of job ends, other tenants' results included, and had every agent of the
/// batch told to reconnect. The control plane drops the NULs and stores the rest.
#[tokio::test]
async fn nul_characters_from_a_hostile_agent_are_dropped_and_hold_up_nobody() {
    use sensei_shared::codec::io::{read_frame, write_frame};
    use sensei_shared::protocol::{AgentMessage, ControlMessage, JobResult};

    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("nul@example.com", PW).await;
    let hostile = t.start_agent(&cookie, "hostile").await;
    // Its identity, driven by the test from here on.
    let _ = hostile.stop.send(true);
    let _ = hostile.task.await;
    let identity = hostile.state.load().expect("identity");
    let session = sensei_e2e::driven_session(&identity, "1.0\0-evil").await;
    assert!(
        matches!(session.welcome, Some(ControlMessage::Welcome { .. })),
        "{:?}",
        session.welcome
    );
    let path = format!("/v1/servers/{}", hostile.server_id);
    assert!(
        sensei_e2e::eventually(Duration::from_secs(20), || async {
            t.get(&path, &cookie).await.1["agent"]["version"] == "1.0-evil"
        })
        .await,
        "the version was not stored: {}",
        t.get(&path, &cookie).await.1
    );
    // Another agent connecting afterwards is seen.
    let bystander = t.start_agent(&cookie, "bystander").await;
    assert!(
        sensei_e2e::eventually(Duration::from_secs(20), || t
            .agent_connected(&cookie, bystander.server_id))
        .await,
        "the bystander's connection was never recorded"
    );

    // A result full of NULs is recorded, acknowledged, and shown without them.
    let (_, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "nul", "repo_url": "https://example.com/x.git", "deploy_path": "/srv/nul"}),
        )
        .await;
    let (status, d) = t
        .post(
            "/v1/deployments",
            &cookie,
            json!({"project_id": project["id"], "server_id": hostile.server_id, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    let id = d["id"].as_str().expect("id");
    let (mut send, mut recv, job) = sensei_e2e::poll_on(&session.connection).await;
    assert!(matches!(job, Some(ControlMessage::Job(_))), "{job:?}");
    let job_id: uuid::Uuid = id.parse().expect("uuid");
    write_frame(
        &mut send,
        &AgentMessage::JobFinished {
            job_id,
            result: JobResult {
                succeeded: false,
                release_id: Some("2026\0".into()),
                commit: Some("\0".into()),
                error: Some(("run\0".into(), "it\0 broke".into())),
            },
        },
    )
    .await
    .expect("result");
    let answer = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut recv))
        .await
        .expect("an answer within 20 s");
    assert!(
        matches!(answer, Ok(Some(ControlMessage::JobRecorded))),
        "{answer:?}"
    );
    let ended = t.wait_deployment(&cookie, id).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["error"]["message"], "it broke", "{ended}");
    assert_eq!(ended["error"]["step"], "run", "{ended}");
    session.connection.close(quinn::VarInt::from_u32(0), b"");
    session.endpoint.wait_idle().await;
}
