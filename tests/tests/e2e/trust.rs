//! Attacks on a server's trust, each performed and shown to fail: a connection racing its
//! own revocation, on the replica that revoked and on another.

use std::time::Duration;

use quinn::VarInt;
use sensei_e2e::{eventually, git_repo, open_tempdir, TestPlane};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{close, AgentMessage, ControlMessage, ALPN};
use serde_json::json;

const PW: &str = "correct horse battery";

/// A connection made with the agent's own identity and TLS settings that has finished its
/// handshake but not yet said hello.
struct RacingConnection {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    server_id: uuid::Uuid,
}

impl RacingConnection {
    async fn open(plane: &TestPlane, identity: &sensei_agent::identity::Identity) -> Self {
        let verifier = sensei_certs::tls::verifier_trusting(&identity.ca_pem).expect("verifier");
        let tls = sensei_certs::tls::agent_client_config(
            verifier,
            Some((&identity.cert_pem, &identity.key_pem)),
            ALPN,
        )
        .expect("tls");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
        let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let connection = endpoint
            .connect_with(config, plane.plane.agent_addr(), "127.0.0.1")
            .expect("connect")
            .await
            .expect("the handshake passes while the certificate is valid");
        Self {
            endpoint,
            connection,
            server_id: identity.meta.server_id,
        }
    }

    /// Says hello and polls for a job; returns what came back before the connection ended.
    async fn hello_and_poll(self) -> (Vec<ControlMessage>, quinn::ConnectionError) {
        let mut got = Vec::new();
        if let Ok((mut send, mut recv)) = self.connection.open_bi().await {
            let hello = AgentMessage::Hello {
                server_id: self.server_id,
                agent_version: sensei_agent::version().into(),
            };
            if write_frame(&mut send, &hello).await.is_ok() {
                if let Ok(Ok(Some(m))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    read_frame::<ControlMessage, _>(&mut recv),
                )
                .await
                {
                    got.push(m);
                }
            }
        }
        if let Ok((mut send, mut recv)) = self.connection.open_bi().await {
            let poll = AgentMessage::Poll {
                highest_sequence: 0,
            };
            if write_frame(&mut send, &poll).await.is_ok() {
                if let Ok(Ok(Some(m))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    read_frame::<ControlMessage, _>(&mut recv),
                )
                .await
                {
                    got.push(m);
                }
            }
        }
        let reason = tokio::time::timeout(Duration::from_secs(10), self.connection.closed())
            .await
            .expect("the control plane closes the connection");
        self.connection.close(VarInt::from_u32(0), b"");
        self.endpoint.wait_idle().await;
        (got, reason)
    }
}

fn closed_as_revoked(reason: &quinn::ConnectionError) -> bool {
    matches!(reason, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == VarInt::from_u32(close::REVOKED))
}

