//! Knowing and upgrading the fleet's agents: real agents report their host (OS,
//! architecture); upgrade rollouts go through the rollout engine with real agents whose
//! upgrade trigger (agent.toml's `upgrade_command`) is a script this test controls.

use std::time::Duration;

use sensei_e2e::{eventually, open_tempdir, workspace_binary, TestAgent, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery staple";

/// A job policy whose upgrade trigger writes its version argument and the time (seconds
/// since the epoch, with fractions) to `marker`, then exits 0 as `systemctl --no-block` would.
fn recording_policy(marker: &std::path::Path) -> sensei_agent::jobs::JobPolicy {
    sensei_agent::jobs::JobPolicy {
        upgrade_command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!(
                "printf '%s %s' \"$1\" \"$(date +%s.%N)\" > {}",
                marker.display()
            ),
            "trigger".into(),
            "{version}".into(),
        ]),
        ..Default::default()
    }
}

async fn plane_and_account() -> (TestPlane, String) {
    let t = TestPlane::start().await;
    let (cookie, _) = t
        .signup(
            &format!("u{}@example.com", uuid::Uuid::new_v4().simple()),
            PW,
        )
        .await;
    (t, cookie)
}

/// An agent labelled `{"tier": "up"}` whose upgrade trigger records to `marker`
/// ([`recording_policy`]), once it has said hello (its version is known).
async fn recording_agent(
    t: &TestPlane,
    cookie: &str,
    name: &str,
    marker: &std::path::Path,
) -> TestAgent {
    let agent = t
        .start_labelled_agent(
            cookie,
            name,
            json!({"tier": "up"}),
            recording_policy(marker),
        )
        .await;
    let path = format!("/v1/servers/{}", agent.server_id);
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.get(&path, cookie).await.1["agent"]["version"] == sensei_agent::version()
        })
        .await,
        "{name} never said hello"
    );
    agent
}

async fn wait_rollout(t: &TestPlane, cookie: &str, id: &str, states: &[&str]) -> Value {
    let mut last = Value::Null;
    // Up to 60 s: an upper bound for a loaded machine, not a timing.
    for _ in 0..1200 {
        let (_, r) = t.get(&format!("/v1/rollouts/{id}"), cookie).await;
        if states.iter().any(|s| r["state"] == *s) {
            return r;
        }
        last = r;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("rollout {id} did not reach {states:?}: {last}");
}

fn target<'a>(rollout: &'a Value, agent: &TestAgent) -> &'a Value {
    rollout["targets"]
        .as_array()
        .and_then(|ts| {
            ts.iter()
                .find(|t| t["server_id"] == agent.server_id.to_string().as_str())
        })
        .unwrap_or_else(|| panic!("no target for {}: {rollout}", agent.server_id))
}

#[tokio::test]
async fn agents_report_their_os_and_architecture() {
    let (t, cookie) = plane_and_account().await;
    let agent = t.start_agent(&cookie, "host-facts").await;
    let path = format!("/v1/servers/{}", agent.server_id);
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.get(&path, &cookie).await.1["agent"]["arch"].is_string()
        })
        .await,
        "the agent never reported its host"
    );
    let (os, arch) = sensei_agent::upgrade::host_facts();
    let (_, server) = t.get(&path, &cookie).await;
    assert_eq!(server["agent"]["os"], os.as_str(), "{server}");
    assert_eq!(server["agent"]["arch"], std::env::consts::ARCH, "{server}");
    assert_eq!(arch, std::env::consts::ARCH);
    let (_, list) = t.get("/v1/servers", &cookie).await;
    let listed = list["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == server["id"]))
        .expect("listed");
    assert_eq!(listed["agent"]["os"], os.as_str());
    assert_eq!(listed["agent"]["arch"], std::env::consts::ARCH);
    // The dashboard's server page and fleet table show them.
    for page in [
        format!("/ui/servers/{}", agent.server_id),
        "/ui/servers".into(),
    ] {
        let html = t
            .http
            .get(t.url(&page))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("page")
            .text()
            .await
            .expect("html");
        assert!(html.contains(std::env::consts::ARCH), "{page}: {html}");
        assert!(
            html.contains(&os.replace('&', "&amp;").replace('"', "&quot;")),
            "{page}"
        );
    }

    // Out-of-bounds values never reach the table: the database refuses them too.
    let db = t.db().await;
    for (os, arch) in [
        ("x".repeat(101), "x86_64"),
        ("ok\u{1b}[2J".into(), "x86_64"),
        ("ok".into(), "X86"),
    ] {
        assert!(db
            .execute(
                "UPDATE servers SET agent_os = $2, agent_arch = $3 WHERE id = $1",
                &[&agent.server_id, &os, &arch],
            )
            .await
            .is_err());
    }
}

