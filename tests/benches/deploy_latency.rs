//! The same small git repository deployed through a real agent and through the SSH runner
//! to a real sshd: from the API call to `current` pointing at the new release, repeated.
//! Both paths run the same signed job and the same release engine; the difference is the
//! transport (a job pulled over a standing QUIC connection, against a fresh SSH login).
//!
//! Side by side, in the same rounds: Capistrano and Ansible (`deploy_helper`), from their
//! Debian packages with the configuration in `loadgen/peers/`, through the same sshd as the
//! same user from the same repository (skipped, saying so, when they are not installed).
//!
//! `cargo bench -p sensei-e2e --bench deploy_latency` (SENSEI_BENCH_ROUNDS, default 10)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sensei_e2e::peers::{self, Inventory, Peer, PeerKey};
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

/// One deploy by a peer to its directory; checks that `current` switched to a new release
/// that exists.
async fn peer_deploy(peer: Peer, inventory: &Inventory, app: &Path) -> peers::PeerRun {
    let current = app.join("current");
    let run = peer.deploy(inventory, 1, None, Some(&current)).await;
    let now = std::fs::read_link(&current).expect("current after the deploy");
    assert!(
        run.switched.is_some(),
        "{} did not switch current",
        peer.name()
    );
    let release = app
        .join("releases")
        .join(now.file_name().expect("release name"));
    assert!(
        release.join("index.html").exists(),
        "{} switched to {}",
        peer.name(),
        now.display()
    );
    run
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
        let sensei_key = server["public_key"].as_str().expect("key").to_owned();
        sshd.set_authorized_keys(&format!("{sensei_key}\n"));
        // The peers log in to the same sshd as the same user, with a key of their own, and
        // deploy the same repository, each to a directory of its own.
        let setups: Vec<(Peer, Inventory, PathBuf)> = if peers::installed() {
            let key = PeerKey::generate(dir.path());
            sshd.set_authorized_keys(&format!("{sensei_key}\n{}\n", key.public));
            Peer::ALL
                .iter()
                .map(|&peer| {
                    let app = dir.path().join(format!("{}-app", peer.name().to_lowercase()));
                    std::fs::create_dir_all(&app).expect("app dir");
                    give_to_deploy_user(&app);
                    let hosts = [(sshd.port, sshd.host_key_public.clone())];
                    let inventory =
                        Inventory::write(&dir.path().join(peer.name()), &key, &ssh_repo, &app, &hosts);
                    (peer, inventory, app)
                })
                .collect()
        } else {
            Vec::new()
        };
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
        for (peer, inventory, app) in &setups {
            peer_deploy(*peer, inventory, app).await;
        }
        let (mut via_agent, mut via_ssh) = (Vec::new(), Vec::new());
        let mut via_peers: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); setups.len()];
        for _ in 0..rounds {
            via_agent.push(deploy(&t, &cookie, &agent_project, &agent_server, &agent_app).await);
            via_ssh.push(deploy(&t, &cookie, &ssh_project, &ssh_server, &ssh_app).await);
            for ((peer, inventory, app), (switched, exited)) in setups.iter().zip(&mut via_peers) {
                let run = peer_deploy(*peer, inventory, app).await;
                switched.push(run.switched.expect("checked by peer_deploy"));
                exited.push(run.wall);
            }
        }
        let (a, s) = (median(via_agent), median(via_ssh));
        println!("deploy latency, API call -> current switched, median of {rounds}:");
        println!("  through the agent:      {:>8.1} ms", a.as_secs_f64() * 1e3);
        println!("  through the SSH runner: {:>8.1} ms", s.as_secs_f64() * 1e3);
        println!(
            "  agent / SSH:            {:>8.2} (target <= 0.33)",
            a.as_secs_f64() / s.as_secs_f64()
        );
        println!("  SSH runner / agent:     {:>8.2}", s.as_secs_f64() / a.as_secs_f64());
        for ((peer, _, _), (switched, exited)) in setups.iter().zip(via_peers) {
            let (sw, ex) = (median(switched), median(exited));
            println!(
                "  {:<12} start -> current switched {:>8.1} ms ({:.2} x the agent), to its exit {:>8.1} ms",
                peer.name(),
                sw.as_secs_f64() * 1e3,
                sw.as_secs_f64() / a.as_secs_f64(),
                ex.as_secs_f64() * 1e3
            );
        }
    });
}
