//! The audit log: append-only in the database, tamper-evident, filtered and exported.

use sensei_control_plane::audit;
use sensei_e2e::{error_code, TestPlane};
use serde_json::json;

const PW: &str = "correct horse battery";

#[tokio::test]
async fn application_role_cannot_update_delete_or_truncate() {
    let t = TestPlane::start().await;
    t.signup("a@example.com", PW).await;
    // Through the control plane's own pool: the role the application uses.
    let client = t.plane.pool().get().await.expect("pool");
    for sql in [
        "UPDATE audit_log SET result = 'failure'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(msg.contains("append-only"), "{sql}: {msg}");
    }
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM audit_log WHERE result = 'success'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1, "the row survived unchanged");
}

/// Runs SQL as a database administrator who disables the guard first.
async fn tamper(t: &TestPlane, sql: &str) {
    t.db()
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; {sql}; COMMIT;"
        ))
        .await
        .expect("tamper");
}

#[tokio::test]
async fn changed_row_is_detected() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("c@example.com", PW).await;
    t.login("c@example.com", PW).await;
    t.post("/v1/auth/logout", &cookie, json!({})).await;
    let client = t.plane.pool().get().await.expect("pool");
    let clean = audit::verify(&**client).await.expect("verify");
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!(clean.rows, 3);

    tamper(
        &t,
        "UPDATE audit_log SET client_ip = '203.0.113.9' WHERE seq = 2",
    )
    .await;
    let report = audit::verify(&**client).await.expect("verify");
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("changed"),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn deleted_row_is_detected() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("d@example.com", PW).await;
    t.login("d@example.com", PW).await;
    t.post("/v1/auth/logout", &cookie, json!({})).await;
    tamper(&t, "DELETE FROM audit_log WHERE seq = 2").await;
    let client = t.plane.pool().get().await.expect("pool");
    let report = audit::verify(&**client).await.expect("verify");
    assert!(
        report.problems.iter().any(|p| p.contains("missing")),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn list_filters_paginates_and_isolates_accounts() {
    let t = TestPlane::start().await;
    let (alice, body) = t.signup("alice@example.com", PW).await;
    let alice_id = body["user"]["id"].as_str().expect("id").to_owned();
    for _ in 0..4 {
        t.login("alice@example.com", PW).await;
    }
    let (bob, _) = t.signup("bob@example.com", PW).await;

    let (status, page) = t.get("/v1/audit?limit=2", &alice).await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["event"], "user.logged_in");
    let before = page["next_before"].as_i64().expect("cursor");
    let (_, next) = t
        .get(&format!("/v1/audit?limit=10&before={before}"), &alice)
        .await;
    let rest = next["events"].as_array().expect("events");
    assert_eq!(rest.len(), 3, "5 rows in all: {next}");
    assert!(next["next_before"].is_null());
    assert_eq!(rest.last().expect("oldest")["event"], "account.created");

    let (_, filtered) = t.get("/v1/audit?action=account.created", &alice).await;
    assert_eq!(filtered["events"].as_array().map(Vec::len), Some(1));
    let (_, by_actor) = t.get(&format!("/v1/audit?actor={alice_id}"), &alice).await;
    assert_eq!(by_actor["events"].as_array().map(Vec::len), Some(5));
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (_, none) = t
        .get(
            &format!("/v1/audit?since={}", future.replace('+', "%2B")),
            &alice,
        )
        .await;
    assert_eq!(none["events"].as_array().map(Vec::len), Some(0));

    // Bob sees only his own account.
    let (_, bobs) = t.get("/v1/audit", &bob).await;
    let bob_events = bobs["events"].as_array().expect("events");
    assert_eq!(bob_events.len(), 1);
    assert_eq!(bob_events[0]["actor"]["email"], "bob@example.com");

    let (status, bad) = t.get("/v1/audit?limit=100000", &alice).await;
    assert_eq!((status, error_code(&bad)), (400, "invalid_limit"));
}

#[tokio::test]
async fn export_is_json_lines_in_the_siem_shape() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("e@example.com", PW).await;
    t.login("e@example.com", PW).await;
    let r = t
        .http
        .get(t.url("/v1/audit/export"))
        .header("cookie", &cookie)
        .header("user-agent", "Sensei-Test/1.0")
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    let text = r.text().await.expect("body");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2);
    let first = &lines[0];
    assert_eq!(first["event"], "account.created");
    assert_eq!(first["action"], "created");
    assert_eq!(first["result"], "success");
    assert_eq!(first["actor"]["type"], "user");
    assert_eq!(first["actor"]["email"], "e@example.com");
    assert_eq!(first["actor"]["ip"], "127.0.0.1");
    assert_eq!(first["resource"]["type"], "account");
    assert!(first["resource"]["id"].is_string());
    assert!(first["timestamp"].as_str().expect("ts").ends_with('Z'));
    assert!(first["metadata"].get("userAgent").is_some());
    assert_eq!(lines[1]["event"], "user.logged_in");
    assert_eq!(lines[1]["metadata"]["mfaUsed"], false);
}

#[tokio::test]
async fn concurrent_writers_keep_one_unbroken_chain() {
    let t = TestPlane::start().await;
    t.signup("busy@example.com", PW).await;
    let mut tasks = Vec::new();
    // As many parallel sign-ins as the account's throttle lets be in flight at once (each
    // reserves its place before its password is checked).
    let writers = sensei_control_plane::login_throttle::MAX_PER_ACCOUNT;
    for _ in 0..writers {
        let http = t.http.clone();
        let url = t.url("/v1/auth/login");
        tasks.push(tokio::spawn(async move {
            http.post(url)
                .json(&json!({"email": "busy@example.com", "password": PW}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("join").expect("request"), 200);
    }
    let client = t.plane.pool().get().await.expect("pool");
    let report = audit::verify(&**client).await.expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.rows as i64, writers + 1);
}
