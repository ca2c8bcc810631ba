//! One suite, both runners: each scenario runs through an agent server and an SSH server side
//! by side, and both must end the same way (status, step, release, commit, `current`, and
//! Sensei's own log lines). Both run the one release engine (`sensei_shared::release`); these
//! tests hold them to it end to end.

use std::path::PathBuf;

use sensei_e2e::{
    current_link, git_commit, git_repo, give_to_deploy_user, open_tempdir, SshServer, TestAgent,
    TestPlane,
};
use serde_json::{json, Value};

/// One runner under test: its server, and a project deploying to a directory of its own.
struct Runner {
    name: &'static str,
    server: String,
    project: String,
    repo: PathBuf,
    app: PathBuf,
}

/// A control plane with an agent server and an SSH server, one project on each.
struct Both {
    t: TestPlane,
    cookie: String,
    agent: Runner,
    ssh: Runner,
    _agent: TestAgent,
    _sshd: SshServer,
    _dir: tempfile::TempDir,
}

async fn setup() -> Both {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("r{}@example.com", uuid::Uuid::new_v4().simple()),
            "correct horse battery",
        )
        .await;
    let agent = t.start_agent(&cookie, "agent-1").await;
    let sshd = SshServer::start();
    let ssh = t
        .create_ssh_server(&cookie, "ssh-1", &sshd, json!({}))
        .await;
    let dir = open_tempdir();
    let server = agent.server_id.to_string();
    let on_agent = project_on(&t, &cookie, dir.path(), "agent", server).await;
    let server = ssh["id"].as_str().expect("id").to_owned();
    let on_ssh = project_on(&t, &cookie, dir.path(), "ssh", server).await;
    Both {
        t,
        cookie,
        agent: on_agent,
        ssh: on_ssh,
        _agent: agent,
        _sshd: sshd,
        _dir: dir,
    }
}

