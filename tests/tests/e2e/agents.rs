//! Agent identity over real QUIC: enrollment, sessions, revocation, and every way a client
//! can fail to get in.

use std::time::{Duration, Instant};

use quinn::VarInt;
use sensei_agent::enroll::{enroll, EnrollError};
use sensei_agent::session::RunOutcome;
use sensei_certs::{AgentKeyRequest, CertificateAuthority, Fingerprint};
use sensei_e2e::{error_code, eventually, open_tempdir, TestPlane};
use sensei_shared::codec::io::{read_frame, write_frame};
use sensei_shared::protocol::{close, AgentMessage, ControlMessage, ALPN};
use serde_json::json;
use uuid::Uuid;

const PW: &str = "correct horse battery";

/// Tries a session with the given certificate and key (or none): the welcome, or why not.
async fn try_session(
    t: &TestPlane,
    identity: Option<(&str, &str)>,
    claim: Uuid,
) -> Result<ControlMessage, String> {
    let verifier = sensei_certs::tls::verifier_trusting(t.plane.ca_pem()).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(verifier, identity, ALPN).expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connection = endpoint
        .connect_with(config, t.plane.agent_addr(), "127.0.0.1")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(
        &mut send,
        &AgentMessage::Hello {
            server_id: claim,
            agent_version: "test".into(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        read_frame::<ControlMessage, _>(&mut recv),
    )
    .await;
    let result = match answer {
        Ok(Ok(Some(message))) => Ok(message),
        _ => Err(format!("closed: {}", connection.closed().await)),
    };
    connection.close(VarInt::from_u32(0), b"");
    endpoint.wait_idle().await;
    result
}

#[tokio::test]
async fn enroll_connect_then_revoke_cuts_the_agent_off_within_a_second() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("ops@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await,
        "agent never showed as connected"
    );
    let (_, server) = t
        .get(&format!("/v1/servers/{}", agent.server_id), &cookie)
        .await;
    assert_eq!(server["agent"]["version"], sensei_agent::version());
    assert_eq!(
        server["ca_fingerprint"],
        t.plane.ca_fingerprint().to_string()
    );
    let fp = server["agent"]["certificate_fingerprint"]
        .as_str()
        .expect("fingerprint");
    let cert = agent.state.load().expect("identity").cert_pem;
    let der = sensei_certs::tls::first_cert_der(&cert).expect("der");
    assert_eq!(fp, Fingerprint::of_der(&der).to_string());
    assert!(server["agent"]["certificate_serial"]
        .as_str()
        .is_some_and(|s| s.len() == 32));
    assert!(server["agent"]["expires_at"].is_string());
    // The private key never left: it is on disk here, mode 0600, and in no database row.
    let key = agent.state.load().expect("identity").key_pem;
    let dump: String = t
        .db()
        .await
        .query_one(
            "SELECT string_agg(row_to_json(c)::text, '') FROM agent_certificates c",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert!(!dump.contains(key.lines().nth(1).expect("key body")));

    let started = Instant::now();
    let r = t
        .http
        .delete(t.url(&format!(
            "/v1/servers/{}/agent-certificate",
            agent.server_id
        )))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    let outcome = tokio::time::timeout(Duration::from_secs(1), agent.task)
        .await
        .expect("the agent was not cut off within 1 s")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!t.agent_connected(&cookie, agent.server_id).await);

    // The same certificate is now refused at the handshake, with the revoked alert.
    let identity = agent.state.load().expect("identity");
    let err = try_session(
        &t,
        Some((&identity.cert_pem, &identity.key_pem)),
        agent.server_id,
    )
    .await
    .expect_err("revoked certificate admitted");
    assert!(
        err.contains("handshake") && err.to_lowercase().contains("revoked"),
        "{err}"
    );
    let (status, body) = t
        .post(
            &format!("/v1/servers/{}/agent-certificate", agent.server_id),
            &cookie,
            json!({}),
        )
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (405, "method_not_allowed"),
        "{body}"
    );
    let actions = t.audit_actions().await;
    for action in [
        "server.created",
        "agent.enrolled",
        "agent.certificate_revoked",
    ] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} not audited: {actions:?}"
        );
    }
    let r = t
        .http
        .delete(t.url(&format!(
            "/v1/servers/{}/agent-certificate",
            agent.server_id
        )))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("revoke again");
    assert_eq!(r.status(), 404, "nothing left to revoke");
}

