//! Rotating the agents' CA under a live fleet, with real agents, real QUIC, real certificates
//! and the real `sensei-control-plane ca …` commands: connected agents pin the new CA (endorsed
//! by the old one), renew under it and keep deploying without a restart; an agent offline
//! during the whole overlap is listed and, once the old CA is retired, refused; `ca retire`
//! refuses while a connected agent has not moved (an agent too old to follow, here) and says
//! which.

use std::time::Duration;

use quinn::VarInt;
use sensei_certs::Fingerprint;
use sensei_e2e::{
    control_plane_binary, eventually, git_repo, open_tempdir, test_field_key, TestAgent, TestPlane,
};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{AgentMessage, ControlMessage, ALPN};
use serde_json::{json, Value};
use uuid::Uuid;

const PW: &str = "correct horse battery";

/// Runs `sensei-control-plane ca <args>` against the plane's database; returns (exit code,
/// stdout, stderr).
async fn ca(t: &TestPlane, args: &[&str]) -> (i32, String, String) {
    maintenance(t, "ca", args).await
}

/// Runs `sensei-control-plane <command> <args>` (a maintenance command such as `ca` or
/// `job-key`) against the plane's database; returns (exit code, stdout, stderr).
pub(crate) async fn maintenance(
    t: &TestPlane,
    command: &str,
    args: &[&str],
) -> (i32, String, String) {
    let url = t.conninfo.clone();
    let command = command.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(control_plane_binary())
            .env_remove("DATABASE_OWNER_URL")
            .env_remove("SENSEI_AUDIT_KEY")
            .env_remove("SENSEI_DATA_DIR")
            .env("DATABASE_URL", url)
            .env("CODESENSEI_FIELD_KEY", test_field_key())
            .arg(command)
            .args(args)
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fingerprint of the CA stored under `name` (`ca`, `ca.previous`), if any.
async fn stored_ca(t: &TestPlane, name: &str) -> Option<Fingerprint> {
    let row = t
        .db()
        .await
        .query_opt(
            "SELECT cert_pem FROM pki_material WHERE name = $1",
            &[&name],
        )
        .await
        .expect("pki");
    row.map(|r| fingerprint(r.get(0)))
}

fn fingerprint(cert_pem: &str) -> Fingerprint {
    Fingerprint::of_der(&sensei_certs::tls::first_cert_der(cert_pem).expect("der"))
}

/// A QUIC client configuration trusting `ca_pem`, presenting `cert_pem` and `key_pem`.
fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> quinn::ClientConfig {
    let verifier = sensei_certs::tls::verifier_trusting(ca_pem).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(verifier, Some((cert_pem, key_pem)), ALPN)
        .expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(std::sync::Arc::new(crypto))
}

/// A handshake with the gateway: `Ok` if both sides accepted, else the error.
async fn handshake(
    t: &TestPlane,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connection = endpoint
        .connect_with(config, t.plane.agent_addr(), "127.0.0.1")
        .expect("connect")
        .await?;
    Ok((endpoint, connection))
}

/// An agent that predates CA rotation: it says hello and heartbeats, and never watches for
/// a new CA (it does not know the message), nor for a new job-signing key.
pub(crate) struct OlderAgent {
    pub(crate) connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
    pub(crate) heartbeats: tokio::task::JoinHandle<()>,
}

impl OlderAgent {
    pub(crate) async fn connect(
        t: &TestPlane,
        identity: &sensei_agent::identity::Identity,
    ) -> Self {
        let (endpoint, connection) = handshake(
            t,
            client_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem),
        )
        .await
        .expect("handshake");
        let (mut send, mut recv) = connection.open_bi().await.expect("control stream");
        let hello = AgentMessage::Hello {
            server_id: identity.meta.server_id,
            agent_version: "0.0.1-before-rotation".into(),
        };
        write_frame(&mut send, &hello).await.expect("hello");
        let welcome = read_frame::<ControlMessage, _>(&mut recv)
            .await
            .expect("read");
        assert!(
            matches!(welcome, Some(ControlMessage::Welcome { .. })),
            "{welcome:?}"
        );
        // Heartbeats, each answered, for as long as the test needs the session.
        let heartbeats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if write_frame(&mut send, &AgentMessage::Heartbeat)
                    .await
                    .is_err()
                {
                    return;
                }
                match read_frame::<ControlMessage, _>(&mut recv).await {
                    Ok(Some(ControlMessage::HeartbeatAck)) => {}
                    _ => return,
                }
            }
        });
        Self {
            connection,
            _endpoint: endpoint,
            heartbeats,
        }
    }
}

