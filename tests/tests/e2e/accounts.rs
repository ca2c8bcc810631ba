//! Signup, login, sessions, throttling, imported Django passwords.

use sensei_e2e::{error_code, session_cookie, TestPlane};
use serde_json::json;

const PW: &str = "correct horse battery";

#[tokio::test]
async fn signup_sets_a_hardened_cookie_and_audits() {
    let t = TestPlane::start().await;
    let r = t
        .http
        .post(t.url("/v1/auth/signup"))
        .json(&json!({"email": "owner@example.com", "password": PW, "account_name": "Acme"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
    let cookie = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("cookie")
        .to_owned();
    for flag in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(flag), "cookie lacks {flag}: {cookie}");
    }
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["user"]["role"], "owner");
    assert_eq!(body["account"]["name"], "Acme");
    assert_eq!(t.audit_actions().await, vec!["account.created"]);
    // The password is stored as Argon2id, never in clear.
    let stored: String = t
        .db()
        .await
        .query_one("SELECT password_hash FROM users", &[])
        .await
        .expect("row")
        .get(0);
    assert!(stored.starts_with("$argon2id$"));
    assert!(!stored.contains(PW));
}

#[tokio::test]
async fn bad_signups_are_refused_and_create_nothing() {
    let t = TestPlane::start().await;
    t.signup("taken@example.com", PW).await;
    let cases = [
        (
            json!({"email": "TAKEN@example.com", "password": PW, "account_name": "B"}),
            409,
            "email_taken",
        ),
        (
            json!({"email": "not-an-email", "password": PW, "account_name": "B"}),
            422,
            "invalid_email",
        ),
        (
            json!({"email": "b@example.com", "password": "short", "account_name": "B"}),
            422,
            "weak_password",
        ),
        (
            json!({"email": "b@example.com", "password": PW, "account_name": ""}),
            422,
            "invalid_account_name",
        ),
        (
            json!({"email": "b@example.com", "password": PW}),
            422,
            "invalid_field",
        ),
        (
            json!({"email": "b@example.com", "password": PW, "account_name": "B", "role": "owner"}),
            422,
            "invalid_field",
        ),
    ];
    for (body, status, code) in cases {
        let r = t
            .http
            .post(t.url("/v1/auth/signup"))
            .json(&body)
            .send()
            .await
            .expect("req");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(error_code(&v), code, "{body}: {v}");
    }
    let malformed = t
        .http
        .post(t.url("/v1/auth/signup"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .expect("req");
    assert_eq!(malformed.status(), 400);
    let v: serde_json::Value = malformed.json().await.expect("json");
    assert_eq!(error_code(&v), "malformed_json");
    let huge = t
        .http
        .post(t.url("/v1/auth/signup"))
        .header("content-type", "application/json")
        .body(format!("{{\"email\": \"{}\"}}", "a".repeat(200_000)))
        .send()
        .await
        .expect("req");
    assert_eq!(huge.status(), 413);
    let v: serde_json::Value = huge.json().await.expect("json");
    assert_eq!(error_code(&v), "body_too_large");
    let no_type = t
        .http
        .post(t.url("/v1/auth/signup"))
        .body("{}")
        .send()
        .await
        .expect("req");
    assert_eq!(no_type.status(), 415);
    let db = t.db().await;
    let accounts: i64 = db
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("q")
        .get(0);
    let users: i64 = db
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("q")
        .get(0);
    assert_eq!(
        (accounts, users),
        (1, 1),
        "a refused signup left rows behind"
    );
}

#[tokio::test]
async fn wrong_password_is_refused_and_audited_without_the_input() {
    let t = TestPlane::start().await;
    t.signup("alice@example.com", PW).await;
    for (email, password) in [
        ("alice@example.com", "wrong-password-123"),
        ("nobody@example.com", "another-guess-456"),
    ] {
        let r = t
            .http
            .post(t.url("/v1/auth/login"))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 401);
        assert!(session_cookie(&r).is_none());
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(error_code(&v), "invalid_credentials");
    }
    let db = t.db().await;
    let rows = db
        .query(
            "SELECT row_to_json(a)::text FROM audit_log a WHERE action = 'user.login_failed'",
            &[],
        )
        .await
        .expect("audit");
    assert_eq!(rows.len(), 2);
    for row in rows {
        let text: String = row.get(0);
        for secret in [
            "wrong-password-123",
            "another-guess-456",
            "nobody@example.com",
        ] {
            assert!(
                !text.contains(secret),
                "audit row holds the input {secret}: {text}"
            );
        }
        assert!(text.contains("input_hash"), "{text}");
    }
    // The right password still works afterwards.
    t.login("alice@example.com", PW).await;
}

#[tokio::test]
async fn repeated_failures_throttle_the_account() {
    let t = TestPlane::start().await;
    t.signup("target@example.com", PW).await;
    for _ in 0..sensei_control_plane::identity::login_throttle::MAX_PER_ACCOUNT {
        let r = t
            .http
            .post(t.url("/v1/auth/login"))
            .json(&json!({"email": "target@example.com", "password": "guess-guess-guess"}))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 401);
    }
    // Now even the right password is held back, with a clear reason and a retry time.
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": "target@example.com", "password": PW}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!(retry > 0 && retry <= 900, "retry-after {retry}");
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "too_many_attempts");
}