#[tokio::test]
async fn clients_without_a_valid_certificate_never_get_a_session() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("sec@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let id = agent.server_id;
    let now = time::OffsetDateTime::now_utc();

    // No certificate at all: only enrollment is possible, a hello is a protocol error.
    let err = try_session(&t, None, id)
        .await
        .expect_err("no certificate admitted");
    assert!(
        err.contains(&format!("{}", close::PROTOCOL_ERROR)) || err.contains("enrollment"),
        "{err}"
    );

    // Self-signed.
    let selfsigned = CertificateAuthority::generate("me").expect("self-signed");
    let err = try_session(&t, Some((selfsigned.cert_pem(), &selfsigned.key_pem())), id)
        .await
        .expect_err("self-signed admitted");
    assert!(err.contains("handshake"), "{err}");

    // Issued by another CA, naming the right server.
    let other = CertificateAuthority::generate("other").expect("ca");
    let request = AgentKeyRequest::generate("web-1").expect("csr");
    let foreign = other
        .sign_agent_csr(
            &request.csr_der,
            id,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .expect("sign");
    let err = try_session(&t, Some((&foreign.cert_pem, &request.key_pem)), id)
        .await
        .expect_err("foreign CA admitted");
    assert!(err.contains("handshake"), "{err}");

    // Issued by our CA but expired, even though it is in the valid set.
    let ca = sensei_control_plane::secrets::pki::certificate_authority(t.plane.pool(), &t.keys)
        .await
        .expect("ca");
    let expired = ca
        .sign_agent_csr(
            &request.csr_der,
            id,
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        )
        .expect("sign");
    t.plane.agents().certificates.allow(
        Fingerprint::of_der(&expired.cert_der),
        id,
        expired.not_after.unix_timestamp(),
    );
    let err = try_session(&t, Some((&expired.cert_pem, &request.key_pem)), id)
        .await
        .expect_err("expired certificate admitted");
    assert!(err.contains("handshake"), "{err}");

    // Issued by our CA, valid, but never recorded (not in the valid set).
    let unknown = ca
        .sign_agent_csr(
            &request.csr_der,
            id,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .expect("sign");
    let err = try_session(&t, Some((&unknown.cert_pem, &request.key_pem)), id)
        .await
        .expect_err("unrecorded certificate admitted");
    assert!(err.contains("handshake"), "{err}");

    // A valid certificate claiming another server id in its hello.
    let identity = agent.state.load().expect("identity");
    let err = try_session(
        &t,
        Some((&identity.cert_pem, &identity.key_pem)),
        Uuid::new_v4(),
    )
    .await
    .expect_err("hello with another server id admitted");
    assert!(err.contains("issued to server"), "{err}");

    // The real agent was never disturbed.
    assert!(eventually(Duration::from_secs(5), || t.agent_connected(&cookie, id)).await);
    let _ = agent.stop.send(true);
}

#[tokio::test]
async fn wrong_ca_fingerprint_is_refused_by_the_agent() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("pin@example.com", PW).await;
    let (_, token) = t.create_agent_server(&cookie, "web-1", json!({})).await;
    let dir = open_tempdir();
    let mut options = t.enroll_options(&token, dir.path());
    options.ca_fingerprint = Fingerprint::of_der(b"some other CA");
    let err = enroll(&options)
        .await
        .expect_err("enrolled against an unpinned CA");
    assert!(
        matches!(err, EnrollError::UntrustedControlPlane(_)),
        "{err}"
    );
    assert!(err.to_string().contains("pinned fingerprint"), "{err}");
    assert!(!options.state_dir.has_identity(), "an identity was written");
    // The token was never presented, so it still works with the right fingerprint.
    let used: i64 = t
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM enrollment_tokens WHERE used_at IS NOT NULL",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(used, 0);
    options.ca_fingerprint = t.plane.ca_fingerprint();
    enroll(&options).await.expect("enroll with the right pin");
}

#[tokio::test]
async fn enrollment_tokens_are_single_use_expiring_and_scoped() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("tok@example.com", PW).await;
    let (server_a, token_a) = t.create_agent_server(&cookie, "a", json!({})).await;
    let dir = open_tempdir();
    let refused = |r: Result<_, EnrollError>| match r {
        Err(EnrollError::Refused(reason)) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got an identity"),
    };

    // Wrong server: the operator said this machine is another server.
    let mut options = t.enroll_options(&token_a, dir.path());
    options.expected_server_id = Some(Uuid::new_v4());
    let reason = refused(enroll(&options).await);
    assert!(reason.contains("belongs to another server"), "{reason}");
    // Right server: works once.
    options.expected_server_id = Some(server_a);
    enroll(&options).await.expect("first use");
    // Reuse.
    let reason = refused(enroll(&options).await);
    assert!(reason.contains("already used"), "{reason}");

    // Expired.
    let (_, token_b) = t.create_agent_server(&cookie, "b", json!({})).await;
    t.db()
        .await
        .execute("UPDATE enrollment_tokens SET expires_at = now() - interval '1 second' WHERE used_at IS NULL", &[])
        .await
        .expect("expire");
    let reason = refused(enroll(&t.enroll_options(&token_b, dir.path())).await);
    assert!(reason.contains("expired"), "{reason}");

    // Unknown and malformed.
    let forged = format!("et_{}_{}", Uuid::new_v4().simple(), "A".repeat(43));
    let reason = refused(enroll(&t.enroll_options(&forged, dir.path())).await);
    assert_eq!(reason, "unknown enrollment token");
    let reason = refused(enroll(&t.enroll_options("et_garbage", dir.path())).await);
    assert!(reason.contains("malformed"), "{reason}");

    let refusals: i64 = t
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'agent.enrollment_refused'",
            &[],
        )
        .await
        .expect("q")
        .get(0);
    assert_eq!(refusals, 5, "every refusal is audited");
    let certs: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM agent_certificates", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(
        certs, 1,
        "only the one good enrollment issued a certificate"
    );
}