#[tokio::test]
async fn upgrade_rollouts_succeed_for_current_agents_and_fail_for_missing_versions() {
    let (t, cookie) = plane_and_account().await;
    let dir = open_tempdir();
    let markers: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("trigger-{i}")))
        .collect();
    let mut agents = Vec::new();
    for (i, marker) in markers.iter().enumerate() {
        agents.push(recording_agent(&t, &cookie, &format!("up-{i}"), marker).await);
    }
    let rollouts = || async { t.count("SELECT count(*) FROM rollouts").await };
    let upgrade_jobs = || async {
        t.count("SELECT count(*) FROM deployments WHERE kind = 'upgrade_agent'")
            .await
    };

    // Refused before anything is made: a version that is no Debian version, both kinds at
    // once, a rollback on halt (an upgrade rolls back with another upgrade).
    for (body, code) in [
        (
            json!({"upgrade_agent": {"version": "0.1.1; reboot"}}),
            "invalid_version",
        ),
        (
            json!({"upgrade_agent": {"version": "--reinstall"}}),
            "invalid_version",
        ),
        (
            json!({"upgrade_agent": {"version": "1".repeat(65)}}),
            "invalid_version",
        ),
        (
            json!({"upgrade_agent": {"version": "0.1.1-1"}, "project_id": uuid::Uuid::new_v4(), "ref": "main"}),
            "invalid_rollout",
        ),
        (json!({}), "invalid_rollout"),
        (
            json!({"upgrade_agent": {"version": "0.1.1-1"}, "strategy": {"on_halt": "rollback"}}),
            "invalid_strategy",
        ),
        (
            json!({"upgrade_agent": {"version": "0.1.1-1"}, "strategy": {"upgrade_deadline_seconds": 0}}),
            "invalid_strategy",
        ),
    ] {
        let mut body = body;
        body["selector"] = json!({"labels": {"tier": "up"}});
        let (status, v) = t.post("/v1/rollouts", &cookie, body.clone()).await;
        assert_eq!(
            (status, sensei_e2e::error_code(&v)),
            (422, code),
            "{body}: {v}"
        );
        assert_eq!(rollouts().await, 0);
    }

    // Every agent already runs the version: each target succeeds at once, saying so, and no
    // job is queued, no trigger runs.
    let current = format!("{}-1", sensei_agent::version());
    let (status, r) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"upgrade_agent": {"version": current}, "selector": {"labels": {"tier": "up"}},
                   "strategy": {"canary": 1, "batch_size": 2}}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["upgrade_agent"]["version"], current.as_str());
    assert!(r["project_id"].is_null() && r["ref"].is_null(), "{r}");
    let done = wait_rollout(
        &t,
        &cookie,
        r["id"].as_str().expect("id"),
        &["succeeded", "halted"],
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    for a in &agents {
        let tg = target(&done, a);
        assert_eq!(tg["status"], "succeeded", "{tg}");
        assert_eq!(
            tg["error"],
            format!(
                "already on version {}: nothing to upgrade",
                sensei_agent::version()
            )
            .as_str()
        );
    }
    assert_eq!(upgrade_jobs().await, 0);
    assert!(markers.iter().all(|m| !m.exists()));

    // A version that never arrives: the canary's agent checks the signed job, reports it,
    // triggers the upgrade, and never comes back on 99.0.0 within the 2 s deadline: its
    // target fails, the failure budget halts the rollout, the others never get a job.
    let (status, r) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"upgrade_agent": {"version": "99.0.0-1"},
                   "server_ids": [agents[1].server_id, agents[0].server_id, agents[2].server_id],
                   "strategy": {"canary": 1, "batch_size": 1, "max_failures": 0,
                                "upgrade_deadline_seconds": 2}}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_str().expect("id");
    let done = wait_rollout(&t, &cookie, id, &["halted", "succeeded"]).await;
    assert_eq!(done["state"], "halted", "{done}");
    assert!(
        done["halted_reason"]
            .as_str()
            .unwrap_or("")
            .contains("max_failures is 0"),
        "{done}"
    );
    let canary = target(&done, &agents[1]);
    assert_eq!(canary["status"], "failed", "{canary}");
    assert_eq!(
        canary["error"],
        format!(
            "the agent did not come back reporting version 99.0.0 within 2 s (it reports {})",
            sensei_agent::version()
        )
        .as_str()
    );
    for other in [&agents[0], &agents[2]] {
        let tg = target(&done, other);
        assert_eq!(tg["status"], "skipped", "{tg}");
        assert!(tg["deployment_id"].is_null(), "{tg}");
    }
    // The canary's trigger ran once, with the version, after its job was recorded.
    let marker = std::fs::read_to_string(&markers[1]).expect("the canary's trigger ran");
    let (version, at) = marker.split_once(' ').expect("version and time");
    assert_eq!(version, "99.0.0-1");
    let triggered_at: f64 = at.parse().expect("time");
    let db = t.db().await;
    let job = db
        .query_one(
            "SELECT status, extract(epoch FROM finished_at)::float8 AS finished \
             FROM deployments WHERE kind = 'upgrade_agent' AND server_id = $1",
            &[&agents[1].server_id],
        )
        .await
        .expect("the canary's upgrade job");
    assert_eq!(job.get::<_, &str>("status"), "succeeded");
    assert!(
        job.get::<_, f64>("finished") <= triggered_at,
        "the outcome was recorded before the trigger ran"
    );
    assert!(
        !markers[0].exists() && !markers[2].exists(),
        "nothing else changed"
    );
    assert_eq!(upgrade_jobs().await, 1);
    // The halted rollout moves no further.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, again) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
    assert_eq!(again["targets"], done["targets"]);
    let audit = t.audit_actions().await;
    assert!(audit.iter().any(|a| a == "rollout.halted"), "{audit:?}");
}

