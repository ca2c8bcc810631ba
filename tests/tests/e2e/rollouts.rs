//! Fleet-wide rollouts over a mixed fleet: agents and a real sshd, batches, canary, approval,
//! halting, rollback, pause/resume/abort, unreachable servers.

use std::time::Duration;

use sensei_e2e::{
    eventually, git_commit, git_repo, give_to_deploy_user, open_tempdir, SshServer, TestAgent,
    TestPlane, DEPLOY_USER,
};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

struct Fleet {
    t: TestPlane,
    cookie: String,
    agents: Vec<TestAgent>,
    ssh_server: String,
    _sshd: SshServer,
    project: String,
    repo: std::path::PathBuf,
    app: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Three agent servers and one SSH server, all labelled env=prod, and one project.
///
/// All four "servers" are this one machine, so they share the project's deploy path. The
/// tests therefore run targets one at a time (batches of one): concurrent deploys into one
/// path would meet the engine's lock, which on real servers never happens (each has its own
/// filesystem, and the control plane runs one job per server at a time).
async fn fleet() -> Fleet {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("r{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(t.start_agent(&cookie, &format!("web-{i}")).await);
    }
    // Label the agent servers.
    let db = t.db().await;
    db.execute("UPDATE servers SET labels = '{\"env\":\"prod\"}'", &[])
        .await
        .expect("labels");
    let sshd = SshServer::start();
    let (status, server) = t
        .post(
            "/v1/servers",
            &cookie,
            json!({"name": "legacy", "host": "127.0.0.1", "port": sshd.port, "username": DEPLOY_USER,
                   "transport": "ssh", "labels": {"env": "prod"}}),
        )
        .await;
    assert_eq!(status, 201, "{server}");
    sshd.set_authorized_keys(&format!(
        "{}\n",
        server["public_key"].as_str().expect("key")
    ));
    let dir = open_tempdir();
    // Owned by root and readable by all: root's agents and the SSH user both clone it.
    let repo = git_repo(dir.path(), &["v1"]);
    let app = dir.path().join("app");
    std::fs::create_dir_all(&app).expect("app");
    // Everyone (root agents, the SSH user) may write here in this test.
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "fleet", "repo_url": repo.display().to_string(), "deploy_path": "/placeholder", "keep_releases": 10}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    Fleet {
        project: project["id"].as_str().expect("id").to_owned(),
        ssh_server: server["id"].as_str().expect("id").to_owned(),
        t,
        cookie,
        agents,
        _sshd: sshd,
        repo,
        app,
        _dir: dir,
    }
}

impl Fleet {
    /// Points the project at a fresh deploy directory and sets its build hook.
    async fn configure(&self, name: &str, build: &[&str]) -> std::path::PathBuf {
        let path = self.app.join(name);
        std::fs::create_dir_all(&path).expect("mkdir");
        give_to_deploy_user(&path);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let r = self
            .t
            .http
            .patch(self.t.url(&format!("/v1/projects/{}", self.project)))
            .header("cookie", &self.cookie)
            .json(&json!({"deploy_path": path.display().to_string(), "hooks": {"build": build}}))
            .send()
            .await
            .expect("patch");
        assert_eq!(r.status(), 200);
        path
    }

    async fn start(&self, body: Value) -> Value {
        let mut b = json!({"project_id": self.project, "ref": "main", "selector": {"labels": {"env": "prod"}}});
        if let (Some(b), Some(e)) = (b.as_object_mut(), body.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, r) = self.t.post("/v1/rollouts", &self.cookie, b).await;
        assert_eq!(status, 201, "{r}");
        r
    }

    async fn get(&self, id: &str) -> Value {
        self.t
            .get(&format!("/v1/rollouts/{id}"), &self.cookie)
            .await
            .1
    }

