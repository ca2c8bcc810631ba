//! Certificate renewal over the live connection, with real agents, real QUIC and real
//! certificates: a plane whose certificates last a few seconds, agents renewing through it
//! while deploys are queued, and every renewal that must be refused.

use std::time::{Duration, Instant};

use quinn::VarInt;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use sensei_certs::{AgentCertStatus, Fingerprint};
use sensei_e2e::{eventually, fresh_database, git_repo, open_tempdir, test_keys, TestPlane};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{AgentMessage, ControlMessage, RenewalRefusal, ALPN};
use serde_json::json;
use uuid::Uuid;

const PW: &str = "correct horse battery";

/// A plane issuing certificates valid for `lifetime`.
async fn plane(lifetime: Duration) -> TestPlane {
    TestPlane::start_configured(
        fresh_database().await,
        test_keys(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        |o| o.agent_cert_lifetime = lifetime,
    )
    .await
}

/// A QUIC client configuration presenting `cert_pem` and `key_pem`.
fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> quinn::ClientConfig {
    let verifier = sensei_certs::tls::verifier_trusting(ca_pem).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(verifier, Some((cert_pem, key_pem)), ALPN)
        .expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    quinn::ClientConfig::new(std::sync::Arc::new(crypto))
}

/// A welcomed session made by hand with an identity, to send renewals of our own making.
struct Session {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    /// The control stream, kept open (and quiet: the test is over before silence counts).
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl Session {
    async fn open(t: &TestPlane, identity: &sensei_agent::identity::Identity) -> Self {
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let connection = endpoint
            .connect_with(
                client_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem),
                t.plane.agent_addr(),
                "127.0.0.1",
            )
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, mut recv) = connection.open_bi().await.expect("control stream");
        let hello = AgentMessage::Hello {
            server_id: identity.meta.server_id,
            agent_version: sensei_agent::version().into(),
        };
        write_frame(&mut send, &hello).await.expect("hello");
        let welcome = read_frame::<ControlMessage, _>(&mut recv)
            .await
            .expect("read");
        assert!(
            matches!(welcome, Some(ControlMessage::Welcome { .. })),
            "{welcome:?}"
        );
        Self {
            endpoint,
            connection,
            _control: (send, recv),
        }
    }

    /// Sends one renewal on a stream of its own; returns the answer. The stream is then
    /// reset, which tells the control plane that a renewed certificate was *not* stored (an
    /// end of stream would say it was, and the session would be drained and closed).
    async fn renew(&self, csr_der: Vec<u8>) -> ControlMessage {
        let (mut send, mut recv) = self.connection.open_bi().await.expect("renewal stream");
        write_frame(&mut send, &AgentMessage::Renew { csr_der })
            .await
            .expect("renew");
        let answer = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv))
            .await
            .expect("an answer in time")
            .expect("readable")
            .expect("an answer, not the end");
        let _ = send.reset(VarInt::from_u32(0));
        answer
    }

    async fn close(self) {
        self.connection.close(VarInt::from_u32(0), b"");
        self.endpoint.wait_idle().await;
    }
}

/// A CSR for `key` naming only `common_name`.
fn csr(key: &KeyPair, common_name: &str) -> Vec<u8> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.serialize_request(key).expect("csr").der().to_vec()
}

fn fingerprint(cert_pem: &str) -> Fingerprint {
    Fingerprint::of_der(&sensei_certs::tls::first_cert_der(cert_pem).expect("der"))
}

/// Signs up and enrolls an identity for a new server (no agent loop runs it).
async fn enrolled(t: &TestPlane, cookie: &str, name: &str) -> sensei_agent::identity::Identity {
    let (_, token) = t.create_agent_server(cookie, name, json!({})).await;
    let dir = open_tempdir();
    let options = t.enroll_options(&token, dir.path());
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll")
}

async fn certificate_rows(t: &TestPlane, server: Uuid) -> i64 {
    t.db()
        .await
        .query_one(
            "SELECT count(*) FROM agent_certificates WHERE server_id = $1",
            &[&server],
        )
        .await
        .expect("count")
        .get(0)
}

