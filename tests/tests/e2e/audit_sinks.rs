//! Streaming the audit log to SIEMs: a real rsyslog receiving RFC 5424 over TLS, and an HTTPS
//! receiver checking HMAC signatures, each killed mid-stream and started again on the same
//! port; every event arrives, in chain order, duplicates only within one batch. Bad
//! configurations are refused with nothing stored.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sensei_control_plane::audit::sinks::delivery::DeliverySettings;
use sensei_e2e::{error_code, eventually, TestPlane};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::task::JoinHandle;

const PW: &str = "correct horse battery";
/// Events per batch in these tests: small, so that a test crosses several batches.
const BATCH: i64 = 4;

/// Delivery fast enough for tests: polled every 50 ms, retried within half a second.
async fn plane() -> TestPlane {
    replica(sensei_e2e::fresh_database().await, sensei_e2e::test_keys()).await
}

/// A control plane on `conninfo` (another replica when one runs there already).
async fn replica(
    conninfo: String,
    keys: Arc<sensei_control_plane::secrets::field_crypto::FieldKeys>,
) -> TestPlane {
    TestPlane::start_configured(conninfo, keys, SocketAddr::from(([127, 0, 0, 1], 0)), |o| {
        o.audit_sinks = DeliverySettings {
            poll: Duration::from_millis(50),
            batch: BATCH,
            timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_millis(400),
            concurrency: 4,
            batches_per_lease: 3,
        };
    })
    .await
}

