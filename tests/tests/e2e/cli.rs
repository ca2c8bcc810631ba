//! The real `sensei-control-plane` binary: configuration errors, `audit verify`,
//! `rotate-field-key`, the quickstart, and logs free of secrets.

use std::process::Stdio;

use sensei_control_plane::secrets::field_crypto::FieldKeys;
use sensei_e2e::{control_plane_binary, fresh_database, open_tempdir};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

fn command() -> std::process::Command {
    let mut cmd = std::process::Command::new(control_plane_binary());
    cmd.env_remove("CODESENSEI_FIELD_KEY")
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_OWNER_URL")
        .env_remove("SENSEI_AUDIT_KEY")
        .env_remove("SENSEI_API_ADDR")
        .env_remove("SENSEI_DATA_DIR")
        .env_remove("SENSEI_SIGNUP")
        .env_remove("SENSEI_PUBLIC_URL")
        .stdin(Stdio::null());
    cmd
}

/// `sensei-control-plane serve` as a real process on a fresh database, on loopback ports
/// chosen by the kernel, its standard error collected until it ends.
struct Served {
    child: tokio::process::Child,
    base: String,
    ca_pem: String,
    ca_fingerprint: String,
    stderr: tokio::task::JoinHandle<String>,
    _dir: tempfile::TempDir,
}

async fn serve(field_key: &str, log: &str) -> Served {
    let dir = open_tempdir();
    let owner = fresh_database().await;
    let mut child = tokio::process::Command::new(control_plane_binary())
        .env("CODESENSEI_FIELD_KEY", field_key)
        .env("DATABASE_URL", sensei_e2e::app_conninfo(&owner))
        .env("DATABASE_OWNER_URL", &owner)
        .env("SENSEI_SIGNUP", "open")
        .env("SENSEI_LOG", log)
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
    let stderr = tokio::spawn(async move {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all).await;
        all
    });
    let (mut base, mut ca_fingerprint) = (None, None);
    while let Ok(Some(line)) = stdout.next_line().await {
        if let Some(rest) = line.strip_prefix("Sensei control plane listening on ") {
            base = Some(rest.to_owned());
        }
        if let Some(fp) = line.strip_prefix("CA fingerprint: ") {
            ca_fingerprint = Some(fp.to_owned());
            break;
        }
    }
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem"))
        .expect("serve writes the CA certificate to the data directory");
    Served {
        child,
        base: base.expect("listening line"),
        ca_pem,
        ca_fingerprint: ca_fingerprint.expect("CA fingerprint line"),
        stderr,
        _dir: dir,
    }
}