/// The packaging step's stamp: a stamped copy of the real agent binary reports the package's
/// upstream version in `--version`; a malformed version is refused and writes nothing.
#[tokio::test]
async fn a_stamped_agent_binary_reports_the_package_version() {
    let agent = workspace_binary("sensei-agent");
    let dir = open_tempdir();
    let stamped = dir.path().join("sensei-agent");
    let out = std::process::Command::new(&agent)
        .args(["stamp-version", "--version", "1:7.8.9-2", "--input"])
        .arg(&agent)
        .arg("--output")
        .arg(&stamped)
        .output()
        .expect("stamp");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = std::process::Command::new(&stamped)
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "sensei-agent 7.8.9"
    );
    let original = std::process::Command::new(&agent)
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&original.stdout).trim(),
        format!("sensei-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let refused = dir.path().join("refused");
    let out = std::process::Command::new(&agent)
        .args(["stamp-version", "--version", "7.8.9 --evil", "--input"])
        .arg(&agent)
        .arg("--output")
        .arg(&refused)
        .output()
        .expect("stamp");
    assert!(!out.status.success());
    assert!(!refused.exists());
}

/// The success path with a real agent process: the agent binary runs under a supervisor that
/// restarts it when it exits (as systemd does), its upgrade trigger (agent.toml) replaces the
/// binary with a copy stamped with the new version and stops the agent, as the package's
/// upgrade would; the agent comes back reporting the new version and the target succeeds.
#[tokio::test]
async fn an_upgrade_rollout_upgrades_a_real_agent_process() {
    let (t, cookie) = plane_and_account().await;
    let (server_id, token) = t.create_agent_server(&cookie, "real-up", json!({})).await;
    let dir = open_tempdir();
    let bin = dir.path().join("sensei-agent");
    std::fs::copy(workspace_binary("sensei-agent"), &bin).expect("copy the agent");
    let state = dir.path().join("state");
    // Not a blocking wait: the control plane answering it runs on this test's runtime.
    let enrolled = tokio::process::Command::new(&bin)
        .args([
            "enroll",
            "--control-plane",
            &t.agent_endpoint(),
            "--token",
            &token,
        ])
        .args(["--ca-fingerprint", &t.plane.ca_fingerprint().to_string()])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .await
        .expect("enroll");
    assert!(
        enrolled.status.success(),
        "{}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let triggered = dir.path().join("triggered");
    let script = dir.path().join("upgrade.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\n\"{bin}\" stamp-version --version \"$1\" --input \"{bin}\" --output \"{bin}\"\n\
             echo \"$1\" >> \"{triggered}\"\nkill -TERM $PPID\n",
            bin = bin.display(),
            triggered = triggered.display()
        ),
    )
    .expect("script");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "upgrade_command = [\"/bin/sh\", \"{}\", \"{{version}}\"]\n",
            script.display()
        ),
    )
    .expect("config");
    // The supervisor: restart the agent whenever it exits; killed with the task.
    let supervisor = {
        let (bin, config, state) = (bin.clone(), config.clone(), state.clone());
        tokio::spawn(async move {
            loop {
                let mut agent = tokio::process::Command::new(&bin)
                    .arg("--config")
                    .arg(&config)
                    .args(["run", "--allow-root", "--state-dir"])
                    .arg(&state)
                    .kill_on_drop(true)
                    .spawn()
                    .expect("run the agent");
                let _ = agent.wait().await;
                // As the unit's RestartSec, shortened.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let path = format!("/v1/servers/{server_id}");
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (_, s) = t.get(&path, &cookie).await;
            s["agent"]["version"] == env!("CARGO_PKG_VERSION") && s["agent"]["connected"] == true
        })
        .await,
        "the agent never connected"
    );

    let (status, r) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"upgrade_agent": {"version": "0.1.1-1"}, "server_ids": [server_id],
                   "strategy": {"canary": 0, "upgrade_deadline_seconds": 60}}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let done = wait_rollout(
        &t,
        &cookie,
        r["id"].as_str().expect("id"),
        &["succeeded", "halted"],
    )
    .await;
    supervisor.abort();
    let _ = supervisor.await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let tg = &done["targets"][0];
    assert_eq!(tg["status"], "succeeded", "{tg}");
    assert!(tg["error"].is_null(), "{tg}");
    assert_eq!(
        std::fs::read_to_string(&triggered).expect("triggered"),
        "0.1.1-1\n",
        "the trigger ran once, with the version"
    );
    let (_, server) = t.get(&path, &cookie).await;
    assert_eq!(server["agent"]["version"], "0.1.1", "{server}");
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .expect("version");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "sensei-agent 0.1.1"
    );
}

