//! The real `sensei` binary against a real control plane, real agents and real git: sign-in
//! with TOTP and a pinned CA, enrolling with the printed command, deploys followed live and
//! their exit codes, a rollout watched to the end, rollbacks (by release and through the
//! interactive picker in a pseudo-terminal), CI keys and their idempotency.

use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};

use sensei_e2e::{
    eventually, git_commit, git_repo, open_tempdir, totp_code, workspace_binary, TestPlane,
};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const PW: &str = "correct horse battery";

/// One user's `sensei`, with its own configuration directory.
struct Cli {
    config: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Cli {
    fn new() -> Self {
        Self {
            config: open_tempdir(),
            env: Vec::new(),
        }
    }

    /// A CI job's `sensei`: the key, URL and CA pin from the environment.
    fn ci(t: &TestPlane, key: &str) -> Self {
        let mut cli = Self::new();
        cli.env = vec![
            ("SENSEI_URL".into(), t.base.clone()),
            ("SENSEI_API_KEY".into(), key.into()),
            (
                "SENSEI_CA_FINGERPRINT".into(),
                t.plane.ca_fingerprint().to_string(),
            ),
        ];
        cli
    }

    fn credentials(&self) -> std::path::PathBuf {
        self.config.path().join("sensei/credentials.json")
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(workspace_binary("sensei"));
        cmd.args(args)
            .env("XDG_CONFIG_HOME", self.config.path())
            .env_remove("SENSEI_URL")
            .env_remove("SENSEI_API_KEY")
            .env_remove("SENSEI_CA_FINGERPRINT")
            .env_remove("SENSEI_IDEMPOTENCY_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn run_with_input(&self, args: &[&str], input: &str) -> Output {
        let mut child = self.command(args).spawn().expect("sensei runs");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).await.expect("stdin");
        drop(stdin);
        // An upper bound for a loaded CI machine, not a timing: a deploy takes seconds.
        tokio::time::timeout(
            std::time::Duration::from_secs(180),
            child.wait_with_output(),
        )
        .await
        .expect("sensei ends")
        .expect("sensei output")
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_with_input(args, "").await
    }

    /// Runs and expects exit 0; answers standard output.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "sensei {args:?}: {}",
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut with = vec!["--json"];
        with.extend_from_slice(args);
        serde_json::from_str(&self.ok(&with).await).expect("--json prints JSON")
    }

    async fn login(&self, t: &TestPlane, email: &str, extra: &[&str]) -> Output {
        let fingerprint = t.plane.ca_fingerprint().to_string();
        let mut args = vec![
            "login",
            &t.base,
            "--email",
            email,
            "--password-stdin",
            "--ca-fingerprint",
            &fingerprint,
        ];
        args.extend_from_slice(extra);
        self.run_with_input(&args, &format!("{PW}\n")).await
    }
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A project whose repository and deploy directory live in a temp dir.
struct Site {
    repo: std::path::PathBuf,
    app: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn site() -> Site {
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    Site {
        repo,
        app: dir.path().join("app"),
        _dir: dir,
    }
}

fn served(app: &std::path::Path) -> String {
    std::fs::read_to_string(app.join("current/index.html")).unwrap_or_default()
}

async fn deployments(t: &TestPlane) -> i64 {
    t.count("SELECT count(*) FROM deployments").await
}

#[tokio::test]
async fn login_with_totp_enroll_with_the_printed_command_deploy_and_fail_a_deploy() {
    let t = TestPlane::start().await;
    let email = "cli@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let secret = t.enable_totp(&cookie).await;
    let cli = Cli::new();

    // Off a terminal the second factor must be given; a CA that is not the plane's is refused
    // before the password is sent; nothing is stored either time.
    let out = cli.login(&t, email, &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).contains("--totp"), "{}", show(&out));
    let forged = format!("SHA256:{}", "ab".repeat(32));
    let out = cli
        .run_with_input(
            &[
                "login",
                &t.base,
                "--email",
                email,
                "--password-stdin",
                "--ca-fingerprint",
                &forged,
            ],
            &format!("{PW}\n"),
        )
        .await;
    assert_eq!(out.status.code(), Some(5), "{}", show(&out));
    assert!(
        stderr(&out).contains("does not match the pinned fingerprint"),
        "{}",
        show(&out)
    );
    assert!(!cli.credentials().exists());