/// Signs up, enrolls an identity for a new server (no agent loop runs it), and makes a
/// project to deploy.
async fn enrolled(
    t: &TestPlane,
) -> (
    String,
    sensei_agent::identity::Identity,
    String,
    tempfile::TempDir,
) {
    let (cookie, _) = t
        .signup(
            &format!("r{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let (_, token) = t.create_agent_server(&cookie, "raced", json!({})).await;
    let dir = open_tempdir();
    let options = t.enroll_options(&token, dir.path());
    let identity = sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll");
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string(),
                   "env": {"DB_PASSWORD": "must-never-reach-a-revoked-agent"}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    (
        cookie,
        identity,
        project["id"].as_str().expect("id").to_owned(),
        dir,
    )
}

async fn queue(
    t: &TestPlane,
    cookie: &str,
    project: &str,
    server: uuid::Uuid,
) -> (u16, serde_json::Value) {
    t.post(
        "/v1/deployments",
        cookie,
        json!({"project_id": project, "server_id": server.to_string(), "ref": "main"}),
    )
    .await
}

async fn revoke(t: &TestPlane, cookie: &str, server: uuid::Uuid) {
    let r = t
        .http
        .delete(t.url(&format!("/v1/servers/{server}/agent-certificate")))
        .header("cookie", cookie)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn a_connection_that_passed_its_handshake_before_revocation_gets_nothing_after_it() {
    let t = TestPlane::start().await;
    let (cookie, identity, project, _dir) = enrolled(&t).await;
    let server = identity.meta.server_id;
    let (status, queued) = queue(&t, &cookie, &project, server).await;
    assert_eq!(status, 201, "{queued}");
    // The attacker's connection is through the handshake and waits.
    let racing = RacingConnection::open(&t, &identity).await;
    revoke(&t, &cookie, server).await;
    // The queued job failed at once, with the reason, not after the dispatch timeout.
    let (_, d) = t
        .get(
            &format!("/v1/deployments/{}", queued["id"].as_str().expect("id")),
            &cookie,
        )
        .await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["error"]["message"], "certificate revoked", "{d}");
    // Nothing new can be queued for it, and its unused enrollment tokens are gone.
    let (status, refused) = queue(&t, &cookie, &project, server).await;
    assert_eq!(status, 409, "{refused}");
    let tokens: i64 = t
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM enrollment_tokens WHERE server_id = $1 AND used_at IS NULL",
            &[&server],
        )
        .await
        .expect("tokens")
        .get(0);
    assert_eq!(tokens, 0);
    let (messages, reason) = racing.hello_and_poll().await;
    assert!(
        !messages.iter().any(|m| matches!(m, ControlMessage::Job(_))),
        "a revoked connection received a job: {messages:?}"
    );
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, ControlMessage::Welcome { .. })),
        "a revoked connection was welcomed: {messages:?}"
    );
    assert!(closed_as_revoked(&reason), "{reason:?}");
}

#[tokio::test]
async fn the_race_is_lost_on_another_replica_too() {
    let a = TestPlane::start().await;
    let b = TestPlane::start_on(a.conninfo.clone(), a.keys.clone()).await;
    let (cookie, identity, project, _dir) = enrolled(&a).await;
    let server = identity.meta.server_id;
    // B learns of the certificate through the notification, like any replica.
    let fp = {
        let certs = sensei_certs::tls::certs_from_pem(&identity.cert_pem).expect("cert");
        sensei_certs::Fingerprint::of_der(certs[0].as_ref())
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.plane.agents().certificates.status(&fp)
                == sensei_certs::AgentCertStatus::Valid(server)
        })
        .await
    );
    let (status, queued) = queue(&a, &cookie, &project, server).await;
    assert_eq!(status, 201, "{queued}");
    let racing = RacingConnection::open(&b, &identity).await;
    // Revoked on replica A; replica B holds the waiting connection.
    revoke(&a, &cookie, server).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            b.plane.agents().certificates.status(&fp) == sensei_certs::AgentCertStatus::Revoked
        })
        .await,
        "replica B never heard of the revocation"
    );
    let (messages, reason) = racing.hello_and_poll().await;
    assert!(
        !messages
            .iter()
            .any(|m| matches!(m, ControlMessage::Job(_) | ControlMessage::Welcome { .. })),
        "{messages:?}"
    );
    assert!(closed_as_revoked(&reason), "{reason:?}");
    let (_, d) = b
        .get(
            &format!("/v1/deployments/{}", queued["id"].as_str().expect("id")),
            &cookie,
        )
        .await;
    assert_eq!(d["error"]["message"], "certificate revoked", "{d}");
}