/// A receiver's CA and its server certificate for `localhost` and 127.0.0.1.
struct ReceiverCerts {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn receiver_certs() -> ReceiverCerts {
    let ca = sensei_certs::CertificateAuthority::generate("SIEM receiver CA").expect("CA");
    let issued = ca
        .issue_server_certificate(
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            time::Duration::days(1),
        )
        .expect("server certificate");
    ReceiverCerts {
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    }
}

/// Makes `n` audit events on the account of `cookie` (API keys created).
async fn produce(t: &TestPlane, cookie: &str, n: usize, tag: &str) {
    for i in 0..n {
        let (status, v) = t
            .post(
                "/v1/api-keys",
                cookie,
                json!({"name": format!("{tag}-{i}"), "scopes": ["audit:read"]}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
}

/// The account's chain as stored: (id, seq) in seq order.
async fn chain(t: &TestPlane) -> Vec<(i64, i64)> {
    t.db()
        .await
        .query(
            "SELECT id, seq FROM audit_log WHERE chain_id = (SELECT account_id FROM audit_sinks LIMIT 1) \
             ORDER BY seq",
            &[],
        )
        .await
        .expect("chain")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Checks what a receiver got, in arrival order, against the chain: every event, first
/// appearances in seq order without a gap, and any repeat within one batch of the newest
/// event seen (the at-least-once window). Answers the number of repeats.
fn check_arrivals(got: &[(i64, i64)], chain: &[(i64, i64)]) -> usize {
    let mut newest = 0i64;
    let mut repeats = 0;
    for (id, seq) in got {
        let stored = chain
            .iter()
            .find(|(_, s)| s == seq)
            .unwrap_or_else(|| panic!("seq {seq} arrived but is not in the chain"));
        assert_eq!(stored.0, *id, "seq {seq} arrived with another event id");
        if *seq > newest {
            assert_eq!(
                *seq,
                newest + 1,
                "seq {seq} arrived before seq {}",
                newest + 1
            );
            newest = *seq;
        } else {
            assert!(
                newest - seq < BATCH,
                "seq {seq} repeated after {newest}: outside one batch"
            );
            repeats += 1;
        }
    }
    assert_eq!(
        newest,
        chain.last().map(|c| c.1).unwrap_or(0),
        "not every event arrived"
    );
    repeats
}

async fn sink_status(t: &TestPlane, cookie: &str) -> Value {
    let (status, v) = t.get("/v1/audit/sinks", cookie).await;
    assert_eq!(status, 200, "{v}");
    v["sinks"][0].clone()
}

// ---------------------------------------------------------------------------------------------
// rsyslog

/// A real rsyslogd of our own (not the system's): TLS on a loopback port, every message's raw
/// text written to a file.
struct Rsyslog {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

impl Rsyslog {
    fn new(certs: &ReceiverCerts) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(p("ca.pem"), &certs.ca_pem).expect("ca");
        std::fs::write(p("cert.pem"), &certs.cert_pem).expect("cert");
        std::fs::write(p("key.pem"), &certs.key_pem).expect("key");
        let port = sensei_e2e::free_port();
        // A direct main queue: each message is written before the next is read, so a batch
        // rsyslog has read is a batch in the file. GnuTLS's NORMAL priorities: without them
        // rsyslog 8.2302 offers TLS 1.2 only; with them it negotiates 1.3.
        let conf = format!(
            r#"global(workDirectory="{dir}" maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}")
main_queue(queue.type="Direct")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
template(name="raw" type="string" string="%rawmsg%\n")
ruleset(name="audit") {{
  action(type="omfile" file="{out}" template="raw" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="audit" gnutlsPriorityString="NORMAL")
"#,
            dir = dir.path().display(),
            ca = p("ca.pem"),
            cert = p("cert.pem"),
            key = p("key.pem"),
            out = p("received.log"),
        );
        std::fs::write(p("rsyslog.conf"), conf).expect("conf");
        Self {
            dir,
            port,
            child: None,
        }
    }

    async fn start(&mut self) {
        let p = |name: &str| self.dir.path().join(name);
        let child = std::process::Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(p("rsyslog.conf"))
            .arg("-i")
            .arg(p("rsyslogd.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rsyslogd (apt-get install rsyslog rsyslog-gnutls)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            eventually(Duration::from_secs(10), || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await,
            "rsyslogd did not listen on {port}"
        );
    }

    /// SIGSTOP: the kernel still accepts connections, but nothing answers them.
    fn freeze(&self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill -STOP");
        assert!(status.success());
    }

    /// SIGKILL: no chance to finish anything.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("rsyslogd.pid"));
    }

    /// Every message received, raw.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("received.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// (event id, seq) of every message received, in arrival order.
    fn arrivals(&self) -> Vec<(i64, i64)> {
        self.lines()
            .iter()
            .map(|l| {
                let json: Value = serde_json::from_str(&l[l.find("] {").expect("SD end") + 2..])
                    .unwrap_or_else(|e| panic!("{e}: {l}"));
                (
                    json["id"].as_i64().expect("id"),
                    json["seq"].as_i64().expect("seq"),
                )
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether everything the chain holds now has arrived.
async fn all_arrived(t: &TestPlane, arrivals: impl Fn() -> Vec<(i64, i64)>) -> bool {
    let newest = chain(t).await.last().map(|c| c.1).unwrap_or(0);
    arrivals().iter().any(|(_, seq)| *seq == newest)
}

#[tokio::test]
async fn a_real_rsyslog_over_tls_gets_every_event_in_order_across_its_death() {
    let certs = receiver_certs();
    let mut rsyslog = Rsyslog::new(&certs);
    rsyslog.start().await;
    // The sinks' TLS client and this rsyslog agree on TLS 1.3.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", rsyslog.port))
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        sensei_certs::tls::sink_client_config(&certs.ca_pem).expect("client config"),
    ))
    .connect(
        rustls::pki_types::ServerName::try_from("localhost").expect("name"),
        tcp,
    )
    .await
    .expect("handshake with rsyslog");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    drop(tls);
    let t = plane().await;
    let (owner, _) = t.signup("owner@siem.example", PW).await;
    let (status, sink) = t
        .post(
            "/v1/audit/sinks",
            &owner,
            json!({"name": "rsyslog", "kind": "syslog_tls", "host": "127.0.0.1",
                   "port": rsyslog.port, "server_name": "localhost", "ca_pem": certs.ca_pem}),
        )
        .await;
    assert_eq!(status, 201, "{sink}");
    assert_eq!(sink["host"], "127.0.0.1");
    assert!(sink["ca_fingerprint"]
        .as_str()
        .expect("fingerprint")
        .starts_with("SHA256:"));

    // The retained history (signup, the sink's own creation) and new events arrive.
    produce(&t, &owner, 6, "before").await;
    assert!(
        eventually(Duration::from_secs(10), || all_arrived(&t, || rsyslog
            .arrivals()))
        .await,
        "the first events never reached rsyslog: {:?}",
        rsyslog.lines()
    );

    // Frozen: a receiver that accepts the connection and never answers costs each attempt the
    // delivery timeout, and nothing else.
    rsyslog.freeze();
    produce(&t, &owner, 3, "while-frozen").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = sink_status(&t, &owner).await;
            s["status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("no answer within"))
        })
        .await,
        "{}",
        sink_status(&t, &owner).await
    );

    // Killed: events keep coming, delivery fails and backs off, the status says so.
    rsyslog.kill();
    produce(&t, &owner, 5, "while-dead").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            let s = sink_status(&t, &owner).await;
            s["status"]["state"] == "failing" && s["status"]["lag_events"].as_i64() >= Some(5)
        })
        .await,
        "{}",
        sink_status(&t, &owner).await
    );
    let failing = sink_status(&t, &owner).await;
    let error = failing["status"]["last_error"]
        .as_str()
        .expect("last error");
    assert!(error.len() <= 512 && !error.is_empty(), "{error}");

    // Back on the same port: the backlog, then new events, all arrive.
    rsyslog.start().await;
    produce(&t, &owner, 5, "after").await;
    assert!(
        eventually(Duration::from_secs(15), || all_arrived(&t, || rsyslog
            .arrivals()))
        .await,
        "the backlog never arrived: {:?}",
        sink_status(&t, &owner).await
    );
    let chain = chain(&t).await;
    assert!(chain.len() >= 21, "{} events", chain.len());
    check_arrivals(&rsyslog.arrivals(), &chain);

    // RFC 5424 framing as received: PRI for log audit (13) and notice, version 1, app sensei,
    // MSGID the action, structured data naming the event.
    let lines = rsyslog.lines();
    let created = lines
        .iter()
        .find(|l| l.contains(" sensei - api_key.created [sensei@32473 id=\""))
        .unwrap_or_else(|| panic!("no api_key.created message: {lines:?}"));
    assert!(created.starts_with("<109>1 "), "{created}");
    assert!(lines
        .iter()
        .any(|l| l.contains(" sensei - audit.sink_created [")));

    // Caught up: healthy, no lag; the metrics say the same.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = sink_status(&t, &owner).await;
            s["status"]["state"] == "healthy" && s["status"]["lag_events"] == 0
        })
        .await
    );
    let metrics = t.metrics_text().await;
    assert!(metrics.contains("sensei_audit_sinks 1\n"), "{metrics}");
    assert!(metrics.contains("sensei_audit_sink_lag_events_max 0\n"));
    assert!(
        t.metric("sensei_audit_sink_batches_total{kind=\"syslog_tls\",result=\"failed\"}")
            .await
            >= 1.0
    );
    assert!(
        t.metric("sensei_audit_sink_events_total{kind=\"syslog_tls\"}")
            .await
            >= chain.len() as f64
    );
}

// ---------------------------------------------------------------------------------------------
// HTTPS

/// An HTTPS receiver started by the test, in the manner of Splunk's HEC: it checks each
/// batch's HMAC and keeps every event line.
struct HttpsReceiver {
    port: u16,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ReceiverState>,
    task: Option<JoinHandle<()>>,
}

struct ReceiverState {
    key: Vec<u8>,
    lines: Mutex<Vec<Value>>,
    refused: Mutex<u32>,
}

async fn collect(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let timestamp = header("x-sensei-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(&state.key).expect("key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&body);
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    let signed =
        hex::decode(header("x-sensei-signature")).is_ok_and(|sig| mac.verify_slice(&sig).is_ok());
    if !fresh || !signed {
        *state.refused.lock().expect("lock") += 1;
        return (
            StatusCode::UNAUTHORIZED,
            r#"{"text":"Invalid signature","code":4}"#,
        );
    }
    let mut lines = state.lines.lock().expect("lock");
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        lines.push(serde_json::from_slice(line).expect("a JSON line"));
    }
    (StatusCode::OK, r#"{"text":"Success","code":0}"#)
}

impl HttpsReceiver {
    fn new(certs: &ReceiverCerts, key: &str) -> Self {
        Self {
            port: sensei_e2e::free_port(),
            tls: sensei_certs::tls::https_server_config(&certs.cert_pem, &certs.key_pem)
                .expect("server TLS"),
            state: Arc::new(ReceiverState {
                key: key.as_bytes().to_vec(),
                lines: Mutex::new(Vec::new()),
                refused: Mutex::new(0),
            }),
            task: None,
        }
    }