    let code = totp_code(&secret, 1);
    let out = cli.login(&t, email, &["--totp", &code]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mode = std::fs::metadata(cli.credentials())
        .expect("stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let stored = std::fs::read_to_string(cli.credentials()).expect("read");
    assert!(!stored.contains(PW), "the password is never stored");
    assert!(cli.ok(&["whoami"]).await.contains(email));

    // Add an agent server; the printed line enrolls the real agent.
    let printed = cli
        .ok(&["servers", "add", "web-1", "--agent", "--label", "role=web"])
        .await;
    let line = printed
        .lines()
        .find(|l| l.starts_with("sudo sensei-agent enroll "))
        .unwrap_or_else(|| panic!("no enroll command in {printed}"));
    let state = open_tempdir();
    let words: Vec<&str> = line.split_whitespace().skip(2).collect();
    let enroll = tokio::process::Command::new(workspace_binary("sensei-agent"))
        .args(&words)
        .env("SENSEI_AGENT_STATE_DIR", state.path().join("agent"))
        .output()
        .await
        .expect("sensei-agent runs");
    assert!(enroll.status.success(), "{}", show(&enroll));
    let state_dir = sensei_agent::identity::StateDir::new(state.path().join("agent"));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(async move {
        sensei_agent::session::run(
            &state_dir,
            sensei_agent::jobs::JobPolicy::default(),
            stopped,
        )
        .await
    });
    let listed = || async {
        let v = cli.json(&["servers", "list", "--label", "role=web"]).await;
        v["servers"][0]["agent"]["connected"] == true
    };
    assert!(eventually(std::time::Duration::from_secs(30), listed).await);

    // A project, a secret, a deploy followed live.
    let s = site();
    let repo = s.repo.display().to_string();
    let app = s.app.display().to_string();
    cli.ok(&[
        "projects",
        "create",
        "site",
        "--repo",
        &repo,
        "--path",
        &app,
        "--build",
        "echo building $(cat index.html)",
        "--post-switch",
        "echo switched",
    ])
    .await;
    let out = cli
        .run_with_input(&["env", "set", "site", "SECRET_TOKEN"], "s3cr3t-value\n")
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        !show(&out).contains("s3cr3t-value"),
        "a value is never shown"
    );
    let names = cli.ok(&["env", "list", "site"]).await;
    assert_eq!(names.trim(), "SECRET_TOKEN");

    let out = cli
        .run(&["deploy", "site", "--server", "web-1", "--ref", "main"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("building v1"),
        "the hook's output is streamed: {}",
        show(&out)
    );
    assert!(stderr(&out).contains("succeeded"), "{}", show(&out));
    assert_eq!(served(&s.app), "v1");
    let env_file = std::fs::read_to_string(s.app.join("shared/.env")).expect(".env");
    assert!(env_file.contains("s3cr3t-value"));

    // A second variable keeps the first (values are write-only, merged on the plane).
    cli.run_with_input(&["env", "set", "site", "PLAIN"], "x\n")
        .await;
    assert_eq!(
        cli.ok(&["env", "list", "site"]).await,
        "PLAIN\nSECRET_TOKEN\n"
    );
    cli.ok(&["env", "unset", "site", "PLAIN"]).await;
    assert_eq!(cli.ok(&["env", "list", "site"]).await, "SECRET_TOKEN\n");

    // A failing build: non-zero, the step on stderr, the application untouched.
    cli.ok(&[
        "projects",
        "edit",
        "site",
        "--build",
        "echo about to fail; exit 3",
    ])
    .await;
    let shown = cli.json(&["projects", "show", "site"]).await;
    assert_eq!(
        shown["hooks"]["post_switch"],
        json!(["echo switched"]),
        "editing the build hooks keeps the other kinds"
    );
    let out = cli.run(&["deploy", "site", "--server", "web-1"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("failed at step build"),
        "{}",
        show(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("about to fail"));
    assert_eq!(served(&s.app), "v1");

    let history = cli.json(&["history", "site"]).await;
    let statuses: Vec<&str> = history["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses, ["failed", "succeeded"]);

    // Signed out on the plane too: the stored session no longer works.
    let session: Value =
        serde_json::from_str(&std::fs::read_to_string(cli.credentials()).expect("read"))
            .expect("json");
    cli.ok(&["logout"]).await;
    assert!(!cli.credentials().exists());
    let cookie = format!(
        "sensei_session={}",
        session["secret"]["value"].as_str().expect("cookie")
    );
    assert_eq!(t.get("/v1/auth/me", &cookie).await.0, 401);
    let out = cli.run(&["servers", "list"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(stderr(&out).contains("sensei login"), "{}", show(&out));
    agent.abort();
}

#[tokio::test]
async fn an_expired_session_says_to_log_in_again() {
    let t = TestPlane::start().await;
    let email = "exp@example.com";
    t.signup(email, PW).await;
    let cli = Cli::new();
    let out = cli.login(&t, email, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    t.db()
        .await
        .execute(
            "UPDATE sessions SET last_seen_at = now() - interval '15 days'",
            &[],
        )
        .await
        .expect("expire");
    let out = cli.run(&["projects", "list"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        stderr(&out).contains("your session has expired or was signed out: run `sensei login`"),
        "{}",
        show(&out)
    );
}

#[tokio::test]
async fn a_rollout_watched_to_the_end_and_rollbacks_by_release_and_through_the_picker() {
    let t = TestPlane::start().await;
    let email = "fleet@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let policy = sensei_agent::jobs::JobPolicy::default;
    let _web1 = t
        .start_labelled_agent(
            &cookie,
            "web-1",
            json!({"role": "web", "zone": "a"}),
            policy(),
        )
        .await;
    let _web2 = t
        .start_labelled_agent(&cookie, "web-2", json!({"role": "web"}), policy())
        .await;
    // An agent that deploys only below a root the project is not in: its deploys fail.
    let fenced = sensei_agent::jobs::JobPolicy {
        allowed_roots: vec!["/srv/elsewhere".into()],
        ..policy()
    };
    let _web3 = t
        .start_labelled_agent(&cookie, "web-3", json!({"zone": "a"}), fenced)
        .await;
    let cli = Cli::new();
    let out = cli.login(&t, email, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let s = site();
    let (repo, app) = (s.repo.display().to_string(), s.app.display().to_string());
    // Both servers are on this one machine and share the deploy path (as on NFS): release ids
    // are unique per job, and keeping ten leaves every release of the test on disk.
    cli.ok(&[
        "projects",
        "create",
        "site",
        "--repo",
        &repo,
        "--path",
        &app,
        "--keep-releases",
        "10",
    ])
    .await;

    // A rollout over both servers, watched to the end: exit 0.
    let out = cli
        .run(&[
            "rollout", "start", "site", "--label", "role=web", "--canary", "1", "--batch", "1",
            "--watch",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stderr(&out).contains("succeeded"), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("web-2"),
        "{}",
        show(&out)
    );
    assert!(
        !show(&out).contains('\x1b'),
        "no bar or colour off a terminal: {}",
        show(&out)
    );
    let rollouts = cli.json(&["rollout", "list"]).await;
    assert_eq!(rollouts["rollouts"][0]["state"], "succeeded");
    assert_eq!(rollouts["rollouts"][0]["target_counts"]["succeeded"], 2);

    // One that waits for approval after its canary: resume is refused (it is not a pause),
    // approve lets it go on, and `status --watch` follows it to the end.
    let started = cli
        .ok(&[
            "rollout",
            "start",
            "site",
            "--label",
            "role=web",
            "--batch",
            "1",
            "--approve",
        ])
        .await;
    let id = started.trim().to_owned();
    let waiting = || async { cli.json(&["rollout", "status", &id]).await["state"] == "paused" };
    assert!(eventually(std::time::Duration::from_secs(60), waiting).await);
    let out = cli.run(&["rollout", "resume", &id]).await;
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(stderr(&out).contains("awaiting approval"), "{}", show(&out));
    cli.ok(&["rollout", "approve", &id]).await;
    let out = cli.run(&["rollout", "status", &id, "--watch"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = cli.run(&["rollout", "abort", &id]).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "an ended rollout cannot be aborted: {}",
        show(&out)
    );

    // A deploy to a label set: web-1 succeeds, web-3 refuses the path. The logs are
    // prefixed by server, the exit code is 1 and the failure is named.
    let app1 = s.app.clone();
    git_commit(&s.repo, "v2");
    let out = cli.run(&["deploy", "site", "--label", "zone=a"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[web-1] ==> fetch"),
        "{}",
        show(&out)
    );
    assert!(stderr(&out).contains("failed on 1 of 2"), "{}", show(&out));
    assert!(
        stderr(&out).contains("web-3: failed at step"),
        "{}",
        show(&out)
    );
    assert_eq!(served(&app1), "v2");
    git_commit(&s.repo, "v3");
    cli.ok(&["deploy", "site", "--server", "web-1"]).await;
    assert_eq!(served(&app1), "v3");

    // Back to v1 by its release id, taken from the history's JSON.
    let history = cli.json(&["history", "site", "--server", "web-1"]).await;
    let list = history["deployments"].as_array().expect("list");
    let release_of = |content: &str| {
        let commit = sensei_e2e::git(&s.repo, &["rev-parse", &format!(":/{content}")]);
        list.iter()
            .find(|d| d["commit"] == commit.as_str() && d["kind"] == "deploy")
            .and_then(|d| d["release_id"].as_str())
            .unwrap_or_else(|| panic!("no release of {content} in {history}"))
            .to_owned()
    };
    let v1 = release_of("v1");
    let v2 = release_of("v2");
    let release_of_v3 = release_of("v3");
    let out = cli
        .run(&["rollback", "site", "--server", "web-1", "--to", &v1])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(served(&app1), "v1");

    // A release this project never made on this server: refused, nothing queued.
    let before = deployments(&t).await;
    let out = cli
        .run(&[
            "rollback",
            "site",
            "--server",
            "web-1",
            "--to",
            "20990101000000-0000000001-abcdef",
        ])
        .await;
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(stderr(&out).contains("invalid_release"), "{}", show(&out));
    assert_eq!(deployments(&t).await, before);

    // The picker, in a real pseudo-terminal. After v4, web-1 offers v2 and v1 (newest first;
    // v3 was rolled away from, v4 is current): the down arrow and Enter take v1.
    git_commit(&s.repo, "v4");
    cli.ok(&["deploy", "site", "--server", "web-1"]).await;
    assert_eq!(served(&app1), "v4");
    let transcript = drive_picker(
        &cli,
        &["rollback", "site", "--server", "web-1"],
        &v1,
        "\x1b[B\r",
    )
    .await;
    assert!(transcript.contains("Roll back to"), "{transcript}");
    assert!(transcript.contains(&v2), "v2 is offered too: {transcript}");
    assert!(
        !transcript.contains(&release_of_v3),
        "v3 was rolled away from: {transcript}"
    );
    assert_eq!(served(&app1), "v1", "{transcript}");
}

/// Runs `sensei ARGS` in a pseudo-terminal (Python's pty module: a session and controlling
/// terminal of its own), waits until `expect` is on the screen, types `keys`, and answers
/// the transcript once it exits 0.
async fn drive_picker(cli: &Cli, args: &[&str], expect: &str, keys: &str) -> String {
    const DRIVER: &str = r#"
import os, pty, sys
expect, keys, argv = sys.argv[1].encode(), sys.argv[2].encode(), sys.argv[3:]
pid, fd = pty.fork()
if pid == 0:
    os.execv(argv[0], argv)
seen = b""
typed = False
while True:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
    if not typed and expect in seen:
        os.write(fd, keys)
        typed = True
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode("utf-8", "replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let python = std::env::var("SENSEI_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("-c")
        .arg(DRIVER)
        .arg(expect)
        .arg(keys)
        .arg(workspace_binary("sensei"))
        .args(args)
        .env("XDG_CONFIG_HOME", cli.config.path())
        .env("TERM", "xterm")
        .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(180), cmd.output())
        .await
        .expect("the picker session ends")
        .expect("python runs");
    let transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{transcript}\n{}", stderr(&out));
    transcript
}

#[tokio::test]
async fn a_ci_key_deploys_once_per_idempotency_key_and_an_expired_key_is_named() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("ci@example.com", PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let s = site();
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": s.repo.display().to_string(),
                   "deploy_path": s.app.display().to_string()}),
        )
        .await;
    assert_eq!(status, 201);
    // The narrowest key that can deploy and see the result.
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &cookie,
            json!({"name": "ci", "scopes": ["deployments:read", "deployments:write"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let ci = Cli::ci(&t, key["secret"].as_str().expect("secret"));
    assert!(ci.ok(&["whoami"]).await.contains("API key"));

    let project_id = project["id"].as_str().expect("id");
    let server_id = agent.server_id.to_string();
    let step = [
        "deploy",
        project_id,
        "--server",
        &server_id,
        "--ref",
        "main",
        "--idempotency-key",
        "pipeline-7-deploy",
    ];
    let first = ci.run(&step).await;
    assert_eq!(first.status.code(), Some(0), "{}", show(&first));
    assert_eq!(served(&s.app), "v1");
    // The CI step retried: answered with the first deploy, nothing queued again.
    let again = ci.run(&step).await;
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    assert!(
        stderr(&again).contains("Already queued"),
        "{}",
        show(&again)
    );
    assert_eq!(deployments(&t).await, 1);

    // What the key may not do is refused with its reason.
    let out = ci.run(&["servers", "list"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(stderr(&out).contains("servers:read"), "{}", show(&out));

    t.db()
        .await
        .execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 minute'",
            &[],
        )
        .await
        .expect("expire");
    let out = ci.run(&step).await;
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    assert!(
        stderr(&out).contains("the API key has expired"),
        "{}",
        show(&out)
    );
    assert_eq!(deployments(&t).await, 1);
}

/// `sensei servers show` names the agent's OS and architecture; `sensei rollout start
/// --upgrade-agent` starts an agent upgrade (here to the version the agent runs: it succeeds
/// at once) and a malformed version is refused with the API's reason, starting nothing.
#[tokio::test]
async fn the_cli_shows_agent_hosts_and_starts_agent_upgrades() {
    let t = TestPlane::start().await;
    let email = "upgrades@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let agent = t
        .start_labelled_agent(
            &cookie,
            "up-1",
            json!({"tier": "up"}),
            sensei_agent::jobs::JobPolicy::default(),
        )
        .await;
    let path = format!("/v1/servers/{}", agent.server_id);
    assert!(
        eventually(std::time::Duration::from_secs(20), || async {
            t.get(&path, &cookie).await.1["agent"]["arch"].is_string()
        })
        .await
    );
    let cli = Cli::new();
    let out = cli.login(&t, email, &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let shown = cli.ok(&["servers", "show", "up-1"]).await;
    let (os, arch) = sensei_agent::upgrade::host_facts();
    assert!(shown.contains(&os) && shown.contains(&arch), "{shown}");

    let out = cli
        .run(&[
            "rollout",
            "start",
            "--upgrade-agent",
            "0.1.1; reboot",
            "--label",
            "tier=up",
        ])
        .await;
    assert_ne!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stderr(&out).contains("Debian package version"),
        "{}",
        show(&out)
    );
    assert_eq!(t.count("SELECT count(*) FROM rollouts").await, 0);

    let current = format!("{}-1", sensei_agent::version());
    let out = cli
        .run(&[
            "rollout",
            "start",
            "--upgrade-agent",
            &current,
            "--label",
            "tier=up",
            "--canary",
            "0",
            "--watch",
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let rollouts = cli.json(&["rollout", "list"]).await;
    assert_eq!(rollouts["rollouts"][0]["state"], "succeeded");
    assert_eq!(
        rollouts["rollouts"][0]["upgrade_agent"]["version"],
        current.as_str()
    );
    let list = cli.ok(&["rollout", "list"]).await;
    assert!(list.contains(&format!("agent {current}")), "{list}");
}