#[tokio::test]
async fn servers_are_confined_to_their_account() {
    let t = TestPlane::start().await;
    let (alice, _) = t.signup("alice@example.com", PW).await;
    let (mallory, _) = t.signup("mallory@example.com", PW).await;
    let (id, _) = t
        .create_agent_server(&alice, "web-1", json!({"env": "prod"}))
        .await;
    let (status, body) = t.get(&format!("/v1/servers/{id}"), &mallory).await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (_, list) = t.get("/v1/servers", &mallory).await;
    assert_eq!(list["servers"].as_array().map(Vec::len), Some(0));
    for path in [
        format!("/v1/servers/{id}"),
        format!("/v1/servers/{id}/agent-certificate"),
    ] {
        let r = t
            .http
            .delete(t.url(&path))
            .header("cookie", &mallory)
            .send()
            .await
            .expect("req");
        assert_eq!(r.status(), 404, "{path}");
    }
    let (status, _) = t
        .post(
            &format!("/v1/servers/{id}/enrollment-token"),
            &mallory,
            json!({}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = t.get(&format!("/v1/servers/{id}"), &alice).await;
    assert_eq!(status, 200, "alice's server is untouched");
}

#[tokio::test]
async fn server_input_is_validated_and_labels_filter() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("val@example.com", PW).await;
    for (body, code) in [
        (json!({"name": "", "host": "h"}), "invalid_name"),
        (json!({"name": "n", "host": "bad host"}), "invalid_host"),
        (
            json!({"name": "n", "host": "h", "transport": "carrier-pigeon"}),
            "invalid_transport",
        ),
        (
            json!({"name": "n", "host": "h", "transport": "ssh"}),
            "invalid_username",
        ),
        (
            json!({"name": "n", "host": "h", "labels": {"bad key!": "x"}}),
            "invalid_labels",
        ),
        (
            json!({"name": "n", "host": "h", "enrollment_ttl_seconds": 5}),
            "invalid_ttl",
        ),
        (
            json!({"name": "n", "host": "h", "password": "x"}),
            "invalid_field",
        ),
    ] {
        let (status, v) = t.post("/v1/servers", &cookie, body.clone()).await;
        assert_eq!((status, error_code(&v)), (422, code), "{body}: {v}");
    }
    let n: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM servers", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(n, 0);
    t.create_agent_server(&cookie, "web-1", json!({"env": "prod", "role": "web"}))
        .await;
    t.create_agent_server(&cookie, "db-1", json!({"env": "prod", "role": "db"}))
        .await;
    t.create_agent_server(&cookie, "web-2", json!({"env": "staging", "role": "web"}))
        .await;
    let names = |v: serde_json::Value| -> Vec<String> {
        v["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert_eq!(
        names(t.get("/v1/servers?label=env=prod", &cookie).await.1),
        vec!["web-1", "db-1"]
    );
    assert_eq!(
        names(
            t.get("/v1/servers?label=env=prod&label=role=web", &cookie)
                .await
                .1
        ),
        vec!["web-1"]
    );
    let (status, v) = t.get("/v1/servers?label=noequals", &cookie).await;
    assert_eq!((status, error_code(&v)), (400, "invalid_label_filter"));
}

#[tokio::test]
async fn reenrollment_replaces_the_certificate() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("re@example.com", PW).await;
    let first = t.start_agent(&cookie, "web-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, first.server_id))
        .await
    );
    let old = first.state.load().expect("identity");

    let (status, body) = t
        .post(
            &format!("/v1/servers/{}/enrollment-token", first.server_id),
            &cookie,
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["enroll_command"]
        .as_str()
        .is_some_and(|c| c.contains("--ca-fingerprint SHA256:")));
    let dir = open_tempdir();
    let token = body["enrollment_token"].as_str().expect("token");
    let new = enroll(&t.enroll_options(token, dir.path()))
        .await
        .expect("re-enroll");
    assert_eq!(new.meta.server_id, first.server_id);

    // The running agent with the old certificate is cut off; the old certificate is refused.
    let outcome = tokio::time::timeout(Duration::from_secs(2), first.task)
        .await
        .expect("old agent still running")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert!(
        try_session(&t, Some((&old.cert_pem, &old.key_pem)), first.server_id)
            .await
            .is_err()
    );
    assert!(matches!(
        try_session(&t, Some((&new.cert_pem, &new.key_pem)), first.server_id).await,
        Ok(ControlMessage::Welcome { .. })
    ));
}

#[tokio::test]
async fn deleting_a_server_revokes_its_agent() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("del@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let r = t
        .http
        .delete(t.url(&format!("/v1/servers/{}", agent.server_id)))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let outcome = tokio::time::timeout(Duration::from_secs(1), agent.task)
        .await
        .expect("agent not cut off")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert_eq!(
        t.get(&format!("/v1/servers/{}", agent.server_id), &cookie)
            .await
            .0,
        404
    );
    assert!(t
        .audit_actions()
        .await
        .contains(&"server.deleted".to_owned()));
}

#[tokio::test]
async fn agent_reconnects_after_a_control_plane_restart() {
    let conninfo = sensei_e2e::fresh_database().await;
    let keys = sensei_e2e::test_keys();
    let t = TestPlane::start_on(conninfo.clone(), keys.clone()).await;
    let (cookie, _) = t.signup("restart@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let agent_addr = t.plane.agent_addr();
    t.plane.shutdown().await;

    // Same database, same UDP address: a restarted control plane.
    let again = TestPlane::start_at(conninfo, keys, agent_addr).await;
    let cookie = again.login("restart@example.com", PW).await;
    assert!(
        eventually(Duration::from_secs(15), || again
            .agent_connected(&cookie, agent.server_id))
        .await,
        "agent did not come back after the restart"
    );
    assert!(!agent.task.is_finished());
    let _ = agent.stop.send(true);
    let outcome = agent.task.await.expect("join").expect("run");
    assert_eq!(outcome, RunOutcome::Shutdown);
}

#[tokio::test]
async fn hostile_bytes_at_the_gateway_close_only_that_connection() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("fuzz@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let verifier = sensei_certs::tls::verifier_trusting(t.plane.ca_pem()).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(verifier, None, ALPN).expect("tls");
    let crypto =
        std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic"));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    for garbage in [
        u32::MAX.to_be_bytes().to_vec(),
        vec![0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let connection = endpoint
            .connect_with(
                quinn::ClientConfig::new(crypto.clone()),
                t.plane.agent_addr(),
                "127.0.0.1",
            )
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, _recv) = connection.open_bi().await.expect("stream");
        send.write_all(&garbage).await.expect("write");
        let _ = send.finish();
        let reason = tokio::time::timeout(Duration::from_secs(5), connection.closed())
            .await
            .expect("gateway did not close the connection");
        assert!(
            reason.to_string().contains("enrollment request"),
            "unexpected close: {reason}"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let _ = agent.stop.send(true);
}

#[tokio::test]
async fn revocation_through_one_replica_cuts_off_an_agent_held_by_another() {
    let conninfo = sensei_e2e::fresh_database().await;
    let keys = sensei_e2e::test_keys();
    let a = TestPlane::start_on(conninfo.clone(), keys.clone()).await;
    let b = TestPlane::start_on(conninfo, keys).await;
    assert_eq!(
        a.plane.ca_fingerprint(),
        b.plane.ca_fingerprint(),
        "replicas share one CA"
    );
    let (cookie, _) = a.signup("replicas@example.com", PW).await;
    let (server_id, token) = a.create_agent_server(&cookie, "web-1", json!({})).await;
    // Enroll and connect through replica B.
    let dir = open_tempdir();
    let options = b.enroll_options(&token, dir.path());
    enroll(&options).await.expect("enroll through B");
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let state = options.state_dir.clone();
    let task = tokio::spawn(async move {
        sensei_agent::session::run(&state, sensei_agent::jobs::JobPolicy::default(), stopped).await
    });
    assert!(
        eventually(Duration::from_secs(30), || async {
            b.plane.agents().is_connected_here(server_id)
        })
        .await,
        "agent did not connect to B"
    );
    assert!(
        a.agent_connected(&cookie, server_id).await,
        "A's API sees the agent held by B"
    );

    // Revoke through A's API: B must close the connection.
    let started = Instant::now();
    let r = a
        .http
        .delete(a.url(&format!("/v1/servers/{server_id}/agent-certificate")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    let outcome = tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("replica B did not close the revoked agent within 1 s")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!b.plane.agents().is_connected_here(server_id));
}

#[tokio::test]
async fn a_deployment_queued_on_one_replica_reaches_an_agent_held_by_another() {
    let conninfo = sensei_e2e::fresh_database().await;
    let keys = sensei_e2e::test_keys();
    let a = TestPlane::start_on(conninfo.clone(), keys.clone()).await;
    let b = TestPlane::start_on(conninfo, keys).await;
    let (cookie, _) = a.signup("cross@example.com", PW).await;
    // The agent is enrolled and connected through replica B.
    let agent = b.start_agent(&cookie, "web-1").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            b.plane.agents().is_connected_here(agent.server_id)
        })
        .await
    );
    assert!(!a.plane.agents().is_connected_here(agent.server_id));
    let dir = open_tempdir();
    let repo = sensei_e2e::git_repo(dir.path(), &["v1"]);
    let app = dir.path().join("app");
    let (_, project) = a
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "x", "repo_url": repo.display().to_string(), "deploy_path": app.display().to_string()}),
        )
        .await;
    // Queued through replica A: B hears of it through NOTIFY and hands it to its agent.
    let (status, d) = a
        .post(
            "/v1/deployments",
            &cookie,
            json!({"project_id": project["id"], "server_id": agent.server_id, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    let started = Instant::now();
    let done = a
        .wait_deployment(&cookie, d["id"].as_str().expect("id"))
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // Well under the scheduler's 5 s safety re-check: the wake-up came through NOTIFY.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        std::fs::read_to_string(app.join("current/index.html")).expect("page"),
        "v1"
    );
}

async fn status_run(state: &std::path::Path, json: bool) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(sensei_e2e::workspace_binary("sensei-agent"));
    cmd.arg("status").arg("--state-dir").arg(state);
    if json {
        cmd.arg("--json");
    }
    cmd.output().await.expect("sensei-agent status")
}

