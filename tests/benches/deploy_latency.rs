//! The same small git repository deployed through a real agent and through the SSH runner
//! to a real sshd: from the API call to `current` pointing at the new release, repeated.
//! Both paths run the same signed job and the same release engine; the difference is the
//! transport (a job pulled over a standing QUIC connection, against a fresh SSH login).
//!
//! `cargo bench -p sensei-e2e --bench deploy_latency` (SENSEI_BENCH_ROUNDS, default 10)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensei_e2e::{git_repo, give_to_deploy_user, open_tempdir, SshServer, TestPlane, DEPLOY_USER};
use serde_json::json;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn project(t: &TestPlane, cookie: &str, name: &str, repo: &Path, app: &Path) -> String {
    let (status, p) = t
        .post(
            "/v1/projects",
            cookie,
            json!({"name": name, "repo_url": repo.display().to_string(), "deploy_path": app.display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{p}");
    p["id"].as_str().expect("id").to_owned()
}

/// API call → `current` switched; then waits for the deployment to be recorded.
async fn deploy(t: &TestPlane, cookie: &str, project: &str, server: &str, app: &Path) -> Duration {
    let current = app.join("current");
    let before = std::fs::read_link(&current).ok();
    let started = Instant::now();
    let (status, d) = t
        .post(
            "/v1/deployments",
            cookie,
            json!({"project_id": project, "server_id": server, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    let id = d["id"].as_str().expect("id");
    let mut polls = 0u32;
    let switched = loop {
        let now = std::fs::read_link(&current).ok();
        if now.is_some() && now != before {
            break started.elapsed();
        }
        polls += 1;
        if polls.is_multiple_of(500) {
            let (_, state) = t.get(&format!("/v1/deployments/{id}"), cookie).await;
            assert!(
                state["status"] == "queued" || state["status"] == "running",
                "the deploy ended without switching: {state}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no switch");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let done = t
        .wait_deployment(cookie, d["id"].as_str().expect("id"))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    switched
}

fn main() {
    let rounds: usize = std::env::var("SENSEI_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let t = TestPlane::start().await;
        let (cookie, _) = t.signup("latency@example.com", "correct horse battery").await;
        let dir = open_tempdir();
        // The same content twice: one copy owned by root (the agent here runs as root), one
        // by the SSH login user (git refuses repositories owned by someone else).
        std::fs::create_dir_all(dir.path().join("a")).expect("dir");
        std::fs::create_dir_all(dir.path().join("s")).expect("dir");
        let agent_repo = git_repo(&dir.path().join("a"), &["v1"]);
        let ssh_repo = git_repo(&dir.path().join("s"), &["v1"]);
        give_to_deploy_user(&dir.path().join("s"));
        let agent_app: PathBuf = dir.path().join("agent-app");
        let ssh_app: PathBuf = dir.path().join("ssh-app");
        for app in [&agent_app, &ssh_app] {
            std::fs::create_dir_all(app).expect("app dir");
        }
        give_to_deploy_user(&ssh_app);
        let agent = t.start_agent(&cookie, "agent-host").await;
        let sshd = SshServer::start();
        let (status, server) = t
            .post(
                "/v1/servers",
                &cookie,
                json!({"name": "ssh-host", "host": "127.0.0.1", "port": sshd.port, "username": DEPLOY_USER,
                       "transport": "ssh", "auth": "key", "host_key": sshd.host_key_public}),
            )
            .await;
        assert_eq!(status, 201, "{server}");
        sshd.set_authorized_keys(&format!("{}\n", server["public_key"].as_str().expect("key")));
        let ssh_server = server["id"].as_str().expect("id").to_owned();
        let agent_project = project(&t, &cookie, "via-agent", &agent_repo, &agent_app).await;
        let ssh_project = project(&t, &cookie, "via-ssh", &ssh_repo, &ssh_app).await;
        let agent_server = agent.server_id.to_string();
        assert!(
            sensei_e2e::eventually(Duration::from_secs(15), || t.agent_connected(&cookie, agent.server_id)).await,
            "agent never connected"
        );
        // One warm-up each (first clone, first login), then alternate.
        deploy(&t, &cookie, &agent_project, &agent_server, &agent_app).await;
        deploy(&t, &cookie, &ssh_project, &ssh_server, &ssh_app).await;
        let (mut via_agent, mut via_ssh) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            via_agent.push(deploy(&t, &cookie, &agent_project, &agent_server, &agent_app).await);
            via_ssh.push(deploy(&t, &cookie, &ssh_project, &ssh_server, &ssh_app).await);
        }
        let (a, s) = (median(via_agent), median(via_ssh));
        println!("deploy latency, API call -> current switched, median of {rounds}:");
        println!("  through the agent:      {:>8.1} ms", a.as_secs_f64() * 1e3);
        println!("  through the SSH runner: {:>8.1} ms", s.as_secs_f64() * 1e3);
        println!(
            "  agent / SSH:            {:>8.2} (target <= 0.33)",
            a.as_secs_f64() / s.as_secs_f64()
        );
    });
}