    async fn wait_state(&self, id: &str, states: &[&str]) -> Value {
        let mut last = Value::Null;
        for _ in 0..1200 {
            let r = self.get(id).await;
            if states.iter().any(|s| r["state"] == *s) {
                return r;
            }
            last = r;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("rollout never reached {states:?}: {last}");
    }
}

fn statuses(r: &Value) -> Vec<String> {
    r["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["status"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn a_mixed_fleet_rolls_out_in_batches_after_an_approved_canary() {
    let f = fleet().await;
    f.configure("ok", &["true"]).await;
    // The SSH server first: its non-root user creates the layout the root agents then share.
    let order = json!([
        f.ssh_server,
        f.agents[0].server_id,
        f.agents[1].server_id,
        f.agents[2].server_id
    ]);
    let r = f
        .start(json!({"server_ids": order, "selector": null, "strategy": {"canary": 1, "batch_size": 1, "manual_approval": true}}))
        .await;
    assert_eq!(r["batch_count"], 4, "canary + three batches of one: {r}");
    assert_eq!(r["targets"].as_array().map(Vec::len), Some(4));
    let id = r["id"].as_str().expect("id");
    let paused = f.wait_state(id, &["paused"]).await;
    assert!(paused["paused_reason"]
        .as_str()
        .unwrap_or("")
        .contains("approval"));
    assert_eq!(
        statuses(&paused)
            .iter()
            .filter(|s| *s == "succeeded")
            .count(),
        1,
        "only the canary ran"
    );
    let (status, v) =
        f.t.post(&format!("/v1/rollouts/{id}/resume"), &f.cookie, json!({}))
            .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (409, "invalid_state"),
        "resume is not approve"
    );
    let (status, _) =
        f.t.post(&format!("/v1/rollouts/{id}/approve"), &f.cookie, json!({}))
            .await;
    assert_eq!(status, 200);
    let done = f.wait_state(id, &["succeeded", "halted"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(statuses(&done).iter().all(|s| s == "succeeded"), "{done}");
    // The SSH server took part like the agents.
    let ssh = done["targets"]
        .as_array()
        .expect("t")
        .iter()
        .find(|t| t["server_id"] == f.ssh_server.as_str())
        .expect("ssh target");
    assert_eq!(ssh["status"], "succeeded");
    // The progress stream: a finished rollout sends its final state and ends.
    let events =
        f.t.http
            .get(f.t.url(&format!("/v1/rollouts/{id}/events")))
            .header("cookie", &f.cookie)
            .send()
            .await
            .expect("events");
    assert_eq!(
        events
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(10), events.text())
        .await
        .expect("the stream of a finished rollout must end")
        .expect("body");
    assert!(
        text.starts_with("id: ")
            && text.contains("\nevent: rollout\ndata: ")
            && text.contains("\"state\":\"succeeded\""),
        "{text}"
    );
    let actions = f.t.audit_actions().await;
    for a in [
        "rollout.started",
        "rollout.awaiting_approval",
        "rollout.approved",
        "rollout.succeeded",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} not audited");
    }
}

#[tokio::test]
async fn four_eyes_approval_takes_a_second_person_with_the_approve_permission() {
    let f = fleet().await;
    f.configure("four-eyes", &["true"]).await;
    let (status, v) =
        f.t.patch(
            "/v1/account",
            &f.cookie,
            json!({"four_eyes_approval": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["four_eyes_approval"], true);
    // The second person holds a custom role that may approve and read rollouts, nothing else.
    let (status, role) =
        f.t.post(
            "/v1/roles",
            &f.cookie,
            json!({"name": "approver", "permissions": ["rollouts:read", "rollouts:approve"]}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (status, inv) =
        f.t.post(
            "/v1/invitations",
            &f.cookie,
            json!({"email": "second@example.com", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{inv}");
    let accepted =
        f.t.http
            .post(f.t.url("/v1/invitations/accept"))
            .json(&json!({"token": inv["token"], "password": PW}))
            .send()
            .await
            .expect("accept");
    let second = sensei_e2e::session_cookie(&accepted).expect("cookie");
    let second_id = accepted.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (status, v) =
        f.t.patch(
            &format!("/v1/members/{second_id}"),
            &f.cookie,
            json!({"role": "approver"}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A strategy that would never wait for anyone is refused, and nothing is created.
    for strategy in [
        json!({"canary": 1, "manual_approval": false}),
        json!({"canary": 0, "manual_approval": true}),
    ] {
        let (status, v) =
            f.t.post(
                "/v1/rollouts",
                &f.cookie,
                json!({"project_id": f.project, "ref": "main",
                       "server_ids": [f.agents[0].server_id], "strategy": strategy}),
            )
            .await;
        assert_eq!(
            (status, sensei_e2e::error_code(&v)),
            (422, "four_eyes_required"),
            "{v}"
        );
    }
    let (_, listed) = f.t.get("/v1/rollouts", &f.cookie).await;
    assert_eq!(listed["rollouts"].as_array().map(Vec::len), Some(0));
    let r = f
        .start(
            json!({"server_ids": [f.agents[0].server_id, f.agents[1].server_id], "selector": null,
                      "strategy": {"canary": 1, "batch_size": 1, "manual_approval": true}}),
        )
        .await;
    let id = r["id"].as_str().expect("id");
    f.wait_state(id, &["paused"]).await;
    // The person who started it may not approve it.
    let (status, v) =
        f.t.post(&format!("/v1/rollouts/{id}/approve"), &f.cookie, json!({}))
            .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (403, "four_eyes_required"),
        "{v}"
    );
    assert_eq!(
        f.get(id).await["state"],
        "paused",
        "the refusal changed nothing"
    );
    // The approver may approve, but not steer otherwise.
    let (status, v) =
        f.t.post(&format!("/v1/rollouts/{id}/pause"), &second, json!({}))
            .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (403, "insufficient_scope")
    );
    let (status, v) =
        f.t.post(&format!("/v1/rollouts/{id}/approve"), &second, json!({}))
            .await;
    assert_eq!(status, 200, "{v}");
    let done = f.wait_state(id, &["succeeded", "halted"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
}

#[tokio::test]
async fn a_minimum_agent_version_skips_older_and_silent_agents_with_the_reason() {
    let f = fleet().await;
    f.configure("min-version", &["true"]).await;
    // An agent server that never connected: its version is unknown.
    let (status, silent) =
        f.t.post(
            "/v1/servers",
            &f.cookie,
            json!({"name": "web-new", "host": "192.0.2.30", "transport": "agent", "labels": {"env": "prod"}}),
        )
        .await;
    assert_eq!(status, 201, "{silent}");
    let silent = silent["id"].as_str().expect("id").to_owned();
    let connected = |id: uuid::Uuid| {
        let f = &f;
        async move {
            f.t.get(&format!("/v1/servers/{id}"), &f.cookie).await.1["agent"]["version"]
                .as_str()
                .is_some()
        }
    };
    for a in &f.agents {
        assert!(sensei_e2e::eventually(Duration::from_secs(30), || connected(a.server_id)).await);
    }
    let version =
        f.t.get(&format!("/v1/servers/{}", f.agents[0].server_id), &f.cookie)
            .await
            .1["agent"]["version"]
            .as_str()
            .expect("version")
            .to_owned();

    // Servers by agent version and by certificate expiry.
    let count = |query: String| {
        let f = &f;
        async move {
            let (status, v) = f.t.get(&format!("/v1/servers?{query}"), &f.cookie).await;
            assert_eq!(status, 200, "{query}: {v}");
            v["servers"].as_array().map(Vec::len).unwrap_or(0)
        }
    };
    assert_eq!(count(format!("agent_version={version}")).await, 3);
    assert_eq!(count("agent_version=0.0.1".into()).await, 0);
    let far = (chrono::Utc::now() + chrono::Duration::days(3650))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(count(format!("certificate_expires_before={far}")).await, 3);
    assert_eq!(
        count("certificate_expires_before=2000-01-01T00:00:00Z".into()).await,
        0
    );
    let (status, v) =
        f.t.get("/v1/servers?certificate_expires_before=soon", &f.cookie)
            .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (400, "invalid_filter")
    );

    // Only agents below the minimum: refused, nothing created.
    let db = f.t.db().await;
    let rollouts = || async {
        db.query_one("SELECT count(*) FROM rollouts", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let before = rollouts().await;
    let (status, v) =
        f.t.post(
            "/v1/rollouts",
            &f.cookie,
            json!({"project_id": f.project, "ref": "main", "server_ids": [f.agents[0].server_id],
                   "strategy": {"min_agent_version": "99.0.0"}}),
        )
        .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (422, "no_targets"),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("older"),
        "{v}"
    );
    assert_eq!(rollouts().await, before);
    let (status, v) =
        f.t.post(
            "/v1/rollouts",
            &f.cookie,
            json!({"project_id": f.project, "ref": "main", "server_ids": [f.agents[0].server_id],
                   "strategy": {"min_agent_version": "latest"}}),
        )
        .await;
    assert_eq!(
        (status, sensei_e2e::error_code(&v)),
        (422, "invalid_strategy"),
        "{v}"
    );

    // The whole fleet with a minimum no agent meets: the SSH server deploys, every agent is
    // skipped with its reason, and the rollout succeeds on what could take part.
    let r = f
        .start(json!({"strategy": {"canary": 1, "batch_size": 1, "min_agent_version": "99.0.0"}}))
        .await;
    let id = r["id"].as_str().expect("id");
    let done = f.wait_state(id, &["succeeded", "halted"]).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let targets = done["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 5);
    for t in targets {
        let server = t["server_id"].as_str().expect("server");
        if server == f.ssh_server {
            assert_eq!(t["status"], "succeeded", "{t}");
        } else if server == silent {
            assert_eq!(t["status"], "skipped");
            assert!(
                t["error"].as_str().unwrap_or("").contains("not reported"),
                "{t}"
            );
        } else {
            assert_eq!(t["status"], "skipped");
            assert!(t["error"].as_str().unwrap_or("").contains("older"), "{t}");
        }
    }
    // Meeting the minimum, the agents take part.
    let r = f
        .start(
            json!({"server_ids": [f.agents[1].server_id], "selector": null,
                      "strategy": {"canary": 0, "min_agent_version": version}}),
        )
        .await;
    let done = f
        .wait_state(r["id"].as_str().expect("id"), &["succeeded", "halted"])
        .await;
    assert_eq!(statuses(&done), ["succeeded"], "{done}");
}

#[tokio::test]
async fn a_failure_halts_and_rolls_back_what_was_switched() {
    let f = fleet().await;
    // First a good release everywhere, so that there is something to roll back to.
    let path = f.configure("halt", &["true"]).await;
    let first = f
        .start(json!({"server_ids": [f.ssh_server, f.agents[0].server_id], "selector": null, "strategy": {"canary": 0, "batch_size": 1}}))
        .await;
    let first = f
        .wait_state(first["id"].as_str().expect("id"), &["succeeded", "halted"])
        .await;
    assert_eq!(first["state"], "succeeded", "{first}");
    // Both servers share one deploy path on this test machine, so the releases of this first
    // rollout sit side by side; a rollback goes to the newest good one older than `current`,
    // which may be either of them (both carry the first commit).
    let mut before = Vec::new();
    for target in first["targets"].as_array().expect("targets") {
        let d =
            f.t.wait_deployment(&f.cookie, target["deployment_id"].as_str().expect("job"))
                .await;
        let release = d["release_id"].as_str().expect("release id");
        before.push(std::path::PathBuf::from(format!("releases/{release}")));
    }
    // The SSH user must still be able to write after root's deploy (shared test machine).
    give_to_deploy_user(&path);
    // Now a release whose build fails on the SSH server only (its user is not root).
    git_commit(&f.repo, "v2");
    f.configure("halt", &["test \"$(id -u)\" = 0"]).await;
    let r = f
        .start(json!({"server_ids": [f.agents[0].server_id, f.ssh_server, f.agents[2].server_id],
                      "selector": null,
                      "strategy": {"canary": 1, "batch_size": 1, "max_failures": 0, "on_halt": "rollback"}}))
        .await;
    let id = r["id"].as_str().expect("id");
    let done = f.wait_state(id, &["rolled_back"]).await;
    assert!(
        done["halted_reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_failures is 0"),
        "{done}"
    );
    let t = done["targets"].as_array().expect("targets");
    let status_of = |sid: String| {
        t.iter()
            .find(|x| x["server_id"] == sid.as_str())
            .map(|x| x["status"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(status_of(f.ssh_server.clone()).as_deref(), Some("failed"));
    assert_eq!(
        status_of(f.agents[2].server_id.to_string()).as_deref(),
        Some("skipped"),
        "the last batch never started"
    );
    // Switched servers got a rollback job, and it succeeded.
    for target in t.iter().filter(|x| x["status"] == "succeeded") {
        let rb = target["rollback_deployment_id"]
            .as_str()
            .expect("rollback job");
        let d = f.t.wait_deployment(&f.cookie, rb).await;
        assert_eq!(d["status"], "succeeded", "{d}");
    }
    let current = std::fs::read_link(path.join("current")).expect("current");
    assert!(
        before.contains(&current),
        "current not rolled back: {current:?} is not one of {before:?}"
    );
    assert!(f
        .t
        .audit_actions()
        .await
        .iter()
        .any(|a| a == "rollout.halted"));
}

#[tokio::test]
async fn pause_resume_and_abort() {
    let f = fleet().await;
    f.configure("steer", &["sleep 1"]).await;
    let order = json!([
        f.ssh_server,
        f.agents[0].server_id,
        f.agents[1].server_id,
        f.agents[2].server_id
    ]);
    let r = f
        .start(json!({"server_ids": order, "selector": null, "strategy": {"canary": 1, "batch_size": 1}}))
        .await;
    let id = r["id"].as_str().expect("id");
    let (status, paused) =
        f.t.post(&format!("/v1/rollouts/{id}/pause"), &f.cookie, json!({}))
            .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = f.get(id).await;
    assert!(
        statuses(&still).iter().filter(|s| *s == "pending").count() >= 3,
        "a paused rollout started batches: {still}"
    );
    let (status, _) =
        f.t.post(&format!("/v1/rollouts/{id}/resume"), &f.cookie, json!({}))
            .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(30), || async {
            statuses(&f.get(id).await)
                .iter()
                .filter(|s| *s == "succeeded")
                .count()
                >= 2
        })
        .await
    );
    let (status, aborted) =
        f.t.post(&format!("/v1/rollouts/{id}/abort"), &f.cookie, json!({}))
            .await;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(aborted["state"], "aborted");
    assert!(
        statuses(&aborted).iter().any(|s| s == "skipped"),
        "{aborted}"
    );
    let (status, v) =
        f.t.post(&format!("/v1/rollouts/{id}/resume"), &f.cookie, json!({}))
            .await;
    assert_eq!((status, sensei_e2e::error_code(&v)), (409, "invalid_state"));
}

#[tokio::test]
async fn an_unreachable_agent_counts_against_the_budget() {
    let f = fleet().await;
    f.configure("offline", &["true"]).await;
    let _ = f.agents[1].stop.send(true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = f
        .start(json!({"server_ids": [f.agents[0].server_id, f.agents[1].server_id],
                      "selector": null,
                      "strategy": {"canary": 0, "batch_percent": 100, "max_failures": 1, "unreachable_after_seconds": 2}}))
        .await;
    let done = f
        .wait_state(r["id"].as_str().expect("id"), &["succeeded", "halted"])
        .await;
    assert_eq!(
        done["state"], "succeeded",
        "one failure is within the budget: {done}"
    );
    let mut s = statuses(&done);
    s.sort();
    assert_eq!(s, vec!["succeeded", "unreachable"]);
    let unreachable = done["targets"]
        .as_array()
        .expect("t")
        .iter()
        .find(|t| t["status"] == "unreachable")
        .expect("target");
    assert_eq!(unreachable["server_id"], f.agents[1].server_id.to_string());
    assert!(
        unreachable["error"]
            .as_str()
            .unwrap_or("")
            .contains("agent offline"),
        "{unreachable}"
    );
}

#[tokio::test]
async fn bad_rollout_requests_are_refused() {
    let f = fleet().await;
    for (body, status, code) in [
        (
            json!({"project_id": f.project, "ref": "main"}),
            422,
            "invalid_targets",
        ),
        (
            json!({"project_id": f.project, "ref": "main", "selector": {"labels": {"env": "nowhere"}}}),
            422,
            "no_targets",
        ),
        (
            json!({"project_id": f.project, "ref": "main", "server_ids": [uuid::Uuid::new_v4()]}),
            404,
            "not_found",
        ),
        (
            json!({"project_id": f.project, "ref": "main", "server_ids": [f.ssh_server], "strategy": {"batch_size": 0}}),
            422,
            "invalid_strategy",
        ),
        (
            json!({"project_id": f.project, "ref": "-x", "server_ids": [f.ssh_server]}),
            422,
            "invalid_ref",
        ),
    ] {
        let (st, v) = f.t.post("/v1/rollouts", &f.cookie, body.clone()).await;
        assert_eq!(
            (st, sensei_e2e::error_code(&v)),
            (status, code),
            "{body}: {v}"
        );
    }
    let n: i64 =
        f.t.db()
            .await
            .query_one("SELECT count(*) FROM rollouts", &[])
            .await
            .expect("q")
            .get(0);
    assert_eq!(n, 0);
}

/// A batch larger than a chunk is queued a chunk per transaction, in rollout order, so that
/// its first servers run while the rest is queued. Every target gets exactly one job, and a
/// server without credentials is unreachable whichever chunk it falls in. The servers have
/// valid certificate rows made in SQL and no agent connects: what is checked is the queueing.
#[tokio::test]
async fn a_batch_larger_than_a_chunk_is_queued_in_chunks_each_target_once() {
    let t = TestPlane::start().await;
    let (cookie, body) = t.signup("chunks@example.com", PW).await;
    let account: uuid::Uuid = body["account"]["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let chunk = sensei_control_plane::rollouts::QUEUE_CHUNK;
    let servers = chunk * 2 + chunk / 2;
    let db = t.db().await;
    // Created a millisecond apart, so that rollout order (the selector's) is name order.
    db.execute(
        "INSERT INTO servers (id, account_id, name, host, transport, labels, created_at) \
         SELECT gen_random_uuid(), $1, 'chunk-' || g, 'h', 'agent', '{\"fleet\":\"chunks\"}', \
                now() + g * interval '1 millisecond' \
         FROM generate_series(1, $2::bigint) g",
        &[&account, &servers],
    )
    .await
    .expect("servers");
    // Every 500th server has no certificate: some in each chunk.
    db.execute(
        "INSERT INTO agent_certificates (fingerprint, server_id, serial, not_after) \
         SELECT sha256(id::text::bytea), id, 'chunk', now() + interval '1 day' \
         FROM servers WHERE account_id = $1 AND substr(name, 7)::int % 500 <> 0",
        &[&account],
    )
    .await
    .expect("certificates");
    let without = servers / 500;
    let (_, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "chunks", "repo_url": "/nonexistent", "deploy_path": "/srv/chunks"}),
        )
        .await;
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"project_id": project["id"], "ref": "main",
                   "selector": {"labels": {"fleet": "chunks"}},
                   "strategy": {"canary": 0, "batch_percent": 100, "max_failures": without}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id: uuid::Uuid = rollout["id"].as_str().expect("id").parse().expect("uuid");
    let pending = || async {
        db.query_one(
            "SELECT count(*) FROM rollout_targets WHERE rollout_id = $1 AND status = 'pending'",
            &[&id],
        )
        .await
        .expect("pending")
        .get::<_, i64>(0)
    };
    assert!(
        eventually(Duration::from_secs(60), || async { pending().await == 0 }).await,
        "{} targets still pending",
        pending().await
    );

    let count = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[&id]).await.expect(sql).get::<_, i64>(0) }
    };
    assert_eq!(
        count("SELECT count(*) FROM deployments WHERE rollout_id = $1").await,
        servers - without
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM (SELECT server_id FROM deployments WHERE rollout_id = $1 \
             GROUP BY server_id HAVING count(*) > 1) twice"
        )
        .await,
        0,
        "a server got two jobs"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM rollout_targets WHERE rollout_id = $1 AND status = 'running' \
             AND deployment_id IS NOT NULL"
        )
        .await,
        servers - without
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM rollout_targets WHERE rollout_id = $1 AND status = 'unreachable' \
             AND deployment_id IS NULL AND error LIKE '%no valid agent certificate%'"
        )
        .await,
        without
    );
    // One transaction per chunk (a row's xmin names the transaction that wrote it), taken
    // in rollout order: walking the targets by position, the writing transaction changes
    // exactly once per chunk boundary.
    let writers: Vec<String> = db
        .query(
            "SELECT d.xmin::text FROM rollout_targets t JOIN deployments d ON d.id = t.deployment_id \
             WHERE t.rollout_id = $1 ORDER BY t.position",
            &[&id],
        )
        .await
        .expect("writers")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let changes = writers.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(changes, 2, "chunks of {chunk} in {servers} targets");
    // Until its deadline the rollout waits for its agents.
    let (_, shown) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
    assert_eq!(shown["state"], "running", "{shown}");
}