/// A hostile agent describing its host again and again on one session: the second
/// description resets its stream and writes nothing (one write per session at most).
#[tokio::test]
async fn a_second_host_description_on_one_session_is_refused_and_writes_nothing() {
    use sensei_shared::codec::io::write_frame;
    use sensei_shared::protocol::{AgentMessage, ControlMessage};

    let (t, cookie) = plane_and_account().await;
    let agent = t.start_agent(&cookie, "host-facts-twice").await;
    let path = format!("/v1/servers/{}", agent.server_id);
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.get(&path, &cookie).await.1["agent"]["arch"].is_string()
        })
        .await,
        "the agent never reported its host"
    );
    // The same identity, driven by the test: stop the real agent first.
    let _ = agent.stop.send(true);
    let identity = agent.state.load().expect("identity");
    let session = sensei_e2e::driven_session(&identity, "test").await;
    assert!(
        matches!(session.welcome, Some(ControlMessage::Welcome { .. })),
        "{:?}",
        session.welcome
    );
    let connection = &session.connection;
    let describe = |os: &str| AgentMessage::HostFacts {
        os: os.into(),
        arch: "x86_64".into(),
    };
    // The first description is stored and its stream finished.
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    write_frame(&mut send, &describe("First OS"))
        .await
        .expect("facts");
    let first = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64))
        .await
        .expect("in time");
    assert!(
        first.is_ok(),
        "the first description's stream ends cleanly: {first:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.get(&path, &cookie).await.1["agent"]["os"] == "First OS"
        })
        .await,
        "the first description was not stored"
    );
    // The second is refused: the stream is reset, and nothing is written.
    let (mut send, mut recv) = connection.open_bi().await.expect("stream");
    write_frame(&mut send, &describe("Second OS"))
        .await
        .expect("facts");
    let second = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64))
        .await
        .expect("in time");
    assert!(
        matches!(
            second,
            Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))
        ),
        "{second:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.get(&path, &cookie).await.1["agent"]["os"], "First OS");
    connection.close(quinn::VarInt::from_u32(0), b"");
    session.endpoint.wait_idle().await;
}

