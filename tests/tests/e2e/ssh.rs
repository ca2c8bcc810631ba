//! The SSH fallback runner against a real OpenSSH server, logging in as a non-root user.

use std::os::unix::fs::MetadataExt;

use sensei_e2e::{
    git_commit, git_repo, give_to_deploy_user, open_tempdir, SshServer, TestPlane, DEPLOY_PASSWORD,
    DEPLOY_USER,
};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

struct Ssh {
    t: TestPlane,
    cookie: String,
    sshd: SshServer,
    server: Value,
    project: String,
    repo: std::path::PathBuf,
    app: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(server_extra: Value) -> Ssh {
    setup_on(TestPlane::start().await, server_extra).await
}

async fn setup_on(t: TestPlane, server_extra: Value) -> Ssh {
    let (cookie, _) = t
        .signup(
            &format!("s{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let sshd = SshServer::start();
    let server = t
        .create_ssh_server(&cookie, "legacy-1", &sshd, server_extra)
        .await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    give_to_deploy_user(&repo);
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).expect("app dir");
    give_to_deploy_user(&app);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({
                "name": "legacy",
                "repo_url": repo.display().to_string(),
                "deploy_path": app.display().to_string(),
                "shared_paths": ["storage/"],
                "hooks": {"build": ["echo building as $(id -un)"]},
                "health_check": "test -s index.html",
                "env": {"DB_PASSWORD": "ssh-env-secret"},
            }),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    Ssh {
        project: project["id"].as_str().expect("id").to_owned(),
        t,
        cookie,
        sshd,
        server,
        repo,
        app,
        _dir: dir,
    }
}

impl Ssh {
    fn server_id(&self) -> &str {
        self.server["id"].as_str().expect("id")
    }

    async fn deploy(&self) -> Value {
        self.t
            .deploy_and_wait(&self.cookie, &self.project, self.server_id(), "main")
            .await
    }

    fn current(&self) -> String {
        sensei_e2e::current_link(&self.app)
    }

    async fn log(&self, d: &Value) -> String {
        let (_, log) = self
            .t
            .get(
                &format!("/v1/deployments/{}/logs", d["id"].as_str().expect("id")),
                &self.cookie,
            )
            .await;
        log.to_string()
    }
}

#[tokio::test]
async fn deploy_over_ssh_as_a_non_root_user() {
    let s = setup(json!({})).await;
    // The fingerprint is the one ssh-keygen prints for the authorized_keys line.
    let line = s.server["public_key"]
        .as_str()
        .expect("public key shown once");
    assert!(
        line.starts_with("ssh-ed25519 AAAA")
            && line.ends_with(&format!("sensei-{}", s.server_id()))
    );
    let keyfile = s._dir.path().join("key.pub");
    std::fs::write(&keyfile, line).expect("write");
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&keyfile)
        .output()
        .expect("ssh-keygen");
    let printed = String::from_utf8_lossy(&out.stdout);
    let fingerprint = s.server["fingerprint"].as_str().expect("fingerprint");
    assert_eq!(
        printed.split_whitespace().nth(1),
        Some(fingerprint),
        "{printed}"
    );
    let (_, shown) =
        s.t.get(&format!("/v1/servers/{}", s.server_id()), &s.cookie)
            .await;
    assert_eq!(shown["fingerprint"], fingerprint);
    assert!(
        shown.get("public_key").is_none(),
        "the key is shown once only"
    );
    let sealed: String =
        s.t.db()
            .await
            .query_one("SELECT ssh_private_key_ciphertext FROM servers", &[])
            .await
            .expect("row")
            .get(0);
    assert!(
        sealed.starts_with("gAAAAA"),
        "the private key is not sealed"
    );

    let d = s.deploy().await;
    assert_eq!(d["status"], "succeeded", "{d}\n{}", s.log(&d).await);
    assert_eq!(
        s.current(),
        format!("releases/{}", d["release_id"].as_str().expect("release"))
    );
    assert_eq!(
        std::fs::read_to_string(s.app.join("current/index.html")).expect("page"),
        "v1"
    );
    let log = s.log(&d).await;
    assert!(log.contains(&format!("building as {DEPLOY_USER}")), "{log}");
    assert!(log.contains("==> switch"));
    assert!(!log.contains("ssh-env-secret"));
    // Everything was written by the deploy user, not root.
    let (uid, _) = sensei_e2e::deploy_user();
    let release = s
        .app
        .join("releases")
        .join(d["release_id"].as_str().expect("release"));
    assert_eq!(std::fs::metadata(&release).expect("release").uid(), uid);
    assert_eq!(
        std::fs::metadata(s.app.join("shared/.env"))
            .expect("env")
            .uid(),
        uid
    );
    // The host key was pinned at this first connection.
    let (_, shown) =
        s.t.get(&format!("/v1/servers/{}", s.server_id()), &s.cookie)
            .await;
    let pinned = shown["host_key"].as_str().expect("pinned host key");
    assert_eq!(
        pinned.split_whitespace().take(2).collect::<Vec<_>>(),
        s.sshd
            .host_key_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
    );
}

/// The SSH runner holds the only copy of an SSH deploy's result (an agent keeps its own and
/// reports it again; an SSH server does not). One the database refuses is written again until
/// it is taken: dropped at the first error, the job stayed running for good and its server
/// took no other.
#[tokio::test]
async fn an_ssh_result_the_database_refused_is_written_again_not_lost() {
    let s = setup(json!({})).await;
    let db = s.t.db().await;
    let ends = "test_refused_ssh_ends";
    sensei_e2e::refuse_job_ends(&db, ends).await;
    let (status, d) =
        s.t.post(
            "/v1/deployments",
            &s.cookie,
            json!({"project_id": s.project, "server_id": s.server_id(), "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    let id = d["id"].as_str().expect("id");
    // More attempts than one round of retries: the runner went on after the round.
    let round = sensei_control_plane::jobs::record::RECORD_RETRIES.len() as i64 + 1;
    let refused = sensei_e2e::fired_more_than(&db, ends, round).await;
    assert!(refused > round, "attempts to record the end: {refused}");
    let (_, running) = s.t.get(&format!("/v1/deployments/{id}"), &s.cookie).await;
    assert_eq!(running["status"], "running", "{running}");
    db.batch_execute(&format!("DROP TRIGGER {ends} ON deployments"))
        .await
        .expect("take ends again");
    let done = s.t.wait_deployment(&s.cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        std::fs::read_to_string(s.app.join("current/index.html")).expect("page"),
        "v1"
    );
}

#[tokio::test]
async fn a_removed_key_fails_at_authentication_and_the_app_keeps_running() {
    let s = setup(json!({})).await;
    assert_eq!(s.deploy().await["status"], "succeeded");
    let live = s.current();
    s.sshd.set_authorized_keys("");
    git_commit(&s.repo, "v2");
    let d = s.deploy().await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"]["step"], "connect");
    let message = d["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("SSH authentication failed") && message.contains("authorized_keys"),
        "{message}"
    );
    assert_eq!(s.current(), live);
    assert_eq!(
        std::fs::read_to_string(s.app.join("current/index.html")).expect("page"),
        "v1"
    );
}

#[tokio::test]
async fn a_changed_host_key_is_refused() {
    let other = open_tempdir();
    let key = other.path().join("k");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .expect("keygen");
    assert!(out.status.success());
    let wrong = std::fs::read_to_string(other.path().join("k.pub")).expect("pub");
    let s = setup(json!({"host_key": wrong.trim()})).await;
    let d = s.deploy().await;
    assert_eq!(d["status"], "failed");
    let message = d["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("host key changed"), "{message}");
    assert!(!s.app.join("current").exists());
    let (status, v) = s
        .t
        .post("/v1/servers", &s.cookie, json!({"name": "x", "host": "h", "username": "u", "transport": "ssh", "host_key": "ssh-ed25519 garbage"}))
        .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (422, "invalid_host_key")
    );
}

#[tokio::test]
async fn the_legacy_password_flow_deploys() {
    let s = setup(json!({"auth": "password", "password": DEPLOY_PASSWORD})).await;
    assert!(s.server.get("public_key").is_none_or(Value::is_null));
    let d = s.deploy().await;
    assert_eq!(d["status"], "succeeded", "{d}\n{}", s.log(&d).await);
    let sealed: String =
        s.t.db()
            .await
            .query_one("SELECT ssh_password_ciphertext FROM servers", &[])
            .await
            .expect("row")
            .get(0);
    assert!(sealed.starts_with("gAAAAA") && !sealed.contains(DEPLOY_PASSWORD));
}

#[tokio::test]
async fn deleting_an_ssh_server_erases_its_credentials() {
    let s = setup(json!({})).await;
    let r =
        s.t.http
            .delete(s.t.url(&format!("/v1/servers/{}", s.server_id())))
            .header("cookie", &s.cookie)
            .send()
            .await
            .expect("delete");
    assert_eq!(r.status(), 204);
    let row = s
        .t
        .db()
        .await
        .query_one(
            "SELECT ssh_private_key_ciphertext IS NULL, ssh_password_ciphertext IS NULL, deleted_at IS NOT NULL FROM servers",
            &[],
        )
        .await
        .expect("row");
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert!(s
        .t
        .audit_actions()
        .await
        .contains(&"server.deleted".to_owned()));
}

#[tokio::test]
async fn rotated_ssh_credentials_still_deploy() {
    let conninfo = sensei_e2e::fresh_database().await;
    let old = sensei_control_plane::secrets::field_crypto::FieldKeys::generate_key();
    let keys = std::sync::Arc::new(
        sensei_control_plane::secrets::field_crypto::FieldKeys::parse(&old).expect("key"),
    );
    let t = TestPlane::start_on(conninfo.clone(), keys).await;
    let s = setup_on(t, json!({})).await;
    let new = sensei_control_plane::secrets::field_crypto::FieldKeys::generate_key();
    let both =
        sensei_control_plane::secrets::field_crypto::FieldKeys::parse(&format!("{new},{old}"))
            .expect("keys");
    let report = sensei_control_plane::secrets::rotate::rotate(s.t.plane.pool(), &both)
        .await
        .expect("rotate");
    // CA, API certificate, job-signing key, audit chain key, project env, SSH key.
    assert_eq!(report.rewritten, 6, "{report:?}");
    // A control plane holding only the new key deploys over SSH.
    let Ssh {
        t,
        cookie,
        sshd,
        server,
        project,
        repo,
        app,
        _dir,
    } = s;
    let agent_addr = "127.0.0.1:0".parse().expect("addr");
    t.plane.shutdown().await;
    let t = TestPlane::start_at(
        conninfo,
        std::sync::Arc::new(
            sensei_control_plane::secrets::field_crypto::FieldKeys::parse(&new).expect("new"),
        ),
        agent_addr,
    )
    .await;
    let s = Ssh {
        t,
        cookie,
        sshd,
        server,
        project,
        repo,
        app,
        _dir,
    };
    let cookie = s.t.login(&s.cookie_email().await, PW).await;
    let s = Ssh { cookie, ..s };
    let d = s.deploy().await;
    assert_eq!(d["status"], "succeeded", "{d}");
}

impl Ssh {
    async fn cookie_email(&self) -> String {
        self.t
            .db()
            .await
            .query_one("SELECT email FROM users LIMIT 1", &[])
            .await
            .expect("user")
            .get(0)
    }
}

/// The release script's defences hold over SSH exactly as on an agent: one engine, one line
/// assembler. A hostile repository commits a symlink under a shared path; a hook reads
/// standard input; a hook prints an endless line and bytes that are not UTF-8.
#[tokio::test]
async fn the_release_scripts_defences_hold_over_ssh_too() {
    let s = setup(json!({})).await;
    let patch = |body: Value| {
        let (t, cookie, project) = (&s.t, &s.cookie, &s.project);
        async move {
            let r = t
                .http
                .patch(t.url(&format!("/v1/projects/{project}")))
                .header("cookie", cookie)
                .json(&body)
                .send()
                .await
                .expect("patch");
            assert_eq!(r.status(), 200);
        }
    };
    // A hook that reads stdin cannot swallow the rest of the script.
    patch(json!({"hooks": {"build": ["cat > swallowed.txt; echo read $(wc -c < swallowed.txt) bytes"]}})).await;
    let d = s.deploy().await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert!(s.log(&d).await.contains("read 0 bytes"));
    // Output bounded and kept lossily.
    patch(json!({"hooks": {"build": [
        "head -c 3000000 /dev/zero | tr '\\0' 'x'; echo; printf 'bad \\377 bytes\\n'; echo after"
    ]}}))
    .await;
    let d = s.deploy().await;
    assert_eq!(d["status"], "succeeded", "{d}");
    let (_, log) =
        s.t.get(
            &format!("/v1/deployments/{}/logs", d["id"].as_str().expect("id")),
            &s.cookie,
        )
        .await;
    let lines: Vec<&str> = log["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l["line"].as_str())
        .collect();
    let long = lines
        .iter()
        .find(|l| l.starts_with("xxxx"))
        .expect("the long line");
    assert!(
        long.len() < sensei_shared::lines::MAX_LINE + 64,
        "{} bytes kept",
        long.len()
    );
    assert!(long.ends_with(&format!(
        " …[{} bytes cut]",
        3_000_000 - sensei_shared::lines::MAX_LINE
    )));
    assert!(lines.contains(&"bad \u{fffd} bytes"), "{lines:?}");
    assert!(lines.contains(&"after"));
    // A committed symlink under a shared path's parent is refused, and nothing outside the
    // release is touched.
    let outside = s.app.parent().expect("dir").join("victim");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::fs::write(outside.join("local.ini"), "precious").expect("victim");
    give_to_deploy_user(&outside);
    std::os::unix::fs::symlink(&outside, s.repo.join("config")).expect("link");
    sensei_e2e::git(&s.repo, &["add", "config"]);
    git_commit(&s.repo, "v2 with a hostile link");
    give_to_deploy_user(&s.repo);
    patch(json!({"hooks": {"build": []}, "shared_paths": ["config/local.ini"]})).await;
    let before = s.current();
    let d = s.deploy().await;
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["error"]["step"], "link", "{d}");
    assert!(
        d["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("config is a symbolic link")),
        "{d}"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("local.ini")).expect("victim"),
        "precious"
    );
    assert_eq!(s.current(), before, "the running release is untouched");
}
