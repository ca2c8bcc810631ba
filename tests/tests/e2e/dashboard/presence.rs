//! Agents' presence followed live on the fleet and server pages (server-sent events), and
//! the fleet's status filter applied by the API across pages.

use std::time::Duration;

use sensei_agent::session::RunOutcome;
use sensei_e2e::browser::Browser;
use sensei_e2e::{eventually, open_tempdir, TestPlane};
use serde_json::{json, Value};

use super::{fresh_email, sign_in, PW};

/// Marks the page the browser shows; [`still_same_page`] tells whether it was reloaded since.
async fn mark_page(b: &Browser) {
    b.driver
        .execute("window.senseiTestMark = 'unreloaded';", vec![])
        .await
        .expect("mark the page");
}

async fn still_same_page(b: &Browser) -> bool {
    b.driver
        .execute("return window.senseiTestMark === 'unreloaded';", vec![])
        .await
        .expect("read the mark")
        .json()
        == &Value::Bool(true)
}

/// The value after `flag` in the page's enroll command.
fn word_after(command: &str, flag: &str) -> String {
    let mut words = command.split_whitespace();
    words.find(|w| *w == flag);
    words.next().expect("a value").to_owned()
}

#[tokio::test]
async fn an_agent_enrolled_with_the_pages_command_shows_connected_and_offline_without_reload() {
    let t = TestPlane::start().await;
    let email = fresh_email("presence");
    let (cookie, _) = t.signup(&email, PW).await;
    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    b.click("#add-server").await;
    b.fill("#name", "live-1").await;
    b.fill("#host", "live-1.example").await;
    b.click("#create-server").await;
    let command = b
        .wait_text("#enroll-command", |text| {
            text.starts_with("sensei-agent enroll")
        })
        .await;
    let server_id: uuid::Uuid = word_after(&command, "--server-id")
        .parse()
        .expect("server id");
    let row = format!("#servers tr[data-server='{server_id}']");

    // The fleet, open before the agent exists: the server is not enrolled.
    b.open("/ui/servers").await;
    b.wait_for(&format!("{row} [data-status='not enrolled']"))
        .await;
    mark_page(&b).await;

    // The agent enrolls with exactly the page's values and connects: the row changes.
    let dir = open_tempdir();
    let mut options = t.enroll_options(&word_after(&command, "--token"), dir.path());
    assert_eq!(
        word_after(&command, "--control-plane"),
        options.control_plane
    );
    assert_eq!(
        word_after(&command, "--ca-fingerprint"),
        options.ca_fingerprint.to_string()
    );
    options.expected_server_id = Some(server_id);
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll with the page's command");
    let state = options.state_dir.clone();
    let run = |state: sensei_agent::identity::StateDir| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            sensei_agent::session::run(&state, sensei_agent::jobs::JobPolicy::default(), stopped)
                .await
        });
        (stop, task)
    };
    let (stop, task) = run(state.clone());
    b.wait_for(&format!("{row} [data-status='connected']"))
        .await;
    let seen = b
        .wait_text(&format!("{row} [data-field='last_seen_at']"), |text| {
            text.ends_with(" UTC")
        })
        .await;
    assert!(still_same_page(&b).await, "the fleet page was reloaded");
    let (_, server) = t.get(&format!("/v1/servers/{server_id}"), &cookie).await;
    assert_eq!(server["agent"]["connected"], true, "{server}");
    assert!(
        server["agent"]["last_seen_at"]
            .as_str()
            .is_some_and(|at| at.replace('T', " ").starts_with(&seen[..16])),
        "{seen} / {server}"
    );

    // The server's page: the agent stops, and the page says so without reload.
    b.open(&format!("/ui/servers/{server_id}")).await;
    b.wait_for("#presence [data-status='connected']").await;
    mark_page(&b).await;
    stop.send(true).expect("stop the agent");
    let outcome = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the agent stops")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Shutdown);
    b.wait_for("#presence [data-status='offline']").await;
    assert!(still_same_page(&b).await, "the server page was reloaded");

    // Started again, then revoked by someone else (the API): the fleet page follows both.
    b.open("/ui/servers").await;
    mark_page(&b).await;
    let (_stop, task) = run(state);
    b.wait_for(&format!("{row} [data-status='connected']"))
        .await;
    let r = t
        .http
        .delete(t.url(&format!("/v1/servers/{server_id}/agent-certificate")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("revoke");
    assert!(r.status().is_success(), "{}", r.status());
    let outcome = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the agent is cut off")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    b.wait_for(&format!("{row} [data-status='not enrolled']"))
        .await;
    assert!(still_same_page(&b).await, "the fleet page was reloaded");
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn the_fleets_status_filter_applies_across_pages() {
    let t = TestPlane::start().await;
    let email = fresh_email("filter");
    let (cookie, _) = t.signup(&email, PW).await;
    // Two servers older than the connected one: a page of one server, filtered after the
    // fetch, would hold neither connected server.
    for name in ["idle-1", "idle-2"] {
        t.create_agent_server(&cookie, name, json!({})).await;
    }
    let agent = t.start_agent(&cookie, "busy-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let names = |list: &Value| -> Vec<String> {
        list["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_owned())
            .collect()
    };
    let (status, first) = t.get("/v1/servers?connected=true&limit=1", &cookie).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(names(&first), ["busy-1"]);
    assert_eq!(first["next_cursor"], Value::Null);
    let (_, offline) = t.get("/v1/servers?connected=false", &cookie).await;
    assert_eq!(names(&offline), ["idle-1", "idle-2"]);
    let (status, wrong) = t.get("/v1/servers?connected=maybe", &cookie).await;
    assert_eq!(status, 400, "{wrong}");
    assert_eq!(sensei_e2e::error_code(&wrong), "invalid_filter");

    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    b.open("/ui/servers?status=connected").await;
    let shown = b.wait_text("#servers tbody", |text| !text.is_empty()).await;
    assert!(shown.contains("busy-1"), "{shown}");
    assert!(!shown.contains("idle-"), "{shown}");
    b.open("/ui/servers?status=offline").await;
    let shown = b.wait_text("#servers tbody", |text| !text.is_empty()).await;
    assert!(
        shown.contains("idle-1") && shown.contains("idle-2"),
        "{shown}"
    );
    assert!(!shown.contains("busy-1"), "{shown}");
    b.close().await;
}