/// `sensei-agent status --json` on a state directory: its exit code and report.
async fn status_json(state: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let out = status_run(state, true).await;
    let value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code(), value)
}

/// Both forms of `sensei-agent status`, for a state that is not changing: the exit code
/// (the same for both), the report and the text for people.
async fn agent_status(state: &std::path::Path) -> (Option<i32>, serde_json::Value, String) {
    let (code, value) = status_json(state).await;
    let text = status_run(state, false).await;
    assert_eq!(code, text.status.code(), "{value}");
    (
        code,
        value,
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

#[tokio::test]
async fn the_agent_binary_logs_json_and_status_tells_its_identity_connection_and_last_job() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("status@example.com", PW).await;
    let dir = open_tempdir();
    let state = dir.path().join("agent");

    // Nothing enrolled here yet: status says so, exit 2.
    let (code, _, _) = agent_status(&state).await;
    assert_eq!(code, Some(2));

    let (status, server) = t
        .post(
            "/v1/servers",
            &cookie,
            json!({"name": "web-status", "host": "127.0.0.1", "transport": "agent"}),
        )
        .await;
    assert_eq!(status, 201, "{server}");
    let server_id = server["id"].as_str().expect("id").to_owned();
    let words: Vec<String> = server["enroll_command"]
        .as_str()
        .expect("command")
        .split_whitespace()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let enrolled = tokio::process::Command::new(sensei_e2e::workspace_binary("sensei-agent"))
        .args(&words)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .await
        .expect("enroll");
    assert!(enrolled.status.success(), "{enrolled:?}");
    // Enrolled, no agent running: the identity, and "not running" (exit 1).
    let (code, report, text) = agent_status(&state).await;
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(report["server_id"], server_id.as_str());
    assert_eq!(report["running"], false);
    assert_eq!(
        report["ca_fingerprint"],
        t.plane.ca_fingerprint().to_string()
    );
    assert!(report["certificate_expires_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(text.contains("not running"), "{text}");

    // The agent binary, logging JSON lines.
    let mut agent = tokio::process::Command::new(sensei_e2e::workspace_binary("sensei-agent"))
        .args(["--log-format", "json", "run", "--allow-root", "--state-dir"])
        .arg(&state)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sensei-agent run");
    // Its log, collected as it is written (shown when an assertion fails, checked at the end).
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let collector = {
        let log = log.clone();
        let mut stderr = agent.stderr.take().expect("stderr");
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                log.lock()
                    .expect("log")
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        })
    };
    let shown = || log.lock().expect("log").clone();
    let connected = || async { status_json(&state).await.1["connected"] == true };
    assert!(eventually(Duration::from_secs(30), connected).await);
    let (code, report, text) = agent_status(&state).await;
    assert_eq!(code, Some(0), "{text}\n{}", shown());
    assert_eq!(report["running"], true);
    assert!(report["since"].is_string());
    assert_eq!(report["last_job"], serde_json::Value::Null);
    assert!(
        text.contains("connected since") && text.contains("none yet"),
        "{text}"
    );

    // A deploy through it: the last job and its result.
    let work = open_tempdir();
    let repo = sensei_e2e::git_repo(work.path(), &["v1"]);
    let app = work.path().join("app");
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "status-site", "repo_url": repo.display().to_string(),
                   "deploy_path": app.display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let (status, deployment) = t
        .post(
            "/v1/deployments",
            &cookie,
            json!({"project_id": project["id"], "server_id": server_id, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{deployment}");
    let id = deployment["id"].as_str().expect("id");
    let done = t.wait_deployment(&cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let reported = || async { status_json(&state).await.1["last_job"]["id"] == id };
    assert!(eventually(Duration::from_secs(30), reported).await);
    let (_, report, _) = agent_status(&state).await;
    assert_eq!(report["last_job"]["result"], "succeeded");
    assert!(report["last_job"]["summary"]
        .as_str()
        .is_some_and(|s| s.contains(done["release_id"].as_str().expect("release"))));

    // Stopped: "not running", whatever the file last said.
    agent.start_kill().expect("kill");
    let _ = agent.wait().await;
    let (code, report, _) = agent_status(&state).await;
    assert_eq!(code, Some(1));
    assert_eq!(report["running"], false);
    assert_eq!(report["connected"], false);
    assert_eq!(
        report["last_job"]["id"], id,
        "the last job outlives the process"
    );

    // Every log line it wrote is one JSON object, and the connection is among them.
    collector.await.expect("log collector");
    let stderr = shown();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "connected to the control plane"),
        "{stderr}"
    );
}

/// An agent's departure the database refuses to record at first is recorded once it can be:
/// before, the mark was dropped and the server showed as connected for as long as its replica
/// lived.
#[tokio::test]
async fn a_disconnection_the_database_refused_is_recorded_later() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("presence@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let id = agent.server_id;
    assert!(eventually(Duration::from_secs(10), || t.agent_connected(&cookie, id)).await);
    let db = t.db().await;
    let marks = "test_refused_departures";
    sensei_e2e::watch_updates(
        &db,
        "servers",
        marks,
        "OLD.connected_replica IS NOT NULL AND NEW.connected_replica IS NULL",
        true,
    )
    .await;
    let _ = agent.stop.send(true);
    let refused = sensei_e2e::fired_more_than(&db, marks, 1).await;
    assert!(refused >= 2, "departure written {refused} times");
    assert!(
        t.agent_connected(&cookie, id).await,
        "the departure was recorded despite the refusal"
    );
    db.batch_execute(&format!("DROP TRIGGER {marks} ON servers"))
        .await
        .expect("take departures again");
    assert!(
        eventually(Duration::from_secs(20), || async {
            !t.agent_connected(&cookie, id).await
        })
        .await,
        "the departure was never recorded"
    );
}

/// Enrollment needs no login, so a stranger's text goes into the refusal's audit row. A NUL in
/// the hostname or the version (PostgreSQL refuses it in text and in jsonb) made that row fail
/// to write, and the attempt went unrecorded; now it is recorded without the NULs.
#[tokio::test]
async fn a_refused_enrollment_with_nul_characters_is_still_audited() {
    use sensei_shared::protocol::{EnrollRequest, EnrollResponse};

    let t = TestPlane::start().await;
    let verifier = sensei_certs::tls::verifier_trusting(t.plane.ca_pem()).expect("verifier");
    let tls = sensei_certs::tls::agent_client_config(verifier, None, ALPN).expect("tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let connection = endpoint
        .connect_with(config, t.plane.agent_addr(), "127.0.0.1")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    write_frame(
        &mut send,
        &EnrollRequest {
            token: format!("et_{}_{}", Uuid::new_v4().simple(), "A".repeat(43)),
            expected_server_id: None,
            csr_der: Vec::new(),
            agent_version: "9.9\0".into(),
            hostname: "evil\0host".into(),
        },
    )
    .await
    .expect("request");
    let _ = send.finish();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<EnrollResponse, _>(&mut recv),
    )
    .await
    .expect("an answer within 10 s");
    assert!(
        matches!(&answer, Ok(Some(EnrollResponse::Refused { reason })) if reason == "unknown enrollment token"),
        "{answer:?}"
    );
    let db = t.db().await;
    let row = || async {
        db.query_opt(
            "SELECT metadata->>'hostname', user_agent FROM audit_log \
             WHERE action = 'agent.enrollment_refused'",
            &[],
        )
        .await
        .expect("audit")
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
    };
    assert!(
        eventually(Duration::from_secs(10), || async { row().await.is_some() }).await,
        "the refusal was not audited"
    );
    assert_eq!(
        row().await,
        Some(("evilhost".to_owned(), "sensei-agent/9.9".to_owned()))
    );
    connection.close(VarInt::from_u32(0), b"");
    endpoint.wait_idle().await;
}
