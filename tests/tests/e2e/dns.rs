//! Per-deploy DNS records against a real BIND 9 on loopback: written by RFC 2136 updates
//! signed with TSIG after a deploy, removed when the server is deleted, refused and reported
//! with a wrong key.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use sensei_e2e::{error_code, eventually, git_repo, open_tempdir, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

/// A `named` of its own, primary for `apps.test` and `other.test`, accepting updates signed
/// with `sensei-key`.
struct Bind {
    child: Child,
    port: u16,
    secret: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bind {
    async fn start() -> Self {
        let dir = open_tempdir();
        let secret = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
        // named takes it for UDP and TCP.
        let port = sensei_e2e::free_port();
        let d = dir.path().display().to_string();
        for zone in ["apps.test", "other.test"] {
            std::fs::write(
                dir.path().join(format!("{zone}.db")),
                format!(
                    "$TTL 60\n@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 60\n@ IN NS ns.{zone}.\nns IN A 127.0.0.1\n"
                ),
            )
            .expect("zone file");
        }
        let conf = format!(
            r#"options {{
  directory "{d}";
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  managed-keys-directory "{d}";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
}};
controls {{ }};
key "sensei-key" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "apps.test" {{ type primary; file "{d}/apps.test.db"; allow-update {{ key "sensei-key"; }}; }};
zone "other.test" {{ type primary; file "{d}/other.test.db"; allow-update {{ key "sensei-key"; }}; }};
"#
        );
        let conf_path = dir.path().join("named.conf");
        std::fs::write(&conf_path, conf).expect("named.conf");
        let child = Command::new("named")
            .args(["-g", "-c"])
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("named (Debian package bind9)");
        let bind = Bind {
            child,
            port,
            secret,
            _dir: dir,
        };
        let up = eventually(Duration::from_secs(20), || async {
            bind.query("ns.apps.test").as_deref() == Some("127.0.0.1")
        })
        .await;
        assert!(up, "named answers on port {port}");
        bind
    }

    /// The A record of `name`, if any (over TCP, straight from the primary).
    fn query(&self, name: &str) -> Option<String> {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &self.port.to_string(),
                "+tcp",
                "+short",
                "+time=2",
            ])
            .args([name, "A"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty() && !text.starts_with(';')).then_some(text)
    }
}

async fn project(
    t: &TestPlane,
    cookie: &str,
    name: &str,
    repo: &std::path::Path,
    app: &std::path::Path,
) -> String {
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

async fn put(t: &TestPlane, cookie: &str, path: &str, body: Value) -> (u16, Value) {
    let r = t
        .http
        .put(t.url(path))
        .header("cookie", cookie)
        .json(&body)
        .send()
        .await
        .expect("put");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn deploys_get_records_a_server_deletion_removes_them_and_a_wrong_key_is_reported() {
    let bind = Bind::start().await;
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("dns{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let server = agent.server_id.to_string();
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let site = project(&t, &cookie, "site", &repo, &dir.path().join("site")).await;
    let dns_path = format!("/v1/projects/{site}/dns");
    let settings = |zone: &str, secret: &str| {
        json!({"zone": zone, "server": format!("127.0.0.1:{}", bind.port),
               "key_name": "sensei-key", "secret": secret, "ttl": 30})
    };

    // Settings that cannot work are refused, and nothing is stored.
    for (body, code) in [
        (settings("apps.test", "c2hvcnQ="), "invalid_dns"),
        (
            json!({"zone": "apps.test", "server": "169.254.169.254:53", "key_name": "k", "secret": bind.secret}),
            "invalid_dns",
        ),
        (
            json!({"zone": "apps.test", "server": "dns.example.com", "key_name": "k", "secret": bind.secret}),
            "invalid_dns",
        ),
    ] {
        let (status, err) = put(&t, &cookie, &dns_path, body).await;
        assert_eq!((status, error_code(&err)), (422, code), "{err}");
    }
    let (_, shown) = t.get(&dns_path, &cookie).await;
    assert_eq!(shown["zone"], Value::Null);

    let (status, shown) = put(&t, &cookie, &dns_path, settings("apps.test", &bind.secret)).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["zone"], "apps.test");
    assert!(shown.get("secret").is_none(), "the secret is never shown");
    // Nothing deployed yet, so no record.
    assert_eq!(shown["records"], json!([]));
    let d = t.deploy_and_wait(&cookie, &site, &server, "main").await;
    assert_eq!(d["status"], "succeeded", "{d}");
    // Sensei lists a record once the zone's primary accepted it.
    let written = eventually(Duration::from_secs(30), || async {
        let (_, shown) = t.get(&dns_path, &cookie).await;
        shown["records"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    assert!(written, "the record is written");
    assert_eq!(
        bind.query("web-1.apps.test").as_deref(),
        Some("127.0.0.1"),
        "web-1.apps.test points at the agent's address"
    );
    let (_, shown) = t.get(&dns_path, &cookie).await;
    assert_eq!(shown["records"][0]["name"], "web-1.apps.test.");
    assert_eq!(shown["records"][0]["target"], "127.0.0.1");
    assert_eq!(shown["last_error"], Value::Null);

    // Another project in the same zone would fight over the names.
    let shop = project(&t, &cookie, "shop", &repo, &dir.path().join("shop")).await;
    let (status, err) = put(
        &t,
        &cookie,
        &format!("/v1/projects/{shop}/dns"),
        settings("apps.test", &bind.secret),
    )
    .await;
    assert_eq!((status, error_code(&err)), (409, "zone_taken"), "{err}");
    // A wrong key: the deploy still works; the server refuses the update and the project says so.
    let wrong = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let (status, _) = put(
        &t,
        &cookie,
        &format!("/v1/projects/{shop}/dns"),
        settings("other.test", &wrong),
    )
    .await;
    assert_eq!(status, 200);
    let d = t.deploy_and_wait(&cookie, &shop, &server, "main").await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let reported = eventually(Duration::from_secs(30), || async {
        let (_, shown) = t.get(&format!("/v1/projects/{shop}/dns"), &cookie).await;
        shown["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("refused the update: NotAuth"))
    })
    .await;
    let (_, shown) = t.get(&format!("/v1/projects/{shop}/dns"), &cookie).await;
    assert!(reported, "the refusal is reported on the project: {shown}");
    assert_eq!(bind.query("web-1.other.test"), None, "nothing was written");
    let (_, shown) = t.get(&format!("/v1/projects/{shop}/dns"), &cookie).await;
    assert_eq!(shown["records"], json!([]));
    assert!(
        !shown.to_string().contains(&wrong),
        "no secret in the status"
    );

    // Deleting the server tears its record down.
    let r = t
        .http
        .delete(t.url(&format!("/v1/servers/{server}")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("delete");
    assert!(r.status().is_success(), "{}", r.status());
    // Gone from the zone, then from Sensei's list of what it owns.
    let removed = eventually(Duration::from_secs(30), || async {
        let (_, shown) = t.get(&dns_path, &cookie).await;
        shown["records"] == json!([])
    })
    .await;
    assert!(removed, "the record went with its server");
    assert_eq!(bind.query("web-1.apps.test"), None);
    let audited = t
        .count("SELECT count(*) FROM audit_log WHERE action = 'project.dns_set'")
        .await;
    assert_eq!(audited, 2);
}