/// An upgrade whose result the control plane could not record at once still starts once the
/// result is recorded from the agent's next connection: the agent keeps the upgrade on disk
/// with its result. Before, the upgrade was forgotten with the connection while the job was
/// recorded as succeeded, and the agent never upgraded.
#[tokio::test]
async fn an_upgrade_recorded_from_a_later_connection_still_starts() {
    let (t, cookie) = plane_and_account().await;
    let dir = open_tempdir();
    let marker = dir.path().join("trigger");
    let agent = recording_agent(&t, &cookie, "late", &marker).await;
    let db = t.db().await;
    let ends = "test_refused_upgrade_ends";
    sensei_e2e::watch_updates(
        &db,
        "deployments",
        ends,
        &format!("{} AND NEW.kind = 'upgrade_agent'", sensei_e2e::JOB_ENDS),
        true,
    )
    .await;
    let (status, r) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"upgrade_agent": {"version": "99.0.0-1"},
                   "server_ids": [agent.server_id],
                   "strategy": {"batch_size": 1, "upgrade_deadline_seconds": 600}}),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    // The finish worker's attempts, then at least one report from a new connection.
    let given_up = sensei_control_plane::jobs::record::RECORD_RETRIES.len() as i64 + 1;
    let refused = sensei_e2e::fired_more_than(&db, ends, given_up).await;
    assert!(refused > given_up, "attempts to record the end: {refused}");
    assert!(
        !marker.exists(),
        "the upgrade started before its result was recorded"
    );
    db.batch_execute(&format!("DROP TRIGGER {ends} ON deployments"))
        .await
        .expect("take ends again");
    // The trigger's shell creates the file before it writes to it: wait for what it wrote.
    let written = || std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(30), || async {
            written().contains(' ')
        })
        .await,
        "the upgrade never started"
    );
    let triggered = written();
    assert!(triggered.starts_with("99.0.0-1 "), "{triggered}");
    let job = db
        .query_one(
            "SELECT status FROM deployments WHERE kind = 'upgrade_agent' AND server_id = $1",
            &[&agent.server_id],
        )
        .await
        .expect("the upgrade job");
    assert_eq!(job.get::<_, &str>("status"), "succeeded");
}
