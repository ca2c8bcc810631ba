//! A backup is what `docs/operations.md` says it is: `pg_dump` of the database plus the field
//! key (never in the dump). Restored into a new cluster with the same key, a new control
//! plane holds everything, and its agents reconnect with the certificates they have.

use sensei_control_plane::store::postgres_cluster::{ClusterOptions, PostgresCluster};
use sensei_e2e::{git_repo, open_tempdir, TestPlane};
use serde_json::json;

const PW: &str = "correct horse battery";

fn run(program: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deploys `main` of the project to the server and waits for the end.
async fn deploy(
    t: &TestPlane,
    cookie: &str,
    project: &str,
    server: uuid::Uuid,
) -> serde_json::Value {
    let body = json!({"project_id": project, "server_id": server.to_string(), "ref": "main"});
    let (status, d) = t.post("/v1/deployments", cookie, body).await;
    assert_eq!(status, 201, "{d}");
    t.wait_deployment(cookie, d["id"].as_str().expect("id"))
        .await
}

#[tokio::test]
async fn a_dump_and_the_field_key_restore_a_working_control_plane_on_a_new_cluster() {
    let t = TestPlane::start().await;
    let email = format!("b{}@example.com", uuid::Uuid::new_v4().simple());
    let (cookie, _) = t.signup(&email, PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string(),
                   "hooks": {"build": ["grep -q kept-in-the-dump-sealed .env"]},
                   "env": {"SECRET": "kept-in-the-dump-sealed"}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = project["id"].as_str().expect("id").to_owned();
    assert_eq!(
        deploy(&t, &cookie, &project, agent.server_id).await["status"],
        "succeeded"
    );

    // The backup: a dump, taken while the control plane runs.
    let bin = PostgresCluster::find_binaries().expect("binaries");
    let dump = dir.path().join("sensei.dump");
    run(
        &bin.join("pg_dump"),
        &[
            "--format=custom",
            "--no-owner",
            "--no-acl",
            "-f",
            &dump.display().to_string(),
            "-d",
            &t.conninfo,
        ],
    );
    // The dump holds no secret in clear.
    let raw = std::fs::read(&dump).expect("dump");
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("kept-in-the-dump-sealed"),
        "an env value is in the dump in clear"
    );

    // Disaster: the old control plane is gone. A new cluster gets the dump.
    let agent_addr = t.plane.agent_addr();
    let keys = t.keys.clone();
    t.plane.shutdown().await;
    let new_dir = open_tempdir();
    let cluster = PostgresCluster::start(
        &new_dir.path().join("pg"),
        &ClusterOptions {
            throwaway: true,
            ..ClusterOptions::default()
        },
    )
    .expect("new cluster");
    let admin = sensei_e2e::connect(&cluster.conninfo("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE sensei")
        .await
        .expect("create the database");
    admin
        .batch_execute(&format!("CREATE ROLE {} LOGIN", sensei_e2e::APP_ROLE))
        .await
        .expect("create the application role");
    run(
        &bin.join("pg_restore"),
        &[
            "--no-owner",
            "--no-acl",
            "--exit-on-error",
            "-d",
            &cluster.conninfo("sensei"),
            &dump.display().to_string(),
        ],
    );
    let restored = TestPlane::start_at(cluster.conninfo("sensei"), keys, agent_addr).await;
    // Accounts and sessions: the password signs in.
    let cookie = restored.login(&email, PW).await;
    let (_, servers) = restored.get("/v1/servers", &cookie).await;
    assert_eq!(servers["servers"][0]["id"], agent.server_id.to_string());
    let (_, p) = restored
        .get(&format!("/v1/projects/{project}"), &cookie)
        .await;
    assert_eq!(p["env_names"], json!(["SECRET"]));
    // The agent, still running, comes back by itself with the certificate it has.
    assert!(
        sensei_e2e::eventually(std::time::Duration::from_secs(60), || restored
            .agent_connected(&cookie, agent.server_id))
        .await,
        "the agent did not reconnect to the restored control plane"
    );
    // The sealed env decrypts (the hook checks the value) and the job-signing key is the one
    // the agent pinned: a deploy runs.
    assert_eq!(
        deploy(&restored, &cookie, &project, agent.server_id).await["status"],
        "succeeded"
    );
    // The audit chain is whole.
    let db = restored.db().await;
    let report = sensei_control_plane::audit::verify(&db, restored.keys.audit_keys())
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(report.rows > 3);
    drop(restored);
    drop(cluster);
}
