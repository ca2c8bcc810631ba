//! Deploys through a real agent: real git, real sh, the real release engine.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use sensei_e2e::{error_code, git_commit, git_repo, open_tempdir, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

pub(crate) struct Setup {
    pub(crate) t: TestPlane,
    pub(crate) cookie: String,
    agent: sensei_e2e::TestAgent,
    project: String,
    repo: std::path::PathBuf,
    app: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup(extra: Value) -> Setup {
    let t = TestPlane::start().await;
    setup_on(t, extra).await
}

pub(crate) async fn setup_on(t: TestPlane, extra: Value) -> Setup {
    let (cookie, _) = t
        .signup(
            &format!("d{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let app = dir.path().join("app");
    let mut body = json!({
        "name": "site",
        "repo_url": repo.display().to_string(),
        "deploy_path": app.display().to_string(),
        "shared_paths": ["storage/"],
        "hooks": {"build": ["echo building $(cat index.html)"]},
        "health_check": "test -s index.html",
        "env": {"SECRET_TOKEN": "s3cr3t-value", "PLAIN": "x"},
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    let (status, project) = t.post("/v1/projects", &cookie, body).await;
    assert_eq!(status, 201, "{project}");
    Setup {
        project: project["id"].as_str().expect("id").to_owned(),
        t,
        cookie,
        agent,
        repo,
        app,
        _dir: dir,
    }
}

impl Setup {
    pub(crate) async fn deploy(&self, git_ref: &str) -> Value {
        let (status, d) = self
            .t
            .post(
                "/v1/deployments",
                &self.cookie,
                json!({"project_id": self.project, "server_id": self.agent.server_id, "ref": git_ref}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        d
    }

    async fn deploy_and_wait(&self, git_ref: &str) -> Value {
        let d = self.deploy(git_ref).await;
        self.t
            .wait_deployment(&self.cookie, d["id"].as_str().expect("id"))
            .await
    }

    fn current(&self) -> String {
        sensei_e2e::current_link(&self.app)
    }

    fn served(&self) -> String {
        std::fs::read_to_string(self.app.join("current/index.html")).unwrap_or_default()
    }
}

#[tokio::test]
async fn deploy_switches_current_keeps_logs_and_guards_the_env() {
    let s = setup(json!({})).await;
    let head = git_commit(&s.repo, "v2");
    let d = s.deploy_and_wait("main").await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert_eq!(d["commit"], head);
    let release = d["release_id"].as_str().expect("release");
    assert_eq!(s.current(), format!("releases/{release}"));
    assert_eq!(s.served(), "v2");
    assert!(s.app.join("current/storage").is_symlink());
    let env = s.app.join("shared/.env");
    assert_eq!(
        std::fs::metadata(&env).expect("env").permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&env)
        .expect("env")
        .contains("SECRET_TOKEN=\"s3cr3t-value\""));
    assert!(d["started_at"].is_string() && d["finished_at"].is_string());

    let id = d["id"].as_str().expect("id");
    let (status, log) =
        s.t.get(&format!("/v1/deployments/{id}/logs"), &s.cookie)
            .await;
    assert_eq!(status, 200);
    let lines: Vec<String> = log["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l["line"].as_str().unwrap_or("").to_owned())
        .collect();
    for expected in [
        "==> build",
        "building v2",
        "==> switch",
        &format!("commit {head}"),
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "log lacks {expected:?}: {lines:#?}"
        );
    }
    // Follow: server-sent events ending with the status.
    let sse =
        s.t.http
            .get(s.t.url(&format!("/v1/deployments/{id}/logs?follow=true")))
            .header("cookie", &s.cookie)
            .send()
            .await
            .expect("follow");
    assert_eq!(
        sse.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let text = sse.text().await.expect("sse body");
    assert!(text.contains("event: line") && text.contains("building v2"));
    assert!(
        text.trim_end().ends_with(r#"data: {"status":"succeeded"}"#),
        "{text}"
    );

    // The env value is in no API answer, no log line, no clear database column.
    let (_, project) =
        s.t.get(&format!("/v1/projects/{}", s.project), &s.cookie)
            .await;
    assert_eq!(project["env_names"], json!(["PLAIN", "SECRET_TOKEN"]));
    assert!(project.get("env").is_none());
    let db = s.t.db().await;
    let dump: String = db
        .query_one(
            "SELECT (SELECT string_agg(row_to_json(p)::text, '') FROM projects p) || \
                    (SELECT string_agg(line, '') FROM deployment_logs) || \
                    (SELECT string_agg(row_to_json(a)::text, '') FROM audit_log a)",
            &[],
        )
        .await
        .expect("dump")
        .get(0);
    assert!(
        !dump.contains("s3cr3t-value"),
        "the secret is stored in clear"
    );
    assert!(s
        .t
        .audit_actions()
        .await
        .contains(&"deployment.queued".to_owned()));
}

#[tokio::test]
async fn failing_build_hook_fails_the_deploy_and_leaves_the_app_running() {
    let s = setup(json!({})).await;
    let first = s.deploy_and_wait("main").await;
    assert_eq!(first["status"], "succeeded");
    let live = s.current();
    let (status, _) =
        s.t.post(&format!("/v1/projects/{}", s.project), &s.cookie, json!({}))
            .await;
    assert_eq!(status, 405);
    let r = s
        .t
        .http
        .patch(s.t.url(&format!("/v1/projects/{}", s.project)))
        .header("cookie", &s.cookie)
        .json(&json!({"hooks": {"build": ["echo compiling; echo 'error: it broke' >&2; exit 2"]}}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    git_commit(&s.repo, "v2-broken");
    let d = s.deploy_and_wait("main").await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"]["step"], "build");
    assert!(
        d["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("status 2"),
        "{d}"
    );
    assert_eq!(s.current(), live, "current moved");
    assert_eq!(s.served(), "v1", "the running app changed");
    let (_, log) =
        s.t.get(
            &format!("/v1/deployments/{}/logs", d["id"].as_str().expect("id")),
            &s.cookie,
        )
        .await;
    assert!(log.to_string().contains("error: it broke"));
}

#[tokio::test]
async fn rollback_returns_to_the_previous_good_release() {
    let s = setup(json!({})).await;
    let v1 = s.deploy_and_wait("main").await;
    git_commit(&s.repo, "v2");
    let v2 = s.deploy_and_wait("main").await;
    assert_eq!(s.served(), "v2");
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
    assert_eq!(status, 201, "{rb}");
    assert_eq!(rb["kind"], "rollback");
    let done =
        s.t.wait_deployment(&s.cookie, rb["id"].as_str().expect("id"))
            .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        s.current(),
        format!("releases/{}", v1["release_id"].as_str().expect("r"))
    );
    assert_eq!(s.served(), "v1");
    assert_eq!(done["commit"], v1["commit"]);
}

#[tokio::test]
async fn a_second_deploy_waits_for_the_first() {
    let s = setup(json!({"hooks": {"build": ["sleep 1"]}})).await;
    let a = s.deploy("main").await;
    let b = s.deploy("main").await;
    let a =
        s.t.wait_deployment(&s.cookie, a["id"].as_str().expect("id"))
            .await;
    let b =
        s.t.wait_deployment(&s.cookie, b["id"].as_str().expect("id"))
            .await;
    assert_eq!(
        (a["status"].as_str(), b["status"].as_str()),
        (Some("succeeded"), Some("succeeded"))
    );
    let a_end: chrono::DateTime<chrono::Utc> = a["finished_at"]
        .as_str()
        .expect("end")
        .parse()
        .expect("time");
    let b_start: chrono::DateTime<chrono::Utc> = b["started_at"]
        .as_str()
        .expect("start")
        .parse()
        .expect("time");
    assert!(
        b_start >= a_end,
        "the second deploy started before the first ended"
    );
    assert!(b["sequence"].as_i64() > a["sequence"].as_i64());
}

#[tokio::test]
async fn a_replayed_job_is_refused_by_the_agent() {
    let s = setup(json!({})).await;
    let d = s.deploy_and_wait("main").await;
    assert_eq!(d["status"], "succeeded");
    // Deliver the same signed sequence again, as a confused or malicious dispatcher would.
    s.t.db()
        .await
        .execute(
            "UPDATE deployments SET status = 'queued', finished_at = NULL, expires_at = now() + interval '1 minute' WHERE id = $1",
            &[&d["id"].as_str().expect("id").parse::<uuid::Uuid>().expect("uuid")],
        )
        .await
        .expect("requeue");
    s.t.plane.agents().wakes.wake(s.agent.server_id);
    let again =
        s.t.wait_deployment(&s.cookie, d["id"].as_str().expect("id"))
            .await;
    assert_eq!(again["status"], "failed");
    assert_eq!(again["error"]["step"], "verify");
    assert!(
        again["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("replayed job"),
        "{again}"
    );
    assert_eq!(s.served(), "v1");
}

#[tokio::test]
async fn killing_the_agent_mid_deploy_keeps_a_complete_release_and_the_next_deploy_works() {
    let mut s = setup(json!({})).await;
    assert_eq!(s.deploy_and_wait("main").await["status"], "succeeded");
    let live = s.current();
    let r =
        s.t.http
            .patch(s.t.url(&format!("/v1/projects/{}", s.project)))
            .header("cookie", &s.cookie)
            .json(&json!({"hooks": {"build": ["echo started; sleep 30"]}}))
            .send()
            .await
            .expect("patch");
    assert_eq!(r.status(), 200);
    git_commit(&s.repo, "v2");
    let d = s.deploy("main").await;
    let id = d["id"].as_str().expect("id").to_owned();
    assert!(
        sensei_e2e::eventually(Duration::from_secs(30), || async {
            let (_, log) =
                s.t.get(&format!("/v1/deployments/{id}/logs"), &s.cookie)
                    .await;
            log.to_string().contains("started")
        })
        .await,
        "the slow hook never started"
    );
    let _ = s.agent.stop.send(true);
    let stopped = std::mem::replace(
        &mut s.agent.task,
        tokio::spawn(async { Ok(sensei_agent::session::RunOutcome::Shutdown) }),
    );
    let _ = stopped.await;
    let failed = s.t.wait_deployment(&s.cookie, &id).await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("disconnected"),
        "{failed}"
    );
    assert_eq!(s.current(), live);
    assert_eq!(s.served(), "v1");

    s.agent.restart();
    let r =
        s.t.http
            .patch(s.t.url(&format!("/v1/projects/{}", s.project)))
            .header("cookie", &s.cookie)
            .json(&json!({"hooks": {"build": []}}))
            .send()
            .await
            .expect("patch");
    assert_eq!(r.status(), 200);
    let next = s.deploy_and_wait("main").await;
    assert_eq!(next["status"], "succeeded", "{next}");
    assert_eq!(s.served(), "v2");
}

#[tokio::test]
async fn a_deploy_to_an_offline_agent_fails_after_the_timeout() {
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| o.dispatch_timeout = Duration::from_secs(2),
    )
    .await;
    let s = setup_on(t, json!({})).await;
    let _ = s.agent.stop.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = s.deploy_and_wait("main").await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["error"]["step"], "dispatch");
    assert!(
        d["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("agent offline"),
        "{d}"
    );
    assert!(!s.app.join("current").exists());
}

#[tokio::test]
async fn bad_deployment_and_project_requests_are_refused() {
    let s = setup(json!({})).await;
    for (body, status, code) in [
        (
            json!({"project_id": s.project, "server_id": s.agent.server_id, "ref": "--upload-pack=x"}),
            422,
            "invalid_ref",
        ),
        (
            json!({"project_id": uuid::Uuid::new_v4(), "server_id": s.agent.server_id, "ref": "main"}),
            404,
            "not_found",
        ),
        (
            json!({"project_id": s.project, "server_id": uuid::Uuid::new_v4(), "ref": "main"}),
            404,
            "not_found",
        ),
    ] {
        let (st, v) = s.t.post("/v1/deployments", &s.cookie, body.clone()).await;
        assert_eq!((st, error_code(&v)), (status, code), "{body}: {v}");
    }
    for (body, code) in [
        (
            json!({"name": "p", "repo_url": "/srv/git/r.git", "deploy_path": "relative"}),
            "invalid_deploy_path",
        ),
        (
            json!({"name": "p", "repo_url": "/srv/git/r.git", "deploy_path": "/srv/a", "shared_paths": ["../up"]}),
            "invalid_shared_path",
        ),
        (
            json!({"name": "p", "repo_url": "/srv/git/r.git", "deploy_path": "/srv/a", "env": {"BAD-NAME": "x"}}),
            "invalid_env",
        ),
        (
            json!({"name": "p", "repo_url": "/srv/git/r.git", "deploy_path": "/srv/a", "keep_releases": 0}),
            "invalid_keep_releases",
        ),
        // Repositories over transports that do not authenticate the server, a remote helper
        // (ext:: runs a command), a relative path.
        (
            json!({"name": "p", "repo_url": "http://git.example.com/app.git", "deploy_path": "/srv/a"}),
            "invalid_repo_url",
        ),
        (
            json!({"name": "p", "repo_url": "git://git.example.com/app.git", "deploy_path": "/srv/a"}),
            "invalid_repo_url",
        ),
        (
            json!({"name": "p", "repo_url": "ext::sh -c id", "deploy_path": "/srv/a"}),
            "invalid_repo_url",
        ),
        (
            json!({"name": "p", "repo_url": "r", "deploy_path": "/srv/a"}),
            "invalid_repo_url",
        ),
    ] {
        let (st, v) = s.t.post("/v1/projects", &s.cookie, body.clone()).await;
        assert_eq!((st, error_code(&v)), (422, code), "{body}: {v}");
    }
    // A revoked server gets no job by any way.
    let r =
        s.t.http
            .delete(s.t.url(&format!(
                "/v1/servers/{}/agent-certificate",
                s.agent.server_id
            )))
            .header("cookie", &s.cookie)
            .send()
            .await
            .expect("revoke");
    assert_eq!(r.status(), 204);
    let (st, v) =
        s.t.post(
            "/v1/deployments",
            &s.cookie,
            json!({"project_id": s.project, "server_id": s.agent.server_id, "ref": "main"}),
        )
        .await;
    assert_eq!((st, error_code(&v)), (409, "server_not_enrolled"));
    let n = s.t.count("SELECT count(*) FROM deployments").await;
    assert_eq!(n, 0, "refused requests queued nothing");
}

#[tokio::test]
async fn env_updates_are_audited_without_values() {
    let s = setup(json!({})).await;
    let r =
        s.t.http
            .patch(s.t.url(&format!("/v1/projects/{}", s.project)))
            .header("cookie", &s.cookie)
            .json(&json!({"env": {"NEW_SECRET": "brand-new-value"}}))
            .send()
            .await
            .expect("patch");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["env_names"], json!(["NEW_SECRET"]));
    let rows =
        s.t.db()
            .await
            .query(
                "SELECT row_to_json(a)::text FROM audit_log a WHERE action = 'project.env_updated'",
                &[],
            )
            .await
            .expect("audit");
    assert_eq!(rows.len(), 1);
    let text: String = rows[0].get(0);
    assert!(
        text.contains("NEW_SECRET") && !text.contains("brand-new-value"),
        "{text}"
    );
}

#[tokio::test]
async fn an_emptied_environment_leaves_the_server_with_the_next_deploy() {
    let s = setup(json!({})).await;
    assert_eq!(s.deploy_and_wait("main").await["status"], "succeeded");
    let env = s.app.join("shared/.env");
    assert!(env.exists());
    let r =
        s.t.http
            .patch(s.t.url(&format!("/v1/projects/{}", s.project)))
            .header("cookie", &s.cookie)
            .json(&json!({"env": {}}))
            .send()
            .await
            .expect("patch");
    assert_eq!(r.status(), 200);
    let d = s.deploy_and_wait("main").await;
    assert_eq!(d["status"], "succeeded", "{d}");
    assert!(!env.exists(), "the old secrets stayed on the server");
    assert!(!s.app.join("current/.env").exists());
    let (_, log) =
        s.t.get(
            &format!("/v1/deployments/{}/logs", d["id"].as_str().expect("id")),
            &s.cookie,
        )
        .await;
    assert!(log.to_string().contains("removed"), "{log}");
}

#[tokio::test]
async fn deleting_a_project_removes_its_env_from_its_servers_and_leaves_the_app_running() {
    let s = setup(json!({})).await;
    assert_eq!(s.deploy_and_wait("main").await["status"], "succeeded");
    let env = s.app.join("shared/.env");
    assert!(env.exists());
    let live = s.current();
    let r =
        s.t.http
            .delete(s.t.url(&format!("/v1/projects/{}", s.project)))
            .header("cookie", &s.cookie)
            .send()
            .await
            .expect("delete");
    assert_eq!(r.status(), 204);
    let (status, list) = s.t.get("/v1/deployments?kind=forget_env", &s.cookie).await;
    assert_eq!(status, 200, "{list}");
    let jobs = list["deployments"].as_array().expect("deployments");
    assert_eq!(jobs.len(), 1, "{list}");
    let done =
        s.t.wait_deployment(&s.cookie, jobs[0]["id"].as_str().expect("id"))
            .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        !env.exists(),
        "the deleted project's secrets stayed on the server"
    );
    assert_eq!(s.current(), live, "the application was left as it was");
    assert_eq!(s.served(), "v1");
    let removals: i64 =
        s.t.db()
            .await
            .query_one(
                "SELECT (metadata->>'env_removal_jobs')::bigint FROM audit_log \
             WHERE action = 'project.deleted'",
                &[],
            )
            .await
            .expect("audit")
            .get(0);
    assert_eq!(removals, 1);
}

#[tokio::test]
async fn a_rollback_goes_only_to_a_good_release_of_its_own_project_and_server() {
    let s = setup(json!({})).await;
    let good = s.deploy_and_wait("main").await;
    assert_eq!(good["status"], "succeeded");
    let path = format!("/v1/projects/{}", s.project);
    let patch = |body: Value| s.t.patch(&path, &s.cookie, body);
    // A failed deploy of the same project on the same server.
    let (status, _) = patch(json!({"hooks": {"build": ["exit 3"]}})).await;
    assert_eq!(status, 200);
    let failed = s.deploy_and_wait("main").await;
    assert_eq!(failed["status"], "failed");
    // Another project's good release on the same server.
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["other"]);
    let (status, other) =
        s.t.post(
            "/v1/projects",
            &s.cookie,
            json!({"name": "other", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("other").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, d) =
        s.t.post(
            "/v1/deployments",
            &s.cookie,
            json!({"project_id": other["id"], "server_id": s.agent.server_id, "ref": "main"}),
        )
        .await;
    let foreign =
        s.t.wait_deployment(&s.cookie, d["id"].as_str().expect("id"))
            .await;
    assert_eq!(foreign["status"], "succeeded");

    let rollback = format!(
        "/v1/deployments/{}/rollback",
        good["id"].as_str().expect("id")
    );
    let before = s.t.count("SELECT count(*) FROM deployments").await;
    for (body, status, code) in [
        (
            json!({"to_release": foreign["release_id"]}),
            422,
            "invalid_release",
        ),
        (
            json!({"to_release": failed["release_id"]}),
            422,
            "invalid_release",
        ),
        (json!({"to_release": "../../etc"}), 422, "invalid_release"),
        (
            json!({"to_release": good["release_id"], "force": true}),
            422,
            "invalid_field",
        ),
    ] {
        let (st, v) = s.t.post(&rollback, &s.cookie, body.clone()).await;
        assert_eq!((st, error_code(&v)), (status, code), "{body}: {v}");
    }
    // A body that is not JSON is refused, not ignored.
    let r =
        s.t.http
            .post(s.t.url(&rollback))
            .header("cookie", &s.cookie)
            .header("content-type", "text/plain")
            .body("to_release=x")
            .send()
            .await
            .expect("post");
    assert_eq!(r.status().as_u16(), 415);
    let after = s.t.count("SELECT count(*) FROM deployments").await;
    assert_eq!(after, before, "nothing was queued");

    // Environment changes that cannot both apply are refused, and nothing changes.
    for (body, code) in [
        (
            json!({"env": {"A": "1"}, "env_set": {"B": "2"}}),
            "invalid_field",
        ),
        (
            json!({"env_set": {"A": "1"}, "env_unset": ["A"]}),
            "invalid_env",
        ),
        (json!({"env_set": {"1BAD": "x"}}), "invalid_env"),
    ] {
        let (st, v) = patch(body.clone()).await;
        assert_eq!((st, error_code(&v)), (422, code), "{body}: {v}");
    }
    let (_, project) =
        s.t.get(&format!("/v1/projects/{}", s.project), &s.cookie)
            .await;
    assert_eq!(project["env_names"], json!(["PLAIN", "SECRET_TOKEN"]));
    // A change to one variable keeps the others and the rest of the project.
    let (st, v) = patch(json!({"env_set": {"NEW": "n"}, "env_unset": ["PLAIN"]})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["env_names"], json!(["NEW", "SECRET_TOKEN"]));
    assert_eq!(v["hooks"]["build"], json!(["exit 3"]));
}

/// A job left running by a replica that died holds its server (one job at a time) until the
/// orphan sweep fails it after the grace; then the next job runs at once. A job whose replica
/// is alive is never swept, however long it runs.
#[tokio::test]
async fn an_orphaned_job_holds_its_server_until_the_sweep_fails_it() {
    let s = setup(json!({})).await;
    let first = s.deploy_and_wait("main").await;
    assert_eq!(first["status"], "succeeded");
    let first_id: uuid::Uuid = first["id"].as_str().expect("id").parse().expect("uuid");
    let db = s.t.db().await;
    // Put the finished job back as running, handed out long ago by a replica nobody knows.
    db.execute(
        "UPDATE deployments SET status = 'running', finished_at = NULL, error_step = NULL, \
         started_at = now() - interval '1 hour', dispatched_replica = gen_random_uuid() WHERE id = $1",
        &[&first_id],
    )
    .await
    .expect("orphan");
    // And one of a live replica (the plane's own), just as old: it must be left alone.
    let live_replica: uuid::Uuid = s.t.plane.agents().replica_id;
    let second = s.deploy("main").await;
    let second_id = second["id"].as_str().expect("id").to_owned();
    // The orphan holds the server: the new job is not claimed while it is running. (The
    // sweep runs every second; the orphan is an hour old, so it is failed on the next pass:
    // what must never happen is the second job running before that.)
    let settled = sensei_e2e::eventually(Duration::from_secs(30), || async {
        db.query_one("SELECT status FROM deployments WHERE id = $1", &[&first_id])
            .await
            .expect("orphan row")
            .get::<_, String>("status")
            == "failed"
    })
    .await;
    assert!(settled, "the orphan sweep failed the job");
    let orphan = db
        .query_one(
            "SELECT error_step, error_message, finished_at FROM deployments WHERE id = $1",
            &[&first_id],
        )
        .await
        .expect("orphan row");
    assert_eq!(orphan.get::<_, Option<&str>>("error_step"), Some("run"));
    assert!(orphan
        .get::<_, Option<&str>>("error_message")
        .unwrap_or_default()
        .contains("replica running this deploy stopped"));
    let orphan_end: chrono::DateTime<chrono::Utc> = orphan.get("finished_at");
    let second = s.t.wait_deployment(&s.cookie, &second_id).await;
    assert_eq!(second["status"], "succeeded", "{second}");
    let second_start: chrono::DateTime<chrono::Utc> = second["started_at"]
        .as_str()
        .expect("start")
        .parse()
        .expect("time");
    assert!(
        second_start >= orphan_end,
        "the next job ran while the orphan still held its server"
    );
    // A job of a live replica is not an orphan, however old.
    let third = s.deploy_and_wait("main").await;
    let third_id: uuid::Uuid = third["id"].as_str().expect("id").parse().expect("uuid");
    db.execute(
        "UPDATE deployments SET status = 'running', finished_at = NULL, \
         started_at = now() - interval '1 hour', dispatched_replica = $2 WHERE id = $1",
        &[&third_id, &live_replica],
    )
    .await
    .expect("old but alive");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status: String = db
        .query_one("SELECT status FROM deployments WHERE id = $1", &[&third_id])
        .await
        .expect("row")
        .get("status");
    assert_eq!(
        status, "running",
        "a live replica's job is left to its agent"
    );
}

/// A claim the database cannot answer (as when its pool is exhausted under load) is tried
/// again within seconds. The wake-up that led to it is spent and no other comes, so waiting
/// for the poll's next re-check (minutes) would leave the job queued long enough for a
/// rollout to count its server unreachable.
#[tokio::test]
async fn a_claim_the_database_could_not_answer_is_tried_again_shortly() {
    let s = setup(json!({})).await;
    let db = s.t.db().await;
    let claims = "test_refused_claims";
    sensei_e2e::watch_updates(
        &db,
        "deployments",
        claims,
        "OLD.status = 'queued' AND NEW.status = 'running'",
        true,
    )
    .await;
    let d = s.deploy("main").await;
    let id = d["id"].as_str().expect("id");
    assert!(
        sensei_e2e::fired_more_than(&db, claims, 0).await > 0,
        "the queued deploy woke no claim"
    );
    let (_, queued) = s.t.get(&format!("/v1/deployments/{id}"), &s.cookie).await;
    assert_eq!(queued["status"], "queued", "{queued}");
    db.batch_execute(&format!("DROP TRIGGER {claims} ON deployments"))
        .await
        .expect("allow claims");
    // No wake-up is sent from here on: only the poll's own retry can find the job.
    let done = s.t.wait_deployment(&s.cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(s.served(), "v1");
}

/// A claim whose jobs' configurations cannot be read after the claim statement (the database
/// failing between the two) leaves the job queued, not running: nothing would have ended a
/// running job that was never sent while its agent stays connected, and the server would take
/// no other job. The poll's retry then finds it.
#[tokio::test]
async fn a_claim_cut_off_before_its_jobs_are_signed_leaves_them_queued() {
    let s = setup(json!({})).await;
    let db = s.t.db().await;
    let claims = "test_claims";
    sensei_e2e::watch_updates(
        &db,
        "deployments",
        claims,
        "OLD.status = 'queued' AND NEW.status = 'running'",
        false,
    )
    .await;
    // Reading the jobs' configurations (which may come from a rollout) fails while the grant
    // is away.
    db.batch_execute(&format!(
        "REVOKE SELECT ON rollouts FROM {}",
        sensei_e2e::APP_ROLE
    ))
    .await
    .expect("cut claims off after their statement");
    let d = s.deploy("main").await;
    let id = d["id"].as_str().expect("id");
    // A first claim and at least one retry, each cut off.
    let tried = sensei_e2e::fired_more_than(&db, claims, 1).await;
    assert!(tried >= 2, "claims tried: {tried}");
    let (_, queued) = s.t.get(&format!("/v1/deployments/{id}"), &s.cookie).await;
    assert_eq!(
        queued["status"], "queued",
        "the cut-off claim was kept: {queued}"
    );
    db.batch_execute(&format!(
        "GRANT SELECT ON rollouts TO {}",
        sensei_e2e::APP_ROLE
    ))
    .await
    .expect("restore the grant");
    let done = s.t.wait_deployment(&s.cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(s.served(), "v1");
}

/// A result the database refuses to record for longer than the control plane's retries is not
/// acknowledged: the agent keeps it, is asked to reconnect, and reports it again, as often as
/// it takes. Once the database takes it, the deploy ends with the agent's real outcome; before,
/// the agent was told "recorded", dropped its copy, and the job stayed running while the
/// server took no other.
#[tokio::test]
async fn a_result_the_database_refused_is_reported_again_not_lost() {
    let s = setup(json!({})).await;
    let db = s.t.db().await;
    let ends = "test_refused_ends";
    sensei_e2e::refuse_job_ends(&db, ends).await;
    let d = s.deploy("main").await;
    let id = d["id"].as_str().expect("id");
    // The finish worker's attempts, then at least one report from a new connection.
    let given_up = sensei_control_plane::jobs::record::RECORD_RETRIES.len() as i64 + 1;
    let refused = sensei_e2e::fired_more_than(&db, ends, given_up).await;
    assert!(refused > given_up, "attempts to record the end: {refused}");
    let (_, running) = s.t.get(&format!("/v1/deployments/{id}"), &s.cookie).await;
    assert_eq!(running["status"], "running", "{running}");
    db.batch_execute(&format!("DROP TRIGGER {ends} ON deployments"))
        .await
        .expect("take ends again");
    let done = s.t.wait_deployment(&s.cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(s.served(), "v1");
}