/// Certificates of four seconds: the agent renews every three or so, several times over,
/// while deploys are queued all along. Every deploy succeeds; the agent is never away for
/// longer than one reconnect; each old certificate is retired (not revoked) only after the
/// agent connected with its successor, and is refused from then on.
#[tokio::test]
async fn an_agent_renews_again_and_again_without_missing_a_job() {
    let t = plane(Duration::from_secs(4)).await;
    let (cookie, _) = t.signup("renew@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let server = agent.server_id;
    let first = agent.state.load().expect("identity");
    let hub = t.plane.agents().clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let hub = hub.clone();
            async move { hub.is_connected_here(server) }
        })
        .await,
        "the agent never connected"
    );
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

    // Watch the connection on this replica (every 10 ms) while queueing a deploy every 300 ms
    // for ten seconds: at least three renewals.
    let watcher = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let (mut longest, mut away_since): (Duration, Option<Instant>) = (Duration::ZERO, None);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                match (hub.is_connected_here(server), away_since) {
                    (false, None) => away_since = Some(Instant::now()),
                    (true, Some(since)) => {
                        longest = longest.max(since.elapsed());
                        away_since = None;
                    }
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            longest.max(away_since.map_or(Duration::ZERO, |s| s.elapsed()))
        })
    };
    let mut deployments = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let (status, d) = t
            .post(
                "/v1/deployments",
                &cookie,
                json!({"project_id": project["id"], "server_id": server, "ref": "main"}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        deployments.push(d["id"].as_str().expect("id").to_owned());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let longest_away = watcher.await.expect("watcher");
    for id in &deployments {
        let d = t.wait_deployment(&cookie, id).await;
        assert_eq!(
            d["status"], "succeeded",
            "a deploy queued during renewals: {d}"
        );
    }
    // One reconnect is a handshake on loopback: far below a second.
    assert!(
        longest_away < Duration::from_secs(1),
        "the agent was away for {longest_away:?}"
    );

    let db = t.db().await;
    let rows = db
        .query(
            "SELECT fingerprint, renewed_from, issued_at, first_connected_at, retired_at, revoked_at \
             FROM agent_certificates WHERE server_id = $1 ORDER BY issued_at",
            &[&server],
        )
        .await
        .expect("certificates");
    assert!(
        rows.len() >= 4,
        "only {} certificates: too few renewals",
        rows.len()
    );
    type Stamp = Option<chrono::DateTime<chrono::Utc>>;
    for pair in rows.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        assert_eq!(
            new.get::<_, Option<&[u8]>>("renewed_from"),
            Some(old.get::<_, &[u8]>("fingerprint")),
            "each renewal names the certificate it renews"
        );
        assert!(
            old.get::<_, Stamp>("revoked_at").is_none(),
            "retired is not revoked"
        );
        let (connected, retired): (Stamp, Stamp) =
            (new.get("first_connected_at"), old.get("retired_at"));
        let (connected, retired) = (connected.expect("used"), retired.expect("retired"));
        assert!(
            retired >= connected,
            "the old certificate was retired before the agent connected with the new one"
        );
    }
    // The first certificate is refused now, and not as revoked: the handshake fails with
    // "certificate expired", and this replica knows it as retired.
    assert_eq!(
        hub.certificates.status(&fingerprint(&first.cert_pem)),
        AgentCertStatus::Retired
    );
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    // TLS 1.3: the client's side of the handshake ends before the server has checked the
    // client's certificate, so the refusal arrives as the connection's close.
    let refused = match endpoint
        .connect_with(
            client_config(&first.ca_pem, &first.cert_pem, &first.key_pem),
            t.plane.agent_addr(),
            "127.0.0.1",
        )
        .expect("connect")
        .await
    {
        Ok(connection) => tokio::time::timeout(Duration::from_secs(5), connection.closed())
            .await
            .expect("a retired certificate gets no connection"),
        Err(e) => e,
    };
    let expired = quinn::TransportErrorCode::crypto(45);
    assert!(
        matches!(&refused, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == expired),
        "{refused}"
    );
    // The agent runs on, with the newest certificate on disk.
    let now = agent.state.load().expect("identity");
    assert_ne!(now.key_pem, first.key_pem, "a new key each time");
    assert!(!agent.task.is_finished());
    let renewed = t
        .audit_actions()
        .await
        .iter()
        .filter(|a| *a == "agent.certificate_renewed")
        .count();
    assert_eq!(renewed, rows.len() - 1);
    // The API shows when the certificate in use was renewed.
    let (_, view) = t.get(&format!("/v1/servers/{server}"), &cookie).await;
    assert!(
        view["agent"]["certificate_renewed_at"].is_string(),
        "{view}"
    );
    let _ = agent.stop.send(true);
}

