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
                agent_version: sensei_agent::VERSION.into(),
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