    async fn start(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the receiver's port again");
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let app = axum::Router::new()
            .route("/services/collector/event", axum::routing::post(collect))
            .with_state(self.state.clone());
        self.task = Some(tokio::spawn(async move {
            // Connections live in this task's set: stopping the receiver ends them too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let app = app.clone();
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(tls),
                            hyper_util::service::TowerToHyperService::new(app),
                        )
                        .await;
                });
            }
        }));
    }

    /// Killed: the listener and every connection gone at once.
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    fn arrivals(&self) -> Vec<(i64, i64)> {
        self.state
            .lines
            .lock()
            .expect("lock")
            .iter()
            .map(|l| {
                (
                    l["event"]["id"].as_i64().expect("id"),
                    l["event"]["seq"].as_i64().expect("seq"),
                )
            })
            .collect()
    }
}

#[tokio::test]
async fn an_https_receiver_gets_signed_json_lines_in_order_across_its_death() {
    let certs = receiver_certs();
    let key = "k".repeat(16) + "-hmac-key-for-the-test-receiver";
    let mut receiver = HttpsReceiver::new(&certs, &key);
    receiver.start().await;
    let t = plane().await;
    let (owner, _) = t.signup("owner@hec.example", PW).await;
    let url = format!(
        "https://localhost:{}/services/collector/event",
        receiver.port
    );
    let (status, sink) = t
        .post(
            "/v1/audit/sinks",
            &owner,
            json!({"name": "hec", "kind": "https", "url": url, "auth": "hmac",
                   "secret": key, "ca_pem": certs.ca_pem}),
        )
        .await;
    assert_eq!(status, 201, "{sink}");
    assert_eq!(
        (sink["url"].as_str(), sink["auth"].as_str()),
        (Some(url.as_str()), Some("hmac"))
    );
    assert!(
        !sink.to_string().contains(&key),
        "the secret came back: {sink}"
    );
    // A second replica on the same database delivers too; the lease keeps them from sending
    // the same sink at once, so order holds.
    let other = replica(t.conninfo.clone(), t.keys.clone()).await;

    produce(&t, &owner, 6, "before").await;
    assert!(
        eventually(Duration::from_secs(10), || all_arrived(&t, || receiver
            .arrivals()))
        .await,
        "{}",
        sink_status(&t, &owner).await
    );

    receiver.kill().await;
    produce(&t, &owner, 5, "while-dead").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            sink_status(&t, &owner).await["status"]["state"] == "failing"
        })
        .await
    );
    receiver.start().await;
    produce(&other, &owner, 5, "after").await;
    assert!(
        eventually(Duration::from_secs(15), || all_arrived(&t, || receiver
            .arrivals()))
        .await,
        "{}",
        sink_status(&t, &owner).await
    );
    let chain = chain(&t).await;
    check_arrivals(&receiver.arrivals(), &chain);
    assert_eq!(
        *receiver.state.refused.lock().expect("lock"),
        0,
        "a signature failed"
    );

    // The HEC shape.
    let lines = receiver.state.lines.lock().expect("lock").clone();
    let first = &lines[0];
    assert_eq!(first["source"], "sensei");
    assert_eq!(first["sourcetype"], "sensei:audit");
    // `host` is the control plane's public name.
    let public = reqwest::Url::parse(t.plane.public_url()).expect("public URL");
    assert_eq!(first["host"].as_str(), public.host_str());
    assert!(first["time"].as_f64().is_some_and(|t| t > 1.6e9), "{first}");
    assert!(lines
        .iter()
        .any(|l| l["event"]["event"] == "api_key.created" && l["event"]["result"] == "success"));

    // The secret is stored sealed only, and no configuration column holds it.
    let db = t.db().await;
    let row = db
        .query_one(
            "SELECT config::text, secret_ciphertext FROM audit_sinks",
            &[],
        )
        .await
        .expect("sink row");
    let (config, sealed): (String, String) = (row.get(0), row.get(1));
    assert!(!config.contains(&key) && !sealed.contains(&key));
    assert_eq!(
        t.keys.decrypt(&sealed).expect("sealed under the field key"),
        key.as_bytes()
    );

    // A sink with the wrong key: refused by the receiver, which its status quotes (bounded,
    // the secret blotted out), retried, and never counted as delivered.
    let wrong = "w".repeat(40);
    let (status, bad) = t
        .post(
            "/v1/audit/sinks",
            &owner,
            json!({"name": "wrong key", "kind": "https", "url": url, "auth": "hmac",
                   "secret": wrong, "ca_pem": certs.ca_pem}),
        )
        .await;
    assert_eq!(status, 201, "{bad}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (_, list) = t.get("/v1/audit/sinks", &owner).await;
            list["sinks"][1]["status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("401") && e.contains("Invalid signature"))
        })
        .await
    );
    let (_, list) = t.get("/v1/audit/sinks", &owner).await;
    let bad = &list["sinks"][1];
    assert_eq!(bad["status"]["cursor_seq"], 0, "{bad}");
    assert!(bad["status"]["lag_events"].as_i64() > Some(0));
    assert!(!list.to_string().contains(&wrong));
}