impl Served {
    /// Stops the process; answers everything it wrote to standard error.
    async fn stop(mut self) -> String {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.stderr.await.expect("stderr")
    }
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
    if sensei_control_plane::store::postgres_cluster::running_as_root() {
        // As root the demo never deploys as root.
        use std::os::unix::fs::MetadataExt;
        assert!(
            stdout.contains("deploys run as the unprivileged user sensei-quickstart"),
            "{stdout}"
        );
        let owner = std::fs::metadata(current.join("index.html"))
            .expect("meta")
            .uid();
        assert_ne!(owner, 0, "the release was written by root");
        let identity = std::fs::metadata(data.join("agent/identity.key")).expect("key");
        assert_eq!(identity.uid(), 0, "the agent's key stays root's");
        assert_eq!(identity.mode() & 0o077, 0, "and nobody else's");
    }
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
    let again_out = String::from_utf8_lossy(&again.stdout);
    // The second run signs in to the same demo account and reuses server and agent.
    let sign_in = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("API: "))
            .and_then(|l| l.split("(sign in: ").nth(1))
            .map(str::to_owned)
            .expect("sign-in line")
    };
    assert_eq!(
        sign_in(&stdout),
        sign_in(&again_out),
        "a new demo account was made"
    );
    assert!(again_out.contains("reused"), "{again_out}");
    let login = std::fs::metadata(data.join("quickstart-login.json")).expect("kept login");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(login.permissions().mode() & 0o777, 0o600);
    for out in [&stdout, &again_out] {
        assert!(out.contains(&format!("Quickstart data directory: {}", data.display())));
        // Where the application is, said as soon as it is deployed, and what to do next.
        let live = out
            .lines()
            .position(|l| l.starts_with("The demo application is live at "))
            .expect("live line");
        let next = out
            .lines()
            .position(|l| l == "Next steps:")
            .expect("next steps");
        assert!(live < next, "{out}");
        assert!(out.contains("/v1/auth/login"), "{out}");
        assert!(out.contains("/openapi.json"), "{out}");
        // The dashboard's address, on the API's listener.
        assert!(
            out.lines()
                .any(|l| l.starts_with("Dashboard: https://") && l.contains("ca.pem")),
            "{out}"
        );
    }
    let db = String::from_utf8_lossy(&again.stderr);
    assert!(!db.contains("a new demo account"), "{db}");
    // The cluster's own log was appended to, not truncated, by the second run.
    let log = std::fs::read_to_string(data.join("postgres/postgres.log")).unwrap_or_default();
    let collector: String = std::fs::read_dir(data.join("postgres/log"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    let starts = format!("{log}{collector}")
        .matches("database system is ready to accept connections")
        .count();
    assert!(
        starts >= 2,
        "the server log kept {starts} start(s):\n{log}\n{collector}"
    );
}

#[test]
fn quickstart_explains_a_data_directory_postgres_cannot_reach() {
    if !sensei_control_plane::store::postgres_cluster::running_as_root() {
        // Without root the cluster runs as this very user, which can reach its own files:
        // there is nothing to refuse.
        return;
    }
    let dir = open_tempdir();
    let closed = dir.path().join("private");
    std::fs::create_dir(&closed).expect("mkdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let data = closed.join("data");
    let out = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "quickstart",
            "--once",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(
        stderr.contains(&closed.display().to_string()),
        "names the directory: {stderr}"
    );
    assert!(stderr.contains("--data-dir"), "says what to do: {stderr}");
    assert!(
        !data.join("postgres/pgdata").exists(),
        "nothing was initialised"
    );
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
                .env("CODESENSEI_FIELD_KEY", sensei_e2e::test_field_key())
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
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(
        stdout.contains("2 row(s) (0 from before the chain was keyed), 0 problem(s)"),
        "{stdout}"
    );

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
    // The CA, the API certificate, the job-signing key and the audit chain key.
    assert!(stdout.contains("rewrote 4 field(s)"), "{stdout}");
}

#[tokio::test]
async fn secrets_never_reach_the_log_even_at_trace_level() {
    let field_key = FieldKeys::generate_key();
    let served = serve(&field_key, "trace").await;
    assert!(served.ca_fingerprint.starts_with("SHA256:"));
    let (base, ca_pem) = (served.base.clone(), served.ca_pem.clone());
    let http = sensei_e2e::api_client(&ca_pem, &base);
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
    let log = served.stop().await;
    assert!(
        log.len() > 1000,
        "trace logging produced almost nothing:\n{log}"
    );
    // A token reads `<kind>_<id>_<secret>` and the base64url secret may itself contain `_`:
    // the needle is everything after the id, never a fragment that could match by chance.
    let token_secret = |token: &str| {
        token
            .splitn(3, '_')
            .nth(2)
            .expect("token secret")
            .to_owned()
    };
    let cookie_token = cookie
        .strip_prefix("sensei_session=")
        .expect("cookie value");
    let cookie_secret = token_secret(cookie_token);
    let key_secret = token_secret(&secret);
    assert!(cookie_secret.len() >= 43 && key_secret.len() >= 43);
    // One access-log line per request, with its route template, status, latency and id.
    let access = log
        .lines()
        .find(|l| l.contains("finished processing request") && l.contains("route=/v1/auth/login"))
        .unwrap_or_else(|| panic!("no access-log line for the login:\n{log}"));
    assert!(access.contains("request_id="), "{access}");
    assert!(access.contains("status=401"), "{access}");
    assert!(access.contains("latency="), "{access}");
    for (what, needle) in [
        ("password", password),
        ("failed password", wrong),
        ("session secret", cookie_secret.as_str()),
        ("API key secret", key_secret.as_str()),
        ("field key", field_key.as_str()),
    ] {
        assert!(!log.contains(needle), "the {what} appears in the log");
    }
}

#[test]
fn an_embedded_database_of_another_major_version_is_refused_and_upgraded_with_pg_upgrade() {
    use sensei_control_plane::store::postgres_cluster::{ClusterOptions, PostgresCluster};
    let dir = open_tempdir();
    let data = dir.path().join("data");
    let root = data.join("postgres");
    std::fs::create_dir_all(&data).expect("mkdir");
    let options = ClusterOptions::default();
    {
        let cluster = PostgresCluster::start(&root, &options).expect("first start");
        let out = std::process::Command::new("psql")
            .args(["-X", "-q", "-d", &cluster.conninfo("postgres")])
            .args([
                "-c",
                "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')",
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let version_file = root.join("pgdata/PG_VERSION");
    let installed = std::fs::read_to_string(&version_file)
        .expect("PG_VERSION")
        .trim()
        .to_owned();
    let older = (installed.parse::<u32>().expect("major") - 1).to_string();
    // As if the data were made by the previous major version.
    std::fs::write(&version_file, format!("{older}\n")).expect("pretend");
    let err = PostgresCluster::start(&root, &options)
        .err()
        .expect("another major version is refused")
        .to_string();
    assert!(err.contains(&format!("PostgreSQL {older}")), "{err}");
    assert!(err.contains(&installed), "{err}");
    assert!(
        err.contains("sensei-control-plane upgrade-embedded-db"),
        "{err}"
    );
    // The upgrade needs the old binaries and says which package has them.
    let out = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "upgrade-embedded-db",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("postgresql-{older}")), "{stderr}");
    std::fs::write(&version_file, format!("{installed}\n")).expect("restore");
    // Same version: nothing to do.
    let out = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "upgrade-embedded-db",
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    // Naming the old binaries runs the real pg_upgrade (here from the installed version to
    // itself, the only one this machine has): the data survive in the new directory.
    let bindir = PostgresCluster::find_binaries().expect("binaries");
    let out = command()
        .args([
            "--data-dir",
            &data.display().to_string(),
            "upgrade-embedded-db",
            "--old-bindir",
        ])
        .arg(&bindir)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("upgraded PostgreSQL {installed} -> {installed}")),
        "{stdout}"
    );
    let previous = std::fs::read_dir(&root)
        .expect("root")
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("pgdata.pg{installed}."))
        })
        .expect("the old data directory is kept");
    assert!(previous.path().join("PG_VERSION").exists());
    let cluster = PostgresCluster::start(&root, &options).expect("starts after the upgrade");
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-At",
            "-d",
            &cluster.conninfo("postgres"),
            "-c",
            "SELECT v FROM kept",
        ])
        .output()
        .expect("psql");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "survives");
}