#[tokio::test]
async fn repeated_failures_throttle_the_client_address() {
    let t = TestPlane::start().await;
    for i in 0..sensei_control_plane::identity::login_throttle::MAX_PER_IP {
        let r = t
            .http
            .post(t.url("/v1/auth/login"))
            .json(
                &json!({"email": format!("spray{i}@example.com"), "password": "guess-guess-guess"}),
            )
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), 401);
    }
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": "spray-next@example.com", "password": "guess-guess-guess"}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn sessions_list_revoke_and_sign_out_everywhere() {
    let t = TestPlane::start().await;
    let (first, _) = t.signup("s@example.com", PW).await;
    let second = t.login("s@example.com", PW).await;
    let third = t.login("s@example.com", PW).await;

    let (status, body) = t.get("/v1/auth/sessions", &second).await;
    assert_eq!(status, 200);
    let sessions = body["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    for s in sessions {
        assert_eq!(s["ip"], "127.0.0.1");
        assert!(s["last_seen_at"].is_string());
        assert!(s["user_agent"].is_string());
    }
    // Sign out the first session from the second.
    let first_id = sessions
        .iter()
        .find(|s| s["current"] == false)
        .map(|s| s["id"].as_str().expect("id").to_owned())
        .expect("another session");
    let r = t
        .http
        .delete(t.url(&format!("/v1/auth/sessions/{first_id}")))
        .header("cookie", &second)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let survivors: Vec<u16> = [
        t.get("/v1/auth/sessions", &first).await.0,
        t.get("/v1/auth/sessions", &third).await.0,
    ]
    .to_vec();
    assert_eq!(
        survivors.iter().filter(|s| **s == 401).count(),
        1,
        "exactly one revoked"
    );
    // Deleting it again, or a random id, is a 404.
    let r = t
        .http
        .delete(t.url(&format!("/v1/auth/sessions/{first_id}")))
        .header("cookie", &second)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 404);

    let (status, _) = t
        .post("/v1/auth/sessions/sign-out-everywhere", &second, json!({}))
        .await;
    assert_eq!(status, 204);
    for cookie in [&first, &second, &third] {
        let (status, body) = t.get("/v1/auth/sessions", cookie).await;
        assert_eq!(status, 401);
        assert_eq!(error_code(&body), "unauthenticated");
    }
    let actions = t.audit_actions().await;
    assert!(actions.contains(&"session.revoked".to_owned()));
    assert!(actions.contains(&"session.revoked_all".to_owned()));
}

#[tokio::test]
async fn logout_ends_the_session_at_once() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("l@example.com", PW).await;
    assert_eq!(t.get("/v1/auth/sessions", &cookie).await.0, 200);
    let r = t
        .http
        .post(t.url("/v1/auth/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("logout");
    assert_eq!(r.status(), 204);
    let cleared = r
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(t.get("/v1/auth/sessions", &cookie).await.0, 401);
    assert!(t
        .audit_actions()
        .await
        .contains(&"user.logged_out".to_owned()));
}

#[tokio::test]
async fn idle_session_expires_after_fourteen_days() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("idle@example.com", PW).await;
    t.db()
        .await
        .execute(
            "UPDATE sessions SET last_seen_at = now() - interval '14 days 1 minute'",
            &[],
        )
        .await
        .expect("age the session");
    let (status, body) = t.get("/v1/auth/sessions", &cookie).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "unauthenticated");
}

#[tokio::test]
async fn forged_and_malformed_cookies_are_refused() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("f@example.com", PW).await;
    // Same session id, different secret.
    let (prefix, _) = cookie.rsplit_once('_').expect("token shape");
    let forged = format!("{prefix}_{}", "A".repeat(43));
    for bad in [forged.as_str(), "sensei_session=garbage", "sensei_session="] {
        let (status, _) = t.get("/v1/auth/sessions", bad).await;
        assert_eq!(status, 401, "{bad}");
    }
    let (status, body) = t.get("/v1/auth/sessions", "").await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "unauthenticated");
}

#[tokio::test]
async fn imported_django_password_logs_in_and_is_rehashed() {
    let t = TestPlane::start().await;
    let (_, body) = t.signup("owner@example.com", PW).await;
    let account: uuid::Uuid = body["account"]["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let django = "pbkdf2_sha256$600000$saltsaltsalt$s1MYnJJAkG2G9z7vb+OzChq8G2eos5f7v3L4UQJJCT0=";
    let db = t.db().await;
    db.execute(
        "INSERT INTO users (id, account_id, email, password_hash, role) VALUES ($1, $2, 'old@example.com', $3, 'developer')",
        &[&uuid::Uuid::new_v4(), &account, &django],
    )
    .await
    .expect("import user");
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": "old@example.com", "password": "django-imported-px"}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);
    t.login("old@example.com", "django-imported-pw").await;
    let stored: String = db
        .query_one(
            "SELECT password_hash FROM users WHERE email = 'old@example.com'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(stored.starts_with("$argon2id$"), "not rehashed: {stored}");
    t.login("old@example.com", "django-imported-pw").await;
}