async fn old_ca_servers(t: &TestPlane, cookie: &str) -> Vec<Uuid> {
    let (status, body) = t.get("/v1/servers?ca=old", cookie).await;
    assert_eq!(status, 200, "{body}");
    let mut ids: Vec<Uuid> = body["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["id"].as_str().expect("id").parse().expect("uuid"))
        .collect();
    ids.sort();
    ids
}

fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

/// Whether `agent` pins `ca` and holds a certificate issued by it.
fn moved_to(agent: &TestAgent, ca_der: &[u8]) -> bool {
    let Ok(identity) = agent.state.load() else {
        return false;
    };
    let pinned = sensei_certs::tls::fingerprints(&identity.ca_pem);
    let cert = sensei_certs::tls::first_cert_der(&identity.cert_pem).unwrap_or_default();
    pinned.contains(&Fingerprint::of_der(ca_der)) && sensei_certs::issued_by(&cert, ca_der)
}

pub(crate) async fn deploy_succeeds(
    t: &TestPlane,
    cookie: &str,
    project: &Value,
    agent: &TestAgent,
) {
    let d = t
        .deploy_and_wait(
            cookie,
            project["id"].as_str().expect("project"),
            &agent.server_id.to_string(),
            "main",
        )
        .await;
    assert_eq!(d["status"], "succeeded", "{d}");
}

#[tokio::test]
async fn the_ca_rotates_under_a_live_fleet_and_an_agent_offline_throughout_must_enroll_again() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("rotate@example.com", PW).await;
    let hub = t.plane.agents().clone();
    let fleet = [
        t.start_agent(&cookie, "web-1").await,
        t.start_agent(&cookie, "web-2").await,
        t.start_agent(&cookie, "web-3").await,
    ];
    let mut offline = t.start_agent(&cookie, "web-offline").await;
    for agent in fleet.iter().chain([&offline]) {
        let (hub, server) = (hub.clone(), agent.server_id);
        assert!(
            eventually(Duration::from_secs(20), || {
                let hub = hub.clone();
                async move { hub.is_connected_here(server) }
            })
            .await,
            "an agent never connected"
        );
    }
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    deploy_succeeds(&t, &cookie, &project, &fleet[0]).await;
    // An agent too old to follow a rotation, connected all along.
    let (older_id, token) = t.create_agent_server(&cookie, "web-older", json!({})).await;
    let older_dir = open_tempdir();
    let older_identity = sensei_agent::enroll::enroll(&t.enroll_options(&token, older_dir.path()))
        .await
        .expect("enroll");
    let older = OlderAgent::connect(&t, &older_identity).await;

    // One agent goes offline for the whole overlap.
    let _ = offline.stop.send(true);
    let _ = (&mut offline.task).await;
    let old_ca = stored_ca(&t, "ca").await.expect("CA");
    assert_eq!(old_ca, t.plane.ca_fingerprint());

    // Nothing to retire before a rotation.
    let (code, _, stderr) = ca(&t, &["retire"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no CA rotation is under way"), "{stderr}");

    let (code, stdout, stderr) = ca(&t, &["rotate"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let new_ca = stored_ca(&t, "ca").await.expect("new CA");
    assert_ne!(new_ca, old_ca);
    assert_eq!(stored_ca(&t, "ca.previous").await, Some(old_ca));
    assert!(stdout.contains(&new_ca.to_string()), "{stdout}");
    let new_ca_der = {
        let row = t
            .db()
            .await
            .query_one("SELECT cert_pem FROM pki_material WHERE name = 'ca'", &[])
            .await
            .expect("ca");
        sensei_certs::tls::first_cert_der(row.get(0)).expect("der")
    };
    // A second rotation before the first is retired is refused, and changes nothing.
    let (code, _, stderr) = ca(&t, &["rotate"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("already under way"), "{stderr}");
    assert_eq!(stored_ca(&t, "ca").await, Some(new_ca));

    // The connected fleet follows without a restart: each agent pins the new CA and renews
    // under it, then connects with that certificate.
    for agent in &fleet {
        assert!(
            eventually(Duration::from_secs(30), || {
                let moved = moved_to(agent, &new_ca_der);
                let connected = hub.is_connected_here(agent.server_id);
                async move { moved && connected }
            })
            .await,
            "an agent did not move to the new CA"
        );
        assert!(!agent.task.is_finished(), "the agent stopped");
        // Both CAs are pinned: the gateway still presents the old one's certificate.
        let pinned = sensei_certs::tls::fingerprints(&agent.state.load().expect("id").ca_pem);
        assert_eq!(pinned, [old_ca, new_ca]);
    }
    // The API lists the agents still on the old CA: the offline one and the older one.
    let mut lagging = vec![offline.server_id, older_id];
    lagging.sort();
    let moved_fleet: Vec<Uuid> = fleet.iter().map(|a| a.server_id).collect();
    assert!(
        eventually(Duration::from_secs(20), || {
            let (t, cookie, lagging) = (&t, &cookie, lagging.clone());
            async move { old_ca_servers(t, cookie).await == lagging }
        })
        .await,
        "the API lists {:?}, not the offline and the older agent",
        old_ca_servers(&t, &cookie).await
    );
    let (code, status_out, stderr) = ca(&t, &["status"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        status_out.contains(&format!("current CA: {new_ca}"))
            && status_out.contains(&format!("previous CA (still accepted): {old_ca}"))
            && status_out.contains("2 agent(s) not on the current CA yet")
            && status_out.contains("web-offline (offline)")
            && status_out.contains("web-older (connected)"),
        "{status_out}"
    );
    let (status, body) = t.get("/v1/servers?ca=new", &cookie).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_ca_filter")),
        "{body}"
    );
    // New enrollments still pin the CA the gateway presents (the old one) during the overlap.
    let (_, view) = t
        .get(&format!("/v1/servers/{}", fleet[0].server_id), &cookie)
        .await;
    assert_eq!(view["ca_fingerprint"], old_ca.to_string());
    for agent in &fleet {
        deploy_succeeds(&t, &cookie, &project, agent).await;
    }
    // Enrolled during the overlap: it pins the old CA (the presented one) and gets a
    // certificate from the new one; on its first session it pins the new CA too.
    let during = t.start_agent(&cookie, "web-during").await;
    assert!(
        eventually(Duration::from_secs(30), || {
            let moved = moved_to(&during, &new_ca_der);
            async move { moved }
        })
        .await,
        "an agent enrolled during the overlap did not pin the new CA"
    );
    deploy_succeeds(&t, &cookie, &project, &during).await;

    // The older agent is connected and has not moved: retiring is refused, says which, and
    // changes nothing.
    assert!(
        eventually(Duration::from_secs(20), || t
            .agent_connected(&cookie, older_id))
        .await,
        "the older agent is not shown connected"
    );
    let (code, _, stderr) = ca(&t, &["retire"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("web-older") && stderr.contains(&older_id.to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("web-offline"),
        "an offline agent does not hold it back: {stderr}"
    );
    assert_eq!(stored_ca(&t, "ca.previous").await, Some(old_ca));
    let retired_before = t
        .count("SELECT count(*) FROM agent_certificates WHERE retired_at IS NOT NULL")
        .await;

    // Forced: the old CA goes, the older agent is disconnected; both lagging servers must
    // enroll again.
    let (code, stdout, stderr) = ca(&t, &["retire", "--force"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("web-offline") && stdout.contains("web-older"),
        "{stdout}"
    );
    assert_eq!(stored_ca(&t, "ca.previous").await, None);
    let (_, status_out, _) = ca(&t, &["status"]).await;
    assert!(status_out.contains("no rotation under way"), "{status_out}");
    assert!(
        t.count("SELECT count(*) FROM agent_certificates WHERE retired_at IS NOT NULL")
            .await
            > retired_before
    );
    tokio::time::timeout(Duration::from_secs(20), older.connection.closed())
        .await
        .expect("the older agent's session is closed once its CA is retired");
    older.heartbeats.abort();
    assert_eq!(old_ca_servers(&t, &cookie).await, lagging);

    // The fleet keeps deploying, on the sessions it had, and unpins the retired CA.
    for agent in fleet.iter().chain([&during]) {
        deploy_succeeds(&t, &cookie, &project, agent).await;
        assert!(!agent.task.is_finished(), "the agent stopped");
        assert!(
            eventually(Duration::from_secs(20), || {
                let pinned = agent
                    .state
                    .load()
                    .map(|id| sensei_certs::tls::fingerprints(&id.ca_pem))
                    .unwrap_or_default();
                async move { pinned == [new_ca] }
            })
            .await,
            "an agent still pins the retired CA"
        );
    }
    // A new handshake: the gateway now presents a certificate from the new CA (a client
    // trusting only the new CA accepts it) and accepts a moved agent's certificate.
    let moved = fleet[1].state.load().expect("identity");
    let new_ca_pem = sensei_certs::tls::der_to_pem(&new_ca_der);
    let (endpoint, connection) = handshake(
        &t,
        client_config(&new_ca_pem, &moved.cert_pem, &moved.key_pem),
    )
    .await
    .expect("a moved agent's handshake, trusting only the new CA");
    connection.close(VarInt::from_u32(0), b"");
    endpoint.wait_idle().await;
    // The offline agent comes back and is refused: it does not trust the gateway's new
    // certificate, and the gateway no longer accepts its old-CA certificate either.
    let stale = offline.state.load().expect("identity");
    assert_eq!(sensei_certs::tls::fingerprints(&stale.ca_pem), [old_ca]);
    assert!(handshake(
        &t,
        client_config(&stale.ca_pem, &stale.cert_pem, &stale.key_pem)
    )
    .await
    .is_err());
    let refused = match handshake(
        &t,
        client_config(&new_ca_pem, &stale.cert_pem, &stale.key_pem),
    )
    .await
    {
        Ok((_endpoint, connection)) => {
            tokio::time::timeout(Duration::from_secs(5), connection.closed())
                .await
                .expect("an old-CA certificate gets no connection")
        }
        Err(e) => e,
    };
    assert!(
        matches!(refused, quinn::ConnectionError::ConnectionClosed(_)),
        "{refused}"
    );
    // New enrollments pin the new CA, and work.
    let (_, view) = t
        .get(&format!("/v1/servers/{}", fleet[0].server_id), &cookie)
        .await;
    assert_eq!(view["ca_fingerprint"], new_ca.to_string());
    let (fresh_id, token) = t.create_agent_server(&cookie, "web-new", json!({})).await;
    let fresh_dir = open_tempdir();
    let mut options = t.enroll_options(&token, fresh_dir.path());
    options.ca_fingerprint = new_ca;
    let fresh = sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll under the new CA");
    assert_eq!(sensei_certs::tls::fingerprints(&fresh.ca_pem), [new_ca]);
    assert!(!old_ca_servers(&t, &cookie).await.contains(&fresh_id));

    let actions = t.audit_actions().await;
    for action in ["ca.rotated", "ca.retired", "agent.ca_retired"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} in {actions:?}"
        );
    }
    assert_eq!(
        sorted(
            t.db()
                .await
                .query(
                    "SELECT target_id FROM audit_log WHERE action = 'agent.ca_retired'",
                    &[]
                )
                .await
                .expect("audit")
                .iter()
                .filter_map(|r| r.get::<_, Option<Uuid>>(0))
                .collect()
        ),
        lagging
    );
    assert!(moved_fleet.iter().all(|id| !lagging.contains(id)));
    for agent in fleet.iter().chain([&during]) {
        let _ = agent.stop.send(true);
    }
}
