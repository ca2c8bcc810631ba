//! The audit log: append-only in the database, tamper-evident, filtered and exported.

use sensei_control_plane::audit;
use sensei_e2e::{error_code, TestPlane};
use serde_json::json;

const PW: &str = "correct horse battery";

#[tokio::test]
async fn the_application_role_cannot_rewrite_the_audit_log() {
    let t = TestPlane::start().await;
    t.signup("a@example.com", PW).await;
    // Through the control plane's own pool: the role the application serves as.
    let client = t.plane.pool().get().await.expect("pool");
    let role: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("role")
        .get(0);
    assert_eq!(role, sensei_e2e::APP_ROLE);
    let newest: (i64, Vec<u8>) = {
        let r = client
            .query_one(
                "SELECT seq, hash FROM audit_log ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .expect("newest");
        (r.get(0), r.get(1))
    };
    let chain: uuid::Uuid = client
        .query_one("SELECT chain_id FROM audit_log LIMIT 1", &[])
        .await
        .expect("chain")
        .get(0);
    let checkpoint = format!(
        "INSERT INTO audit_checkpoints (chain_id, through_seq, through_hash, through_at, rows_expired) \
         VALUES ('{chain}', {}, '\\x{}', now(), 1)",
        newest.0,
        hex::encode(&newest.1)
    );
    for sql in [
        "UPDATE audit_log SET result = 'failure'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
        "ALTER TABLE audit_log ADD COLUMN note text",
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update",
        "DROP TRIGGER audit_log_expire_only ON audit_log",
        "CREATE OR REPLACE FUNCTION audit_retention(chain uuid) RETURNS interval \
         LANGUAGE sql AS $$ SELECT interval '0' $$",
        "CREATE OR REPLACE FUNCTION audit_log_expire_only() RETURNS trigger \
         LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
        "DELETE FROM audit_checkpoints",
        &checkpoint,
        "SELECT audit_expire_through((SELECT chain_id FROM audit_log LIMIT 1), \
         (SELECT max(seq) FROM audit_log))",
        "SET session_replication_role = replica",
        "CREATE FUNCTION now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'infinity'::timestamptz $$",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        let db = err.as_db_error().expect("a database error");
        assert!(
            db.code() == &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
            "{sql}: {} {}",
            db.code().code(),
            db.message()
        );
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
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn an_owner_who_rewrites_a_row_and_recomputes_plain_hashes_is_caught() {
    use sha2::{Digest, Sha256};
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("r@example.com", PW).await;
    t.login("r@example.com", PW).await;
    t.post("/v1/auth/logout", &cookie, json!({})).await;
    // The database owner rewrites seq 2 and recomputes every later link the way an unkeyed
    // chain would be (SHA-256 of the previous hash and the row), marking them unkeyed.
    let db = t.db().await;
    let rows = db
        .query(
            &format!("SELECT {} FROM audit_log ORDER BY seq", audit::COLUMNS),
            &[],
        )
        .await
        .expect("rows");
    let mut records: Vec<_> = rows.iter().map(audit::AuditRecord::from_row).collect();
    records[1].client_ip = Some("198.51.100.7".into());
    let mut prev = records[0].hash.clone();
    for record in records.iter_mut().skip(1) {
        record.prev_hash = prev.clone();
        let canonical = json!({
            "chain_id": record.chain_id, "seq": record.seq, "account_id": record.account_id,
            "at": record.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "actor_type": record.actor_type, "actor_id": record.actor_id,
            "actor_email": record.actor_email, "client_ip": record.client_ip,
            "user_agent": record.user_agent, "action": record.action,
            "target_type": record.target_type, "target_id": record.target_id,
            "result": record.result, "metadata": record.metadata,
        });
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(serde_json::to_vec(&canonical).expect("json"));
        record.hash = h.finalize().to_vec();
        prev = record.hash.clone();
        db.batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; \
             UPDATE audit_log SET client_ip = {}, prev_hash = '\\x{}', hash = '\\x{}', key_id = NULL \
             WHERE id = {}; COMMIT;",
            record
                .client_ip
                .as_deref()
                .map(|ip| format!("'{ip}'"))
                .unwrap_or("NULL".into()),
            hex::encode(&record.prev_hash),
            hex::encode(&record.hash),
            record.id
        ))
        .await
        .expect("rewrite");
    }
    let report = audit::verify(&db, t.keys.audit_keys())
        .await
        .expect("verify");
    let first_rewritten = format!("row {} (seq 2)", records[1].id);
    assert!(
        report
            .problems
            .first()
            .is_some_and(|p| p.contains(&first_rewritten)),
        "{:?}",
        report.problems
    );
    // Keeping the key ids instead fails the HMAC of the very same row.
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         UPDATE audit_log SET key_id = '{}' WHERE seq > 1; COMMIT;",
        t.keys.audit_keys().current_id()
    ))
    .await
    .expect("rewrite key ids");
    let report = audit::verify(&db, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(
        report.problems.first().is_some_and(
            |p| p.contains(&first_rewritten) && p.contains("changed after it was written")
        ),
        "{:?}",
        report.problems
    );
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
    let clean = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!(clean.rows, 3);

    tamper(
        &t,
        "UPDATE audit_log SET client_ip = '203.0.113.9' WHERE seq = 2",
    )
    .await;
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
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
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
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
    let writers = sensei_control_plane::identity::login_throttle::MAX_PER_ACCOUNT;
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
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.rows as i64, writers + 1);
}
