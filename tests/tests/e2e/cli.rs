//! The real `sensei-control-plane` binary: configuration errors, `audit verify`,
//! `rotate-field-key`, the quickstart, and logs free of secrets.

use std::process::Stdio;

use sensei_control_plane::field_crypto::FieldKeys;
use sensei_e2e::{control_plane_binary, fresh_database, open_tempdir};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn command() -> std::process::Command {
    let mut cmd = std::process::Command::new(control_plane_binary());
    cmd.env_remove("CODESENSEI_FIELD_KEY")
        .env_remove("DATABASE_URL")
        .env_remove("SENSEI_API_ADDR")
        .env_remove("SENSEI_DATA_DIR")
        .stdin(Stdio::null());
    cmd
}

#[test]
fn serve_without_field_key_refuses_to_start() {
    let dir = open_tempdir();
    let out = command()
        .args(["--data-dir", &dir.path().display().to_string(), "serve"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CODESENSEI_FIELD_KEY is not set"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("postgres").exists(),
        "nothing should have been started"
    );
}

#[test]
fn malformed_field_key_is_named_but_not_echoed() {
    let good = FieldKeys::generate_key();
    let out = command()
        .env("CODESENSEI_FIELD_KEY", format!("{good},not-a-key-hunter2"))
        .arg("serve")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("entry 2 of CODESENSEI_FIELD_KEY"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2") && !stderr.contains(&good),
        "{stderr}"
    );
}

#[test]
fn bad_addresses_and_database_urls_are_refused_clearly() {
    let out = command()
        .args(["serve", "--api-addr", "localhost:http"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-addr"));

    let out = command()
        .env("CODESENSEI_FIELD_KEY", FieldKeys::generate_key())
        .env("DATABASE_URL", "postgres://u@localhost/db?sslmode=require")
        .arg("serve")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sslmode=require") && stderr.contains("verify-full"),
        "{stderr}"
    );
}

#[test]
fn quickstart_once_runs_the_whole_thing_and_exits_zero() {
    let dir = open_tempdir();
    let data = dir.path().join("data");
    let out = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "quickstart",
            "--once",
        ])
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("DEVELOPMENT field key"),
        "the dev key must be announced"
    );
    assert!(stdout.contains("CA fingerprint: SHA256:"));
    // The last line is the deployed `current` link, pointing at a complete release.
    let current = std::path::PathBuf::from(stdout.lines().last().expect("output"));
    assert_eq!(current, data.join("deploy/demo/current"), "{stdout}");
    let target = std::fs::read_link(&current).expect("current is a link");
    assert!(target.starts_with("releases/"), "{target:?}");
    let page = std::fs::read_to_string(current.join("index.html")).expect("deployed page");
    assert!(page.contains("Hello from Sensei"));
    assert!(
        stdout.contains("==> switch"),
        "the deploy log is shown: {stdout}"
    );
    // The embedded cluster was stopped on exit.
    assert!(!data.join("postgres/pgdata/postmaster.pid").exists());
    // Running it again on the same data directory works too (the README's first command is
    // run more than once): the re-used agent state must not refuse the new demo's jobs.
    let again = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "quickstart",
            "--once",
        ])
        .output()
        .expect("run");
    assert!(
        again.status.success(),
        "second run:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&again.stdout),
        String::from_utf8_lossy(&again.stderr)
    );
    let second = std::fs::read_link(&current).expect("current is a link");
    assert_ne!(second, target, "the second run deployed a new release");
}

#[tokio::test]
async fn audit_verify_exit_code_tells_clean_from_tampered() {
    let t = sensei_e2e::TestPlane::start().await;
    t.signup("v@example.com", "correct horse battery").await;
    t.login("v@example.com", "correct horse battery").await;
    let run = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            command()
                .env("DATABASE_URL", url)
                .args(["audit", "verify"])
                .output()
                .expect("run")
        })
        .await
        .expect("join")
    };
    let clean = run(t.conninfo.clone()).await;
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("2 row(s), 0 problem(s)"));

    t.db()
        .await
        .batch_execute(
            "BEGIN; SET LOCAL session_replication_role = replica; \
             UPDATE audit_log SET action = 'user.logged_out' WHERE seq = 2; COMMIT;",
        )
        .await
        .expect("tamper");
    let tampered = run(t.conninfo.clone()).await;
    assert_eq!(tampered.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&tampered.stdout);
    assert!(
        stdout.contains("TAMPERED") && stdout.contains("1 problem(s)"),
        "{stdout}"
    );
}