#[tokio::test]
async fn serve_refuses_a_role_that_could_rewrite_the_audit_log() {
    let owner = fresh_database().await;
    let dir = open_tempdir();
    // One role for everything, as before the two-role setup: the superuser owns the tables.
    let out = tokio::task::spawn_blocking(move || {
        command()
            .env("CODESENSEI_FIELD_KEY", FieldKeys::generate_key())
            .env("DATABASE_URL", &owner)
            .env("DATABASE_OWNER_URL", &owner)
            .args(["--data-dir", &dir.path().display().to_string(), "serve"])
            .args(["--api-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0"])
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve: postgres is a superuser")
            && stderr.contains("Two database roles"),
        "{stderr}"
    );
}

#[tokio::test]
async fn serve_without_the_owner_needs_a_migrated_schema_and_migrate_provides_it() {
    let owner = fresh_database().await;
    let app = sensei_e2e::app_conninfo(&owner);
    let dir = open_tempdir();
    let data_dir = dir.path().display().to_string();
    let run = move |args: &'static [&'static str], with_owner: bool| {
        let (owner, app, data_dir) = (owner.clone(), app.clone(), data_dir.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut cmd = command();
                cmd.env("CODESENSEI_FIELD_KEY", sensei_e2e::test_field_key())
                    .env("DATABASE_URL", &app)
                    .args(["--data-dir", &data_dir])
                    .args(args);
                if with_owner {
                    cmd.env("DATABASE_OWNER_URL", &owner);
                }
                cmd.output().expect("run")
            })
            .await
            .expect("join")
        }
    };
    let out = run(&["audit", "verify"], false).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("schema is at migration 0") && stderr.contains("migrate"),
        "{stderr}"
    );
    let out = run(&["migrate"], true).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sensei_app granted"), "{stdout}");
    let out = run(&["audit", "verify"], false).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_signed_export_checks_without_the_database_and_shows_any_change() {
    let t = sensei_e2e::TestPlane::start().await;
    let (_, signup) = t.signup("x@example.com", "correct horse battery").await;
    t.login("x@example.com", "correct horse battery").await;
    let account = signup["account"]["id"]
        .as_str()
        .expect("account")
        .to_owned();
    let dir = open_tempdir();
    let key_file = dir.path().join("audit-signing.key");
    let export_file = dir.path().join("export.json");
    let keygen = command()
        .args(["generate-audit-signing-key", "--out"])
        .arg(&key_file)
        .output()
        .expect("keygen");
    assert!(keygen.status.success());
    let public_key = String::from_utf8_lossy(&keygen.stdout).trim().to_owned();
    assert_eq!(public_key.len(), 64);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let url = t.conninfo.clone();
    let key_arg = key_file.clone();
    let out = tokio::task::spawn_blocking(move || {
        command()
            .env("DATABASE_URL", url)
            .env("CODESENSEI_FIELD_KEY", sensei_e2e::test_field_key())
            .args(["audit", "export", "--chain", &account, "--signing-key"])
            .arg(key_arg)
            .output()
            .expect("export")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&export_file, &out.stdout).expect("write export");
    let check = |file: &std::path::Path, key: &str| {
        command()
            .args(["audit", "check-export"])
            .arg(file)
            .args(["--public-key", key])
            .output()
            .expect("check")
    };
    let good = check(&export_file, &public_key);
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("2 row(s)") && stdout.contains("signature good"),
        "{stdout}"
    );

    // One changed character in a row: the signature no longer holds.
    let text = std::fs::read_to_string(&export_file).expect("read");
    let changed = text.replacen("user.logged_in", "user.logged_ot", 1);
    assert_ne!(changed, text);
    let tampered = dir.path().join("tampered.json");
    std::fs::write(&tampered, changed).expect("write");
    let bad = check(&tampered, &public_key);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("signature does not match"));
    // Another key's holder cannot vouch for it either.
    let other = dir.path().join("other.key");
    let other_key = command()
        .args(["generate-audit-signing-key", "--out"])
        .arg(&other)
        .output()
        .expect("keygen");
    let other_public = String::from_utf8_lossy(&other_key.stdout).trim().to_owned();
    assert_eq!(check(&export_file, &other_public).status.code(), Some(1));
}