/// The hooks of a deploy run as the deploy user. Each tries to take or rewrite part of the
/// agent's identity: the key, the pinned CA, the job-signing key and control-plane address
/// (`agent.json`), the replay floor.
#[tokio::test]
async fn a_hook_cannot_read_or_rewrite_the_agents_identity() {
    if !sensei_control_plane::store::postgres_cluster::running_as_root() {
        // Switching to the deploy user needs root (or the packaged unit's capabilities).
        return;
    }
    sensei_e2e::deploy_user();
    let deploy_user =
        sensei_agent::policy::DeployUser::lookup(sensei_e2e::DEPLOY_USER).expect("deploy user");
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("h{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let agent = t
        .start_agent_with(
            &cookie,
            "web-1",
            sensei_agent::jobs::JobPolicy {
                deploy_user: Some(deploy_user),
                ..Default::default()
            },
        )
        .await;
    let state = agent.state.path().to_owned();
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let app = dir.path().join("app");
    std::fs::create_dir(&app).expect("mkdir");
    sensei_e2e::give_to_deploy_user(&app);
    // A first deploy that succeeds, so that the sequence floor exists.
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": app.display().to_string(),
                   "hooks": {"build": ["id -un > deployed-by.txt"]}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = project["id"].as_str().expect("id").to_owned();
    let deploy = |hook: String| {
        let (t, cookie, project, server) = (&t, &cookie, &project, agent.server_id);
        async move {
            let r = t
                .http
                .patch(t.url(&format!("/v1/projects/{project}")))
                .header("cookie", cookie)
                .json(&json!({"hooks": {"build": [hook]}}))
                .send()
                .await
                .expect("patch");
            assert_eq!(r.status(), 200);
            let (status, d) = t
                .post(
                    "/v1/deployments",
                    cookie,
                    json!({"project_id": project, "server_id": server.to_string(), "ref": "main"}),
                )
                .await;
            assert_eq!(status, 201, "{d}");
            let id = d["id"].as_str().expect("id").to_owned();
            let done = t.wait_deployment(cookie, &id).await;
            let (_, log) = t.get(&format!("/v1/deployments/{id}/logs"), cookie).await;
            (done, log.to_string())
        }
    };
    let (first, _) = deploy("id -un > deployed-by.txt".into()).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(
        std::fs::read_to_string(app.join("current/deployed-by.txt"))
            .expect("who")
            .trim(),
        sensei_e2e::DEPLOY_USER,
        "hooks run as the deploy user, never as the agent's user"
    );
    // The trust material, by digest (never printed): key, certificate, CA, agent.json.
    let snapshot = |dir: &std::path::Path| -> Vec<(String, String)> {
        use sha2::Digest;
        ["identity.key", "identity.crt", "ca.crt", "agent.json"]
            .iter()
            .map(|name| {
                let bytes = std::fs::read(dir.join(name)).unwrap_or_default();
                (name.to_string(), hex::encode(sha2::Sha256::digest(&bytes)))
            })
            .collect()
    };
    let floor = |dir: &std::path::Path| -> u64 {
        std::fs::read_to_string(dir.join("sequence"))
            .expect("the sequence file is still there")
            .trim()
            .parse()
            .expect("a number")
    };
    let before = snapshot(&state);
    let mut last_floor = floor(&state);
    let key = std::fs::read_to_string(state.join("identity.key")).expect("key");
    let key_line = key.lines().nth(1).expect("key body").to_owned();
    let s = state.display();
    for attack in [
        format!("cat {s}/identity.key"),
        format!(
            "cp {s}/identity.key /tmp/stolen-{}.key",
            uuid::Uuid::new_v4().simple()
        ),
        format!("echo evil > {s}/ca.crt"),
        format!("echo '{{}}' > {s}/agent.json"),
        format!("echo 0 > {s}/sequence"),
        format!("rm -f {s}/sequence"),
        format!("ls {s}"),
    ] {
        let (done, log) = deploy(attack.clone()).await;
        assert_eq!(done["status"], "failed", "{attack}: {done}");
        assert_eq!(done["error"]["step"], "build", "{attack}: {done}");
        assert!(
            done["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("build hook exited")),
            "{attack}: {done}"
        );
        assert!(
            !log.contains(&key_line),
            "{attack}: the key reached the log"
        );
        assert_eq!(snapshot(&state), before, "{attack}: the identity changed");
        // The floor only ever rises, with each job the agent itself started.
        let now = floor(&state);
        assert!(
            now > last_floor,
            "{attack}: the replay floor went from {last_floor} to {now}"
        );
        last_floor = now;
    }
    // The agent still works with the identity it has.
    let (last, _) = deploy("true".into()).await;
    assert_eq!(last["status"], "succeeded", "{last}");
}

/// A deploy path that leaves the allowed root through a symlink is refused before anything
/// runs there.
#[tokio::test]
async fn a_deploy_path_escaping_its_root_through_a_symlink_is_refused() {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("s{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let dir = open_tempdir();
    let root = dir.path().join("srv");
    let elsewhere = dir.path().join("etc");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&elsewhere).expect("mkdir");
    std::os::unix::fs::symlink(&elsewhere, root.join("escape")).expect("link");
    let agent = t
        .start_agent_with(
            &cookie,
            "web-1",
            sensei_agent::jobs::JobPolicy {
                allowed_roots: vec![root.clone()],
                ..Default::default()
            },
        )
        .await;
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": root.join("escape/app").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let (status, d) = t
        .post(
            "/v1/deployments",
            &cookie,
            json!({"project_id": project["id"], "server_id": agent.server_id.to_string(), "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    let done = t
        .wait_deployment(&cookie, d["id"].as_str().expect("id"))
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["step"], "verify", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("outside the deploy roots")),
        "{done}"
    );
    assert!(
        !elsewhere.join("app").exists(),
        "something ran outside the root"
    );
}

/// After the canary is approved, someone pushes to the branch and changes the project's
/// hooks: the rest of the fleet still gets exactly the approved commit with the approved
/// hooks.
#[tokio::test]
async fn a_rollout_deploys_exactly_what_was_approved() {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("p{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let canary = t.start_agent(&cookie, "canary").await;
    let rest = t.start_agent(&cookie, "rest").await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["approved"]);
    let approved = sensei_e2e::git(&repo, &["rev-parse", "HEAD"]);
    let app = |n: &str| dir.path().join(n);
    // Both servers share one deploy path (as on NFS): `current` ends at the last release.
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": app("app").display().to_string(),
                   "hooks": {"build": ["echo approved-hook > hook.txt"]}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = project["id"].as_str().expect("id").to_owned();
    for a in [&canary, &rest] {
        assert!(
            eventually(Duration::from_secs(30), || t
                .agent_connected(&cookie, a.server_id))
            .await
        );
    }
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"project_id": project, "ref": "main",
                   "server_ids": [canary.server_id, rest.server_id],
                   "strategy": {"canary": 1, "batch_size": 1, "manual_approval": true}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_str().expect("id").to_owned();
    assert!(
        eventually(Duration::from_secs(60), || async {
            let (_, r) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
            r["state"] == "paused"
        })
        .await,
        "the canary never finished"
    );
    let (_, r) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
    assert_eq!(
        r["commit"],
        approved.as_str(),
        "the canary's commit is pinned: {r}"
    );
    // The attacks: a new commit on the branch, and a new hook.
    let pushed = sensei_e2e::git_commit(&repo, "pushed after approval");
    assert_ne!(pushed, approved);
    let patch = t
        .http
        .patch(t.url(&format!("/v1/projects/{project}")))
        .header("cookie", &cookie)
        .json(&json!({"hooks": {"build": ["echo changed-hook > hook.txt"]}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(patch.status(), 200);
    let patched: serde_json::Value = patch.json().await.expect("json");
    assert_eq!(
        patched["rollouts_keeping_their_configuration"],
        json!([id]),
        "the answer says the running rollout keeps its configuration"
    );
    let (status, _) = t
        .post(&format!("/v1/rollouts/{id}/approve"), &cookie, json!({}))
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(60), || async {
            let (_, r) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
            r["state"] == "succeeded"
        })
        .await,
        "the rollout did not finish"
    );
    let (_, list) = t
        .get(&format!("/v1/deployments?rollout_id={id}"), &cookie)
        .await;
    let deployments = list["deployments"].as_array().expect("list");
    assert_eq!(deployments.len(), 2);
    for d in deployments {
        assert_eq!(d["commit"], approved.as_str(), "{d}");
    }
    let current = app("app").join("current");
    assert_eq!(
        std::fs::read_to_string(current.join("hook.txt"))
            .expect("hook output")
            .trim(),
        "approved-hook",
        "the approved hook ran, not the one patched in later"
    );
    assert_eq!(
        std::fs::read_to_string(current.join("index.html")).expect("page"),
        "approved"
    );
    // A plain deploy afterwards uses the project as it is now.
    let (_, d) = t
        .post(
            "/v1/deployments",
            &cookie,
            json!({"project_id": project, "server_id": rest.server_id.to_string(), "ref": "main"}),
        )
        .await;
    let done = t
        .wait_deployment(&cookie, d["id"].as_str().expect("id"))
        .await;
    assert_eq!(done["commit"], pushed.as_str(), "{done}");
}