#[tokio::test]
async fn bad_sink_configurations_are_refused_and_nothing_is_stored() {
    let certs = receiver_certs();
    let t = plane().await;
    let (owner, _) = t.signup("owner@bad.example", PW).await;
    let api_port = t.plane.api_addr().port();
    let https_sink = |url: &str| {
        json!({"name": "hec", "kind": "https", "url": url, "auth": "splunk",
               "secret": "00000000-token", "ca_pem": certs.ca_pem})
    };
    let cases = [
        (
            json!({"name": "x", "kind": "https", "url": "https://siem.example/collector",
                   "auth": "splunk", "secret": "t", "ca_pem": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"}),
            "invalid_sink_ca",
        ),
        (
            json!({"name": "x", "kind": "syslog_tls", "host": "siem.example", "port": 6514,
                   "ca_pem": "no PEM here"}),
            "invalid_sink_ca",
        ),
        (
            https_sink("http://siem.example/collector"),
            "invalid_sink_url",
        ),
        (
            https_sink("https://siem.example/collector?token=abc"),
            "invalid_sink_url",
        ),
        (
            https_sink("https://user:pw@siem.example/"),
            "invalid_sink_url",
        ),
        (
            json!({"name": "x", "kind": "syslog_tls", "host": "siem.example", "ca_pem": certs.ca_pem}),
            "invalid_sink",
        ),
        (
            json!({"name": "x", "kind": "kafka", "host": "siem.example", "port": 1, "ca_pem": certs.ca_pem}),
            "invalid_sink",
        ),
        (
            json!({"name": "x", "kind": "https", "url": "https://siem.example/", "auth": "hmac",
                   "secret": "short", "ca_pem": certs.ca_pem}),
            "invalid_sink",
        ),
        // The control plane's own API, and the cloud metadata service.
        (
            https_sink(&format!("https://127.0.0.1:{api_port}/v1/auth/login")),
            "sink_target_denied",
        ),
        (
            json!({"name": "x", "kind": "syslog_tls", "host": "169.254.169.254", "port": 80,
                   "ca_pem": certs.ca_pem}),
            "sink_target_denied",
        ),
    ];
    for (body, code) in cases {
        let (status, v) = t.post("/v1/audit/sinks", &owner, body.clone()).await;
        assert_eq!((status, error_code(&v)), (422, code), "{body}: {v}");
        assert!(!v.to_string().contains("00000000-token"), "{v}");
    }
    assert_eq!(t.count("SELECT count(*) FROM audit_sinks").await, 0);

    // Ten sinks, then no more.
    for i in 0..10 {
        let (status, v) = t
            .post(
                "/v1/audit/sinks",
                &owner,
                json!({"name": format!("s{i}"), "kind": "syslog_tls", "host": "192.0.2.1",
                       "port": 6514, "ca_pem": certs.ca_pem}),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = t
        .post(
            "/v1/audit/sinks",
            &owner,
            https_sink("https://siem.example/"),
        )
        .await;
    assert_eq!((status, error_code(&v)), (409, "too_many_sinks"), "{v}");
    assert_eq!(t.count("SELECT count(*) FROM audit_sinks").await, 10);
    assert_eq!(
        t.count("SELECT count(*) FROM audit_log WHERE action = 'audit.sink_created'")
            .await,
        10
    );

    // A viewer may not add or see sinks; an API key may not add one.
    let (status, invitation) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": "viewer@bad.example", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{invitation}");
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": invitation["token"], "password": PW}))
        .send()
        .await
        .expect("accept");
    let viewer = sensei_e2e::session_cookie(&r).expect("viewer cookie");
    let (status, v) = t
        .post(
            "/v1/audit/sinks",
            &viewer,
            https_sink("https://siem.example/"),
        )
        .await;
    assert_eq!((status, error_code(&v)), (403, "insufficient_scope"), "{v}");
    let (status, v) = t.get("/v1/audit/sinks", &viewer).await;
    assert_eq!((status, error_code(&v)), (403, "insufficient_scope"), "{v}");
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &owner,
            json!({"name": "monitor", "scopes": ["audit:sinks"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().expect("key secret");
    let (status, list) = t.get_with_key("/v1/audit/sinks", secret).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sinks"].as_array().map(Vec::len), Some(10));
    let r = t
        .http
        .post(t.url("/v1/audit/sinks"))
        .bearer_auth(secret)
        .json(&https_sink("https://siem.example/"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);

    // Deleting is audited; another delete of the same sink is not found.
    let id = list["sinks"][0]["id"].as_str().expect("id").to_owned();
    let r = t
        .http
        .delete(t.url(&format!("/v1/audit/sinks/{id}")))
        .header("cookie", &owner)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let r = t
        .http
        .delete(t.url(&format!("/v1/audit/sinks/{id}")))
        .header("cookie", &owner)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404);
    assert_eq!(t.count("SELECT count(*) FROM audit_sinks").await, 9);
    assert!(t
        .audit_actions()
        .await
        .contains(&"audit.sink_deleted".to_owned()));
}