/// A SoftHSM2 token of its own: a configuration and a token directory under `dir`.
struct SoftHsm {
    conf: std::path::PathBuf,
}

impl SoftHsm {
    const MODULE: &'static str = "/usr/lib/softhsm/libsofthsm2.so";
    const PIN: &'static str = "1234";

    fn new(dir: &std::path::Path) -> Self {
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).expect("token directory");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        Self { conf }
    }

    /// Initialises a token labelled `label` in the next free slot.
    fn init_token(&self, label: &str) {
        let out = std::process::Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", Self::PIN, "--so-pin", "5678"])
            .output()
            .expect("softhsm2-util (Debian package softhsm2)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The control plane's command with this HSM as its key provider.
    fn command(&self, token: &str, pin: &str) -> std::process::Command {
        let mut cmd = command();
        cmd.env("SOFTHSM2_CONF", &self.conf)
            .env(
                "SENSEI_FIELD_KEY_PROVIDER",
                format!("pkcs11:token={token};key=field"),
            )
            .env("SENSEI_PKCS11_MODULE", Self::MODULE)
            .env("SENSEI_PKCS11_PIN", pin);
        cmd
    }
}

fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn field_keys_wrapped_by_an_hsm_work_and_open_nothing_without_it() {
    let owner = fresh_database().await;
    let app = sensei_e2e::app_conninfo(&owner);
    let dir = open_tempdir();
    let data_dir = dir.path().join("data").display().to_string();
    tokio::task::spawn_blocking(move || {
        let hsm = SoftHsm::new(dir.path());
        hsm.init_token("sensei");
        let with = |token: &str, pin: &str, keys: &str, args: &[&str]| {
            hsm.command(token, pin)
                .env("CODESENSEI_FIELD_KEY", keys)
                .env("DATABASE_URL", &app)
                .env("DATABASE_OWNER_URL", &owner)
                .args(["--data-dir", &data_dir])
                .args(args)
                .output()
                .expect("run")
        };
        let pin = SoftHsm::PIN;
        // A key is needed before anything can be wrapped; it is made inside the token.
        let out = with("sensei", pin, "", &["generate-field-key"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("hsm-create-key"));
        let created = succeeded(&with("sensei", pin, "", &["hsm-create-key"]));
        assert!(created.contains("created"), "{created}");
        let again = succeeded(&with("sensei", pin, "", &["hsm-create-key"]));
        assert!(again.contains("already exists"), "{again}");
        let first = succeeded(&with("sensei", pin, "", &["generate-field-key"]));
        assert!(first.starts_with("p11:"), "{first}");
        let plain = succeeded(&with("sensei", pin, "", &["generate-field-key", "--plain"]));
        assert!(
            FieldKeys::parse(&plain).is_ok(),
            "--plain prints a Fernet key"
        );

        // Sealing and opening through the HSM: create-owner seals the audit chain's key and
        // writes rows; audit verify opens the key and checks them.
        succeeded(&with("sensei", pin, &first, &["migrate"]));
        succeeded(&with(
            "sensei",
            pin,
            &first,
            &[
                "create-owner",
                "--email",
                "hsm@example.com",
                "--account",
                "Vault",
            ],
        ));
        let verified = succeeded(&with("sensei", pin, &first, &["audit", "verify"]));
        assert!(verified.contains("0 problem(s)"), "{verified}");

        // Rotation: a second wrapped key first, everything rewritten under it, the old dropped.
        let second = succeeded(&with("sensei", pin, "", &["generate-field-key"]));
        let both = format!("{second},{first}");
        let rotated = succeeded(&with("sensei", pin, &both, &["rotate-field-key"]));
        assert!(rotated.contains("rewrote 1 field(s)"), "{rotated}");
        let verified = succeeded(&with("sensei", pin, &second, &["audit", "verify"]));
        assert!(verified.contains("0 problem(s)"), "{verified}");

        // The environment without the HSM opens nothing: the wrapped keys are not keys.
        let out = command()
            .env("CODESENSEI_FIELD_KEY", &second)
            .env("DATABASE_URL", &app)
            .args(["--data-dir", &data_dir, "audit", "verify"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("entry 1 of CODESENSEI_FIELD_KEY is not a Fernet key"),
            "{stderr}"
        );
        assert!(FieldKeys::parse(&second).is_err());
        // A wrong PIN is refused and not echoed.
        let out = with("sensei", "987654", &second, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("refused the PIN") && !stderr.contains("987654"),
            "{stderr}"
        );
        // Another token's key (same labels) does not unwrap these keys.
        hsm.init_token("other");
        succeeded(&with("other", pin, "", &["hsm-create-key"]));
        let out = with("other", pin, &second, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("does not unwrap with the HSM's key"),
            "{stderr}"
        );
        assert!(
            !stderr.contains(&second[4..20]),
            "the wrapped key is not echoed"
        );
    })
    .await
    .expect("join");
}

/// What an agent sends that the control plane logs (its version, a job refusal's reason) is
/// logged escaped: a newline in it cannot start a line of its own in the operator's log, so a
/// hostile agent cannot forge entries (here, one that would read as a revocation).
#[tokio::test]
async fn an_agent_cannot_forge_lines_in_the_control_planes_log() {
    use sensei_shared::codec::io::{read_frame, write_frame};
    use sensei_shared::protocol::{AgentMessage, ControlMessage};

    let served = serve(&FieldKeys::generate_key(), "info").await;
    let (base, ca_pem) = (served.base.clone(), served.ca_pem.clone());
    let http = sensei_e2e::api_client(&ca_pem, &base);
    let call =
        |method: reqwest::Method, path: &str, cookie: Option<&str>, body: serde_json::Value| {
            let mut request = http.request(method, format!("{base}{path}")).json(&body);
            if let Some(cookie) = cookie {
                request = request.header("cookie", cookie);
            }
            request.send()
        };
    let r = call(
        reqwest::Method::POST,
        "/v1/auth/signup",
        None,
        json!({"email": "forge@example.com", "password": "correct horse battery", "account_name": "F"}),
    )
    .await
    .expect("signup");
    assert_eq!(r.status(), 201);
    let cookie = sensei_e2e::session_cookie(&r).expect("cookie");
    let server: serde_json::Value = call(
        reqwest::Method::POST,
        "/v1/servers",
        Some(&cookie),
        json!({"name": "forger", "host": "forger.example", "transport": "agent"}),
    )
    .await
    .expect("server")
    .json()
    .await
    .expect("json");
    let agent_dir = open_tempdir();
    let options = sensei_agent::enroll::EnrollOptions {
        control_plane: server["agent_endpoint"]
            .as_str()
            .expect("agent endpoint")
            .to_owned(),
        token: server["enrollment_token"]
            .as_str()
            .expect("token")
            .to_owned(),
        ca_fingerprint: served.ca_fingerprint.parse().expect("fingerprint"),
        expected_server_id: None,
        state_dir: sensei_agent::identity::StateDir::new(agent_dir.path().join("state")),
    };
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll");
    let identity = options.state_dir.load().expect("identity");

    let forged = "FORGED certificate revoked for every server";
    let session = sensei_e2e::driven_session(&identity, &format!("1.0\n{forged}")).await;
    assert!(
        matches!(session.welcome, Some(ControlMessage::Welcome { .. })),
        "{:?}",
        session.welcome
    );
    let project: serde_json::Value = call(
        reqwest::Method::POST,
        "/v1/projects",
        Some(&cookie),
        json!({"name": "f", "repo_url": "https://example.com/f.git", "deploy_path": "/srv/f"}),
    )
    .await
    .expect("project")
    .json()
    .await
    .expect("json");
    let r = call(
        reqwest::Method::POST,
        "/v1/deployments",
        Some(&cookie),
        json!({"project_id": project["id"], "server_id": identity.meta.server_id, "ref": "main"}),
    )
    .await
    .expect("deploy");
    assert_eq!(r.status(), 201);
    let (mut send, mut recv, job) = sensei_e2e::poll_on(&session.connection).await;
    assert!(matches!(job, Some(ControlMessage::Job(_))), "{job:?}");
    write_frame(
        &mut send,
        &AgentMessage::JobRefused {
            job_id: None,
            reason: format!("bad signature\r\n{forged}"),
        },
    )
    .await
    .expect("refusal");
    let recorded = tokio::time::timeout(std::time::Duration::from_secs(10), read_frame(&mut recv))
        .await
        .expect("recorded within 10 s");
    assert!(
        matches!(recorded, Ok(Some(ControlMessage::JobRecorded))),
        "{recorded:?}"
    );
    let log = served.stop().await;
    // Both were logged, and neither started a line.
    assert!(log.contains("agent connected"), "{log}");
    assert!(log.contains("the agent refused a job"), "{log}");
    assert_eq!(
        log.matches(forged).count(),
        2,
        "each text logged once:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with("FORGED")),
        "a line was forged:\n{log}"
    );
}
