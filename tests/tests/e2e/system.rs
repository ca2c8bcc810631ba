//! The HTTPS listener, health, metrics, the OpenAPI document and error shapes.

use std::sync::Arc;

use sensei_e2e::{error_code, TestPlane};

#[tokio::test]
async fn tls12_client_is_refused_at_the_handshake() {
    let t = TestPlane::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in sensei_certs::tls::certs_from_pem(t.plane.ca_pem()).expect("ca") {
        roots.add(cert).expect("root");
    }
    let tls12 = rustls::ClientConfig::builder_with_provider(sensei_certs::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("tls12")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(t.plane.api_addr())
        .await
        .expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let refused = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(name.clone(), tcp)
        .await;
    assert!(refused.is_err(), "TLS 1.2 handshake succeeded");

    // The same client restricted to TLS 1.3 gets through: the refusal is about the version.
    let tls13 = sensei_certs::tls::client_config_trusting(t.plane.ca_pem()).expect("tls13");
    let tcp = tokio::net::TcpStream::connect(t.plane.api_addr())
        .await
        .expect("tcp");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls13))
        .connect(name, tcp)
        .await
        .expect("TLS 1.3 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[tokio::test]
async fn healthz_reports_version_binary_and_database() {
    let t = TestPlane::start().await;
    let r = t.http.get(t.url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["database"], "ok");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let sha = v["binary_sha256"].as_str().expect("sha");
    assert_eq!(sha.len(), 64);
    // It is the hash of the executable actually running (here, this test binary).
    let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read exe");
    use sha2::Digest;
    assert_eq!(sha, hex::encode(sha2::Sha256::digest(&exe)));
}

/// The database `t` uses, taken from its connection string.
fn database_name(t: &TestPlane) -> String {
    t.conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("dbname="))
        .expect("dbname")
        .to_owned()
}

/// Refuses new connections to `dbname` and ends every existing one. `pg_terminate_backend`
/// with a timeout returns only once each backend has exited, so nothing here depends on how
/// soon a terminated backend notices its signal.
async fn cut_off(admin: &tokio_postgres::Client, dbname: &str) {
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS false"))
        .await
        .expect("refuse new connections");
    let backends: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1",
            &[&dbname],
        )
        .await
        .expect("backends")
        .iter()
        .map(|r| r.get("pid"))
        .collect();
    for pid in backends {
        let gone: bool = admin
            .query_one("SELECT pg_terminate_backend($1, 10000)", &[&pid])
            .await
            .expect("terminate")
            .get(0);
        // `false` also when the backend had ended on its own since it was listed (the pool
        // closing a connection): only one still there outlived its termination.
        if !gone {
            let left = admin
                .query_opt(
                    "SELECT backend_type, state, query FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .await
                .expect("backend")
                .map(|r| {
                    format!(
                        "{:?} {:?} {:?}",
                        r.get::<_, Option<String>>(0),
                        r.get::<_, Option<String>>(1),
                        r.get::<_, Option<String>>(2)
                    )
                });
            assert!(
                left.is_none(),
                "a backend outlived its termination: {left:?}"
            );
        }
    }
}

#[tokio::test]
async fn healthz_says_degraded_when_the_database_is_gone_and_recovers_after() {
    let t = TestPlane::start().await;
    // Fill the pool with connections first, so that the stale ones are really there.
    for _ in 0..4 {
        assert_eq!(
            t.http
                .get(t.url("/healthz"))
                .send()
                .await
                .expect("healthz")
                .status(),
            200
        );
    }
    let dbname = database_name(&t);
    let admin = sensei_e2e::connect(&sensei_e2e::cluster().conninfo("postgres")).await;
    cut_off(&admin, &dbname).await;
    for path in ["/healthz", "/readyz"] {
        let r = t.http.get(t.url(path)).send().await.expect("probe");
        assert_eq!(r.status(), 503, "{path}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["database"], "unreachable", "{path}");
    }
    let v: serde_json::Value = t
        .http
        .get(t.url("/healthz"))
        .send()
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "degraded");
    // The process itself is fine: liveness does not depend on the database.
    assert_eq!(
        t.http
            .get(t.url("/livez"))
            .send()
            .await
            .expect("livez")
            .status(),
        200
    );
    admin
        .batch_execute(&format!("ALTER DATABASE {dbname} ALLOW_CONNECTIONS true"))
        .await
        .expect("restore");
    // Every pooled connection is now a dead one; the probe must discard them and answer from
    // a fresh connection on its first try.
    let r = t.http.get(t.url("/healthz")).send().await.expect("healthz");
    assert_eq!(r.status(), 200);
    let r = t.http.get(t.url("/readyz")).send().await.expect("readyz");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn readyz_reports_a_schema_this_binary_does_not_match() {
    let t = TestPlane::start().await;
    let v: serde_json::Value = t
        .http
        .get(t.url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(v["status"], "ready");
    assert_eq!(v["migrations"], "current");
    let expected = v["migrations_expected"].as_i64().expect("expected");
    assert_eq!(v["migrations_applied"].as_i64(), Some(expected));
    // A newer binary migrated this database: this one is not ready for it.
    let db = sensei_e2e::connect(&t.conninfo).await;
    db.execute(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
         VALUES ($1, 'from_the_future', '2099-01-01T00:00:00Z', '0')",
        &[&(expected as i32 + 1)],
    )
    .await
    .expect("pretend a newer migration");
    let r = t.http.get(t.url("/readyz")).send().await.expect("readyz");
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["status"], "not_ready");
    assert_eq!(v["migrations"], "ahead");
    assert_eq!(v["database"], "ok");
    // /healthz is unchanged by it: the database answers.
    assert_eq!(
        t.http
            .get(t.url("/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
}

#[tokio::test]
async fn metrics_count_requests_by_route() {
    let t = TestPlane::start().await;
    for _ in 0..3 {
        t.http.get(t.url("/healthz")).send().await.expect("healthz");
    }
    t.http
        .get(t.url("/v1/audit"))
        .send()
        .await
        .expect("unauthenticated");
    let text = t.metrics_text().await;
    assert!(
        text.contains(
            "sensei_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 3"
        ),
        "{text}"
    );
    assert!(
        text.contains("route=\"/v1/audit\",status=\"401\"} 1"),
        "{text}"
    );
    assert!(text.contains("sensei_http_request_duration_seconds_bucket"));
    assert!(text.contains("sensei_db_pool_max 8"));
}

#[tokio::test]
async fn openapi_lists_every_contract_route() {
    let t = TestPlane::start().await;
    let doc: serde_json::Value = t
        .http
        .get(t.url("/openapi.json"))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/v1/auth/signup", "post"),
        ("/v1/auth/login", "post"),
        ("/v1/auth/logout", "post"),
        ("/v1/auth/sessions", "get"),
        ("/v1/auth/sessions/{id}", "delete"),
        ("/v1/auth/sessions/sign-out-everywhere", "post"),
        ("/v1/api-keys", "post"),
        ("/v1/api-keys", "get"),
        ("/v1/api-keys/{id}", "delete"),
        ("/v1/audit", "get"),
        ("/v1/audit/export", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
}

#[tokio::test]
async fn errors_are_json_with_a_code() {
    let t = TestPlane::start().await;
    let r = t.http.get(t.url("/v1/nowhere")).send().await.expect("req");
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "no_such_route");
    let r = t
        .http
        .get(t.url("/v1/auth/sessions"))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 401);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "unauthenticated");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}
