//! Managing projects and servers from their pages: a project's settings and environment
//! (values write-only), deleting a project, a new enrollment token, and deleting a server
//! with its two-step advice. Each through its confirmation step where it has one, checked
//! against the API.

use std::time::Duration;

use sensei_agent::session::RunOutcome;
use sensei_e2e::browser::Browser;
use sensei_e2e::{eventually, git_repo, open_tempdir, TestPlane};
use serde_json::json;

use super::{fresh_email, sign_in, PW};

#[tokio::test]
async fn a_project_is_edited_its_environment_set_by_name_and_it_is_deleted() {
    let t = TestPlane::start().await;
    let email = fresh_email("projects");
    let (cookie, _) = t.signup(&email, PW).await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": "/srv/site", "env": {"DATABASE_URL": "postgres://secret-one"}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let id = project["id"].as_str().expect("id").to_owned();
    let api = format!("/v1/projects/{id}");

    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    b.open("/ui/projects").await;
    b.click("#projects a").await;
    b.wait_path(&format!("/ui/projects/{id}")).await;
    b.wait_for("tr[data-env='DATABASE_URL']").await;
    // Names only: the value is in no page.
    assert!(!b.source().await.contains("secret-one"));

    // A variable set by name; its value is not shown back.
    b.fill("#env-name", "API_TOKEN").await;
    b.fill("#env-value", "hunter2-value").await;
    b.click("#set-env").await;
    b.wait_text(".notice", |text| text.contains("variable is set"))
        .await;
    b.wait_for("tr[data-env='API_TOKEN']").await;
    assert!(!b.source().await.contains("hunter2-value"));
    let (_, now) = t.get(&api, &cookie).await;
    assert_eq!(
        now["env_names"],
        json!(["API_TOKEN", "DATABASE_URL"]),
        "{now}"
    );

    // A name the API refuses: the page says why and nothing changes.
    b.fill("#env-name", "1-NOT-A-NAME").await;
    b.fill("#env-value", "x").await;
    b.click("#set-env").await;
    b.wait_text("main .error", |text| !text.is_empty()).await;
    let (_, unchanged) = t.get(&api, &cookie).await;
    assert_eq!(unchanged["env_names"], now["env_names"]);

    // Removing one keeps the other.
    b.open(&format!("/ui/projects/{id}")).await;
    b.click("tr[data-env='DATABASE_URL'] button").await;
    b.wait_text(".notice", |text| text.contains("removed"))
        .await;
    assert!(!b.has("tr[data-env='DATABASE_URL']").await);
    let (_, now) = t.get(&api, &cookie).await;
    assert_eq!(now["env_names"], json!(["API_TOKEN"]), "{now}");

    // The settings: hooks, shared paths, health check, releases kept.
    b.fill("#keep_releases", "3").await;
    b.fill("#shared_paths", "storage/\nconfig/app.ini").await;
    b.fill("#build", "make assets\nmake test").await;
    b.fill("#post_switch", "systemctl --user restart site")
        .await;
    b.fill("#health_check", "test -f index.html").await;
    b.click("#save-project").await;
    b.wait_text(".notice", |text| text.contains("Saved")).await;
    b.wait_text("#keep-releases", |text| text == "3").await;
    b.screenshot("project").await;
    let (_, saved) = t.get(&api, &cookie).await;
    assert_eq!(saved["keep_releases"], 3, "{saved}");
    assert_eq!(saved["shared_paths"], json!(["storage/", "config/app.ini"]));
    assert_eq!(saved["hooks"]["build"], json!(["make assets", "make test"]));
    assert_eq!(saved["hooks"]["pre_switch"], json!([]));
    assert_eq!(
        saved["hooks"]["post_switch"],
        json!(["systemctl --user restart site"])
    );
    assert_eq!(saved["health_check"], "test -f index.html");
    // The edit did not touch the environment.
    assert_eq!(saved["env_names"], json!(["API_TOKEN"]));

    // A shared path leaving the release is refused by the API's own validation, and the
    // rest of that form is not saved either.
    b.fill("#shared_paths", "storage/\n../../etc").await;
    b.fill("#health_check", "").await;
    b.click("#save-project").await;
    b.wait_text("main .error", |text| text.contains("..")).await;
    let (_, after) = t.get(&api, &cookie).await;
    assert_eq!(after["shared_paths"], saved["shared_paths"]);
    assert_eq!(after["health_check"], "test -f index.html");

    // Deleting goes through a confirmation page, which deletes nothing by itself.
    b.open(&format!("/ui/projects/{id}")).await;
    b.click("#delete-project").await;
    b.wait_for("#confirm-delete-project").await;
    assert_eq!(t.get(&api, &cookie).await.0, 200);
    b.click("#confirm-delete-project").await;
    b.wait_path("/ui/projects").await;
    b.wait_text(".notice", |text| text.contains("deleted"))
        .await;
    assert_eq!(t.get(&api, &cookie).await.0, 404);
    let actions = t.audit_actions().await;
    for action in ["project.env_updated", "project.updated", "project.deleted"] {
        assert!(actions.iter().any(|a| a == action), "{action}: {actions:?}");
    }
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn a_new_enrollment_token_enrolls_again_and_deleting_a_server_revokes_it() {
    let t = TestPlane::start().await;
    let email = fresh_email("servers");
    let (cookie, _) = t.signup(&email, PW).await;
    let agent = t.start_agent(&cookie, "edge-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let server_api = format!("/v1/servers/{}", agent.server_id);
    let (_, before) = t.get(&server_api, &cookie).await;
    let first_cert = before["agent"]["certificate_fingerprint"].clone();
    assert!(first_cert.is_string(), "{before}");

    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    b.open(&format!("/ui/servers/{}", agent.server_id)).await;
    b.click("#new-token").await;
    // The confirmation step issues nothing.
    b.wait_for("#confirm-new-token").await;
    let issued = || async {
        t.audit_actions()
            .await
            .iter()
            .filter(|a| *a == "server.enrollment_token_created")
            .count()
    };
    let issued_before = issued().await;
    b.click("#confirm-new-token").await;
    let command = b
        .wait_text("#enroll-command", |text| {
            text.starts_with("sensei-agent enroll")
        })
        .await;
    assert_eq!(issued().await, issued_before + 1);
    let mut words = command.split_whitespace();
    words.find(|w| *w == "--token");
    let token = words.next().expect("a token").to_owned();
    // The token enrolls the server again: a new certificate replaces the first.
    let dir = open_tempdir();
    let mut options = t.enroll_options(&token, dir.path());
    options.expected_server_id = Some(agent.server_id);
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll with the new token");
    let (_, after) = t.get(&server_api, &cookie).await;
    assert!(after["agent"]["certificate_fingerprint"].is_string());
    assert_ne!(after["agent"]["certificate_fingerprint"], first_cert);
    // Shown once: the server's page does not have it.
    b.open(&format!("/ui/servers/{}", agent.server_id)).await;
    b.wait_for("#cert-fingerprint").await;
    assert!(!b.source().await.contains(&token));

    // An SSH server's delete page names the key line to remove first, by its fingerprint.
    let (status, ssh) = t
        .post(
            "/v1/servers",
            &cookie,
            json!({"name": "legacy", "host": "127.0.0.1", "transport": "ssh", "username": "deploy"}),
        )
        .await;
    assert_eq!(status, 201, "{ssh}");
    b.open(&format!("/ui/servers/{}", ssh["id"].as_str().expect("id")))
        .await;
    b.click("#delete-server").await;
    let advice = b
        .wait_text("#delete-advice", |text| text.contains("authorized_keys"))
        .await;
    assert!(
        advice.contains(ssh["fingerprint"].as_str().expect("fingerprint")),
        "{advice}"
    );
    b.screenshot("server-delete").await;

    // Deleting the agent's server: a confirmation page, then a soft revoke.
    b.open(&format!("/ui/servers/{}/delete", agent.server_id))
        .await;
    b.wait_for("#confirm-delete-server").await;
    assert_eq!(t.get(&server_api, &cookie).await.0, 200);
    b.click("#confirm-delete-server").await;
    b.wait_path("/ui/servers").await;
    b.wait_text(".notice", |text| text.contains("deleted"))
        .await;
    b.wait_text("#servers", |text| !text.contains("edge-1"))
        .await;
    assert_eq!(t.get(&server_api, &cookie).await.0, 404);
    // Its running agent is cut off: the certificates died with the server.
    let outcome = tokio::time::timeout(Duration::from_secs(30), agent.task)
        .await
        .expect("the agent was not cut off")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert!(t
        .audit_actions()
        .await
        .iter()
        .any(|a| a == "server.deleted"));
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}
