//! Every main page checked by axe-core in the browser (no serious or critical violation) and
//! walked with the Tab key (every link, button and field reached, with a visible focus).

use std::time::Duration;

use sensei_e2e::browser::Browser;
use sensei_e2e::{eventually, git_repo, open_tempdir, TestPlane};
use serde_json::json;

use super::{sign_in, PW};

/// Checks the page the browser shows; returns what is wrong with it, named by `path`.
async fn check(b: &Browser, path: &str) -> Vec<String> {
    b.wait_for("main h1").await;
    let mut problems: Vec<String> = b
        .accessibility_violations()
        .await
        .into_iter()
        .map(|v| format!("{path}: {v}"))
        .collect();
    problems.extend(
        b.keyboard_problems()
            .await
            .into_iter()
            .map(|p| format!("{path}: {p}")),
    );
    problems
}

#[tokio::test]
async fn every_main_page_passes_axe_core_and_is_usable_with_the_keyboard() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let agent = t
        .start_labelled_agent(
            &cookie,
            "web-1",
            json!({"env": "prod"}),
            sensei_agent::jobs::JobPolicy::default(),
        )
        .await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string(),
                   "env": {"DATABASE_URL": "postgres://x"}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = project["id"].as_str().expect("id").to_owned();
    let server = agent.server_id.to_string();
    let deployment = t.deploy_and_wait(&cookie, &project, &server, "main").await;
    assert_eq!(deployment["status"], "succeeded", "{deployment}");
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"project_id": project, "ref": "main", "server_ids": [server],
                   "strategy": {"canary": 0, "manual_approval": true}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");

    let b = Browser::start(&t.base).await;
    let mut problems = Vec::new();
    b.open("/ui/sign-in").await;
    problems.extend(check(&b, "/ui/sign-in").await);
    sign_in(&b, email).await;
    for path in [
        "/ui/servers".to_owned(),
        format!("/ui/servers/{server}"),
        "/ui/servers/new".to_owned(),
        "/ui/projects".to_owned(),
        format!("/ui/projects/{project}"),
        "/ui/deployments".to_owned(),
        format!("/ui/deployments/{}", deployment["id"].as_str().expect("id")),
        "/ui/rollouts".to_owned(),
        format!("/ui/rollouts/{}", rollout["id"].as_str().expect("id")),
        "/ui/settings/sessions".to_owned(),
        "/ui/settings/security".to_owned(),
        "/ui/settings/members".to_owned(),
        "/ui/settings/roles".to_owned(),
        "/ui/settings/api-keys".to_owned(),
        "/ui/settings/account".to_owned(),
        "/ui/settings/sso".to_owned(),
        "/ui/settings/audit".to_owned(),
    ] {
        b.open(&path).await;
        problems.extend(check(&b, &path).await);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check can fail: a field without a label and text too faint to read, added to the
    // last page, are found.
    b.driver
        .execute(
            "var i = document.createElement('input'); i.type = 'text'; \
             var p = document.createElement('p'); p.textContent = 'faint'; p.style.color = '#ddd'; \
             document.getElementById('main').append(i, p);",
            vec![],
        )
        .await
        .expect("spoil the page");
    let found = b.accessibility_violations().await;
    for rule in ["label (critical)", "color-contrast (serious)"] {
        assert!(
            found.iter().any(|v| v.starts_with(rule)),
            "{rule}: {found:?}"
        );
    }
    // axe-core ran under the pages' policy, which it did not need weakened.
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}