#[tokio::test]
async fn rotate_field_key_command_reports_what_it_rewrote() {
    let old = FieldKeys::generate_key();
    let t = sensei_e2e::TestPlane::start_on(
        fresh_database().await,
        std::sync::Arc::new(FieldKeys::parse(&old).expect("key")),
    )
    .await;
    let new = FieldKeys::generate_key();
    let url = t.conninfo.clone();
    let out = tokio::task::spawn_blocking(move || {
        command()
            .env("DATABASE_URL", url)
            .env("CODESENSEI_FIELD_KEY", format!("{new},{old}"))
            .arg("rotate-field-key")
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rewrote 3 field(s)"), "{stdout}");
}

#[tokio::test]
async fn secrets_never_reach_the_log_even_at_trace_level() {
    let field_key = FieldKeys::generate_key();
    let dir = open_tempdir();
    let mut child = tokio::process::Command::new(control_plane_binary())
        .env("CODESENSEI_FIELD_KEY", &field_key)
        .env("DATABASE_URL", fresh_database().await)
        .env("SENSEI_LOG", "trace")
        .args([
            "--data-dir",
            &dir.path().display().to_string(),
            "serve",
            "--api-addr",
            "127.0.0.1:0",
            "--agent-addr",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = child.stderr.take().expect("stderr");
    let stderr_task = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let mut base = None;
    let mut ca_fp = None;
    while let Ok(Some(line)) = stdout.next_line().await {
        if let Some(rest) = line.strip_prefix("Sensei control plane listening on ") {
            base = Some(rest.to_owned());
        }
        if let Some(fp) = line.strip_prefix("CA fingerprint: ") {
            ca_fp = Some(fp.to_owned());
            break;
        }
    }
    let base = base.expect("listening line");
    assert!(ca_fp.is_some_and(|f| f.starts_with("SHA256:")));
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem"))
        .expect("serve writes the CA certificate to the data directory");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(sensei_certs::tls::client_config_trusting(&ca_pem).expect("tls"))
        .build()
        .expect("client");
    let password = "pa55word-that-must-not-leak";
    let wrong = "wr0ng-guess-that-must-not-leak";
    let r = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({"email": "leak@example.com", "password": password, "account_name": "L"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
    let cookie = sensei_e2e::session_cookie(&r).expect("cookie");
    http.post(format!("{base}/v1/auth/login"))
        .json(&json!({"email": "leak@example.com", "password": wrong}))
        .send()
        .await
        .expect("login");
    let key: serde_json::Value = http
        .post(format!("{base}/v1/api-keys"))
        .header("cookie", &cookie)
        .json(&json!({"name": "k", "scopes": ["audit:read"]}))
        .send()
        .await
        .expect("key")
        .json()
        .await
        .expect("json");
    let secret = key["secret"].as_str().expect("secret").to_owned();
    let _ = child.start_kill();
    let _ = child.wait().await;
    let log = stderr_task.await.expect("stderr");
    assert!(
        log.len() > 1000,
        "trace logging produced almost nothing:\n{log}"
    );
    let cookie_secret = cookie.rsplit('_').next().expect("cookie secret");
    let key_secret = secret.rsplit('_').next().expect("key secret");
    for (what, needle) in [
        ("password", password),
        ("failed password", wrong),
        ("session secret", cookie_secret),
        ("API key secret", key_secret),
        ("field key", field_key.as_str()),
    ] {
        assert!(!log.contains(needle), "the {what} appears in the log");
    }
}