/// A repository and a project deploying it to a directory of its own on `server`, the same
/// project for every runner.
async fn project_on(
    t: &TestPlane,
    cookie: &str,
    dir: &std::path::Path,
    name: &'static str,
    server: String,
) -> Runner {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("mkdir");
    let repo = git_repo(&root, &["v1"]);
    let app = root.join("app");
    std::fs::create_dir_all(&app).expect("app dir");
    let runner = Runner {
        name,
        server,
        project: String::new(),
        repo,
        app,
    };
    runner.give_to_its_user();
    let (status, project) = t
        .post(
            "/v1/projects",
            cookie,
            json!({
                "name": format!("site-{name}"),
                "repo_url": runner.repo.display().to_string(),
                "deploy_path": runner.app.display().to_string(),
                "shared_paths": ["storage/"],
                "hooks": {"build": ["echo building $(cat index.html)"]},
                "health_check": "test -s index.html",
                "env": {"SECRET_TOKEN": "s3cr3t-value"},
            }),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    Runner {
        project: project["id"].as_str().expect("id").to_owned(),
        ..runner
    }
}

impl Runner {
    /// The SSH runner logs in as the deploy user, who must own the repository (git refuses
    /// others') and the deploy directory; the agent here runs as root.
    fn give_to_its_user(&self) {
        if self.name == "ssh" {
            give_to_deploy_user(&self.repo);
            give_to_deploy_user(&self.app);
        }
    }

    /// Commits `index.html` with `content`; returns the commit id.
    fn commit(&self, content: &str) -> String {
        let commit = git_commit(&self.repo, content);
        self.give_to_its_user();
        commit
    }
}

impl Both {
    async fn deploy(&self, r: &Runner) -> Value {
        self.t
            .deploy_and_wait(&self.cookie, &r.project, &r.server, "main")
            .await
    }

    async fn set_build_hooks(&self, r: &Runner, hooks: Value) {
        let (status, body) = self
            .t
            .patch(
                &format!("/v1/projects/{}", r.project),
                &self.cookie,
                json!({"hooks": {"build": hooks}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Sensei's own log lines of `d` (stream `sensei`), with each given text (release ids,
    /// commits: they differ between the runners by nature) replaced by its name.
    async fn sensei_lines(&self, d: &Value, names: &[(&Value, &str)]) -> Vec<String> {
        self.t
            .log_lines(&self.cookie, d)
            .await
            .into_iter()
            .filter(|(stream, _)| stream == "sensei")
            .map(|(_, line)| {
                names.iter().fold(line, |line, (value, name)| {
                    match value.as_str().filter(|v| !v.is_empty()) {
                        Some(text) => line.replace(text, name),
                        None => line,
                    }
                })
            })
            .collect()
    }

    async fn all_lines(&self, d: &Value) -> Vec<String> {
        self.t
            .log_lines(&self.cookie, d)
            .await
            .into_iter()
            .map(|(_, line)| line)
            .collect()
    }
}

fn served(r: &Runner) -> String {
    std::fs::read_to_string(r.app.join("current/index.html")).unwrap_or_default()
}

fn release_of(d: &Value) -> String {
    format!("releases/{}", d["release_id"].as_str().expect("release id"))
}

/// A good deploy, as each runner reports it: Sensei's log lines.
async fn good_deploy(s: &Both, r: &Runner) -> Vec<String> {
    let head = r.commit("v2");
    let d = s.deploy(r).await;
    let lines = s.all_lines(&d).await;
    assert_eq!(d["status"], "succeeded", "{}: {d}\n{lines:#?}", r.name);
    assert_eq!(d["commit"], head, "{}", r.name);
    assert!(d["error"].is_null(), "{}: {d}", r.name);
    assert_eq!(current_link(&r.app), release_of(&d), "{}", r.name);
    assert_eq!(served(r), "v2", "{}", r.name);
    assert!(r.app.join("current/storage").is_symlink(), "{}", r.name);
    assert!(
        lines.iter().any(|l| l == "building v2"),
        "{}: {lines:#?}",
        r.name
    );
    assert!(
        !lines.iter().any(|l| l.contains("s3cr3t-value")),
        "{}: the secret is in the log",
        r.name
    );
    s.sensei_lines(
        &d,
        &[(&d["release_id"], "<release>"), (&d["commit"], "<commit>")],
    )
    .await
}

#[tokio::test]
async fn a_good_deploy_ends_the_same_on_both_runners() {
    let s = setup().await;
    let (agent, ssh) = tokio::join!(good_deploy(&s, &s.agent), good_deploy(&s, &s.ssh));
    for expected in [
        "==> preflight",
        "==> build",
        "running build hook",
        "==> switch",
        "commit <commit>",
        "release <release>",
        "current -> releases/<release>",
        "done: release <release> at commit <commit>",
    ] {
        assert!(
            agent.iter().any(|l| l == expected),
            "lacks {expected:?}: {agent:#?}"
        );
    }
    assert_eq!(agent, ssh, "the runners told the deploy differently");
}

/// A deploy whose build hook fails after a good one, as each runner reports it: the error and
/// Sensei's log lines.
async fn failing_build(s: &Both, r: &Runner) -> (Value, Vec<String>) {
    let good = s.deploy(r).await;
    assert_eq!(good["status"], "succeeded", "{}: {good}", r.name);
    let live = current_link(&r.app);
    s.set_build_hooks(
        r,
        json!(["echo compiling; echo 'error: it broke' >&2; exit 2"]),
    )
    .await;
    r.commit("v2-broken");
    let d = s.deploy(r).await;
    let lines = s.all_lines(&d).await;
    assert_eq!(d["status"], "failed", "{}: {d}\n{lines:#?}", r.name);
    assert_eq!(d["error"]["step"], "build", "{}: {d}", r.name);
    assert_eq!(current_link(&r.app), live, "{}: current moved", r.name);
    assert_eq!(served(r), "v1", "{}: the running app changed", r.name);
    if let Some(release) = d["release_id"].as_str() {
        assert!(
            !r.app.join("releases").join(release).exists(),
            "{}: the failed release was left behind",
            r.name
        );
    }
    assert!(
        lines.iter().any(|l| l == "error: it broke"),
        "{}: {lines:#?}",
        r.name
    );
    let sensei = s
        .sensei_lines(
            &d,
            &[
                (&d["release_id"], "<release>"),
                (&d["commit"], "<commit>"),
                (&good["release_id"], "<good release>"),
            ],
        )
        .await;
    (d["error"].clone(), sensei)
}

#[tokio::test]
async fn a_failing_build_hook_fails_the_same_on_both_runners() {
    let s = setup().await;
    let ((agent_error, agent), (ssh_error, ssh)) =
        tokio::join!(failing_build(&s, &s.agent), failing_build(&s, &s.ssh));
    assert_eq!(
        agent_error,
        json!({"step": "build", "message": "build hook exited with status 2"})
    );
    assert_eq!(agent_error, ssh_error);
    assert_eq!(
        agent.last().map(String::as_str),
        Some("FAILED at build: build hook exited with status 2"),
        "{agent:#?}"
    );
    assert!(
        !agent.iter().any(|l| l == "==> switch"),
        "the failed deploy reached the switch: {agent:#?}"
    );
    assert_eq!(agent, ssh, "the runners told the failure differently");
}

/// Two good deploys and a rollback of the second, as each runner reports it: Sensei's log
/// lines of the rollback.
async fn rollback(s: &Both, r: &Runner) -> Vec<String> {
    let v1 = s.deploy(r).await;
    assert_eq!(v1["status"], "succeeded", "{}: {v1}", r.name);
    r.commit("v2");
    let v2 = s.deploy(r).await;
    assert_eq!(v2["status"], "succeeded", "{}: {v2}", r.name);
    assert_eq!(served(r), "v2", "{}", r.name);
    let (status, rb) =
        s.t.post(
            &format!(
                "/v1/deployments/{}/rollback",
                v2["id"].as_str().expect("id")
            ),
            &s.cookie,
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{}: {rb}", r.name);
    assert_eq!(rb["kind"], "rollback");
    let done =
        s.t.wait_deployment(&s.cookie, rb["id"].as_str().expect("id"))
            .await;
    let lines = s.all_lines(&done).await;
    assert_eq!(
        done["status"], "succeeded",
        "{}: {done}\n{lines:#?}",
        r.name
    );
    assert_eq!(done["release_id"], v1["release_id"], "{}", r.name);
    assert_eq!(done["commit"], v1["commit"], "{}", r.name);
    assert_eq!(current_link(&r.app), release_of(&v1), "{}", r.name);
    assert_eq!(served(r), "v1", "{}", r.name);
    s.sensei_lines(
        &done,
        &[
            (&v1["release_id"], "<v1>"),
            (&v2["release_id"], "<v2>"),
            (&v1["commit"], "<commit>"),
        ],
    )
    .await
}

#[tokio::test]
async fn a_rollback_ends_the_same_on_both_runners() {
    let s = setup().await;
    let (agent, ssh) = tokio::join!(rollback(&s, &s.agent), rollback(&s, &s.ssh));
    for expected in [
        "==> rollback",
        "current -> releases/<v1> (was releases/<v2>)",
        "done: release <v1> at commit <commit>",
    ] {
        assert!(
            agent.iter().any(|l| l == expected),
            "lacks {expected:?}: {agent:#?}"
        );
    }
    assert_eq!(agent, ssh, "the runners told the rollback differently");
}