/// Renewals that must be refused are, and change nothing: a CSR that reuses the current key,
/// names another server, is not a CSR, or is too large; a second renewal while one is pending;
/// and any renewal from a certificate PostgreSQL knows revoked (even before this replica
/// heard of it). Refusals keep the session; each is audited, as is the renewal.
#[tokio::test]
async fn renewals_that_must_fail_are_refused_and_change_nothing() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("refuse@example.com", PW).await;
    let identity = enrolled(&t, &cookie, "web-1").await;
    let server = identity.meta.server_id;
    let current = fingerprint(&identity.cert_pem);
    let session = Session::open(&t, &identity).await;
    let refused = |reason| ControlMessage::RenewalRefused { reason };

    let same_key = KeyPair::from_pem(&identity.key_pem).expect("key");
    assert_eq!(
        session.renew(csr(&same_key, &server.to_string())).await,
        refused(RenewalRefusal::KeyReused)
    );
    let new_key = KeyPair::generate().expect("key");
    assert_eq!(
        session
            .renew(csr(&new_key, &Uuid::new_v4().to_string()))
            .await,
        refused(RenewalRefusal::WrongSubject)
    );
    assert_eq!(
        session.renew(b"not a CSR".to_vec()).await,
        refused(RenewalRefusal::MalformedCsr)
    );
    assert_eq!(
        session.renew(vec![0x30; 64 * 1024]).await,
        refused(RenewalRefusal::MalformedCsr)
    );
    assert_eq!(certificate_rows(&t, server).await, 1, "nothing was issued");
    let (_, view) = t.get(&format!("/v1/servers/{server}"), &cookie).await;
    assert!(view["agent"]["certificate_renewed_at"].is_null(), "{view}");
    assert_eq!(
        t.plane.agents().certificates.status(&current),
        AgentCertStatus::Valid(server)
    );

    // A good one, on the same session: refusals did not end it.
    let good = session.renew(csr(&new_key, &server.to_string())).await;
    let ControlMessage::Renewed { certificate_pem } = good else {
        panic!("expected a renewed certificate, got {good:?}");
    };
    assert!(sensei_certs::certifies(
        &certificate_pem,
        &new_key.serialize_pem()
    ));
    // Pending until the agent connects with it: the old one is still valid.
    assert_eq!(
        t.plane.agents().certificates.status(&current),
        AgentCertStatus::Valid(server)
    );
    let another = KeyPair::generate().expect("key");
    assert_eq!(
        session.renew(csr(&another, &server.to_string())).await,
        refused(RenewalRefusal::TooSoon)
    );
    assert_eq!(
        certificate_rows(&t, server).await,
        2,
        "one pending renewal at most"
    );
    session.close().await;
    let actions = t.audit_actions().await;
    assert_eq!(
        actions
            .iter()
            .filter(|a| *a == "agent.certificate_renewed")
            .count(),
        1
    );
    assert!(actions
        .iter()
        .any(|a| a == "agent.certificate_renewal_refused"));
    // Revoking the server revokes the pending renewal with the current certificate.
    let r = t
        .http
        .delete(t.url(&format!("/v1/servers/{server}/agent-certificate")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    let pending = fingerprint(&certificate_pem);
    for fp in [current, pending] {
        assert_eq!(
            t.plane.agents().certificates.status(&fp),
            AgentCertStatus::Revoked
        );
    }
    let still_valid: i64 = t
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM agent_certificates WHERE server_id = $1 AND revoked_at IS NULL",
            &[&server],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(still_valid, 0);

    // Revoked in PostgreSQL, behind this replica's back (as if the notification were late):
    // the renewal checks the database and refuses.
    let revoked = enrolled(&t, &cookie, "web-2").await;
    let session = Session::open(&t, &revoked).await;
    t.db()
        .await
        .execute(
            "UPDATE agent_certificates SET revoked_at = now() WHERE server_id = $1",
            &[&revoked.meta.server_id],
        )
        .await
        .expect("revoke");
    let key = KeyPair::generate().expect("key");
    assert_eq!(
        session
            .renew(csr(&key, &revoked.meta.server_id.to_string()))
            .await,
        refused(RenewalRefusal::Revoked)
    );
    assert_eq!(certificate_rows(&t, revoked.meta.server_id).await, 1);
    session.close().await;
}
