//! API keys: shown once, stored hashed, bounded by scope, network and time.

use sensei_e2e::{error_code, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

async fn create_key(t: &TestPlane, cookie: &str, body: Value) -> (u16, Value) {
    t.post("/v1/api-keys", cookie, body).await
}

#[tokio::test]
async fn key_is_shown_once_stored_hashed_and_works_within_scope() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("k@example.com", PW).await;
    let (status, key) = create_key(
        &t,
        &cookie,
        json!({"name": "ci", "scopes": ["audit:read", "servers:read"]}),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().expect("secret").to_owned();
    assert!(secret.starts_with("sk_"));

    let (status, list) = t.get("/v1/api-keys", &cookie).await;
    assert_eq!(status, 200);
    assert_eq!(list["api_keys"].as_array().map(Vec::len), Some(1));
    assert!(
        list.to_string().find(&secret[20..]).is_none(),
        "list leaks the secret"
    );
    let row = t
        .db()
        .await
        .query_one("SELECT row_to_json(k)::text FROM api_keys k", &[])
        .await
        .expect("row");
    let text: String = row.get(0);
    assert!(
        !text.contains(&secret[20..]),
        "database holds the secret in clear"
    );

    let (status, page) = t.get_with_key("/v1/audit", &secret).await;
    assert_eq!(status, 200, "{page}");
    assert!(t
        .audit_actions()
        .await
        .contains(&"api_key.created".to_owned()));
}

#[tokio::test]
async fn key_outside_its_scope_is_refused() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("scope@example.com", PW).await;
    let (_, key) = create_key(
        &t,
        &cookie,
        json!({"name": "narrow", "scopes": ["servers:read"]}),
    )
    .await;
    let secret = key["secret"].as_str().expect("secret");
    let (status, body) = t.get_with_key("/v1/audit", secret).await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "insufficient_scope");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("audit:read"));
}

#[tokio::test]
async fn key_from_outside_its_allowlist_is_refused() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("ip@example.com", PW).await;
    let (status, key) = create_key(
        &t,
        &cookie,
        json!({"name": "office", "scopes": ["audit:read"], "ip_allowlist": ["10.0.0.0/8", "192.0.2.7"]}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(key["ip_allowlist"], json!(["10.0.0.0/8", "192.0.2.7/32"]));
    let (status, body) = t
        .get_with_key("/v1/audit", key["secret"].as_str().expect("s"))
        .await;
    assert_eq!(status, 403);
    assert_eq!(error_code(&body), "ip_not_allowed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("127.0.0.1"));

    let (_, local) = create_key(
        &t,
        &cookie,
        json!({"name": "local", "scopes": ["audit:read"], "ip_allowlist": ["127.0.0.0/8"]}),
    )
    .await;
    assert_eq!(
        t.get_with_key("/v1/audit", local["secret"].as_str().expect("s"))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn expired_and_revoked_keys_are_refused() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("exp@example.com", PW).await;
    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (_, key) = create_key(
        &t,
        &cookie,
        json!({"name": "temp", "scopes": ["audit:read"], "expires_at": soon}),
    )
    .await;
    let secret = key["secret"].as_str().expect("s").to_owned();
    assert_eq!(t.get_with_key("/v1/audit", &secret).await.0, 200);
    t.db()
        .await
        .execute(
            "UPDATE api_keys SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .expect("expire");
    let (status, body) = t.get_with_key("/v1/audit", &secret).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "api_key_expired");

    let (_, other) = create_key(
        &t,
        &cookie,
        json!({"name": "gone", "scopes": ["audit:read"]}),
    )
    .await;
    let other_secret = other["secret"].as_str().expect("s");
    let id = other["id"].as_str().expect("id");
    let r = t
        .http
        .delete(t.url(&format!("/v1/api-keys/{id}")))
        .header("cookie", &cookie)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    let (status, body) = t.get_with_key("/v1/audit", other_secret).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "unauthenticated");
    assert!(t
        .audit_actions()
        .await
        .contains(&"api_key.revoked".to_owned()));
    // A garbage bearer token gets the same clear refusal.
    assert_eq!(t.get_with_key("/v1/audit", "sk_nonsense").await.0, 401);
}

#[tokio::test]
async fn invalid_key_requests_are_refused_and_create_nothing() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("inv@example.com", PW).await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    for (body, status, code) in [
        (
            json!({"name": "x", "scopes": ["servers:admin"]}),
            422,
            "invalid_scopes",
        ),
        (json!({"name": "x", "scopes": []}), 422, "invalid_scopes"),
        (
            json!({"name": "x", "scopes": ["audit:read"], "ip_allowlist": ["10.0.0.0/33"]}),
            422,
            "invalid_ip_allowlist",
        ),
        (
            json!({"name": "x", "scopes": ["audit:read"], "expires_at": past}),
            422,
            "invalid_expiry",
        ),
        (
            json!({"name": "", "scopes": ["audit:read"]}),
            422,
            "invalid_name",
        ),
    ] {
        let (s, v) = create_key(&t, &cookie, body.clone()).await;
        assert_eq!((s, error_code(&v)), (status, code), "{body}");
    }
    let n: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn keys_cannot_exceed_their_creators_role_or_manage_keys() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("role@example.com", PW).await;
    let (_, admin_key) = create_key(
        &t,
        &cookie,
        json!({"name": "all", "scopes": ["audit:read", "servers:write"]}),
    )
    .await;
    let secret = admin_key["secret"].as_str().expect("s").to_owned();
    // An API key cannot create keys, whatever its scopes.
    let r = t
        .http
        .post(t.url("/v1/api-keys"))
        .bearer_auth(&secret)
        .json(&json!({"name": "child", "scopes": ["audit:read"]}))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "session_required");
    // Demote the creator to viewer: their new keys cannot carry write scopes.
    t.db()
        .await
        .execute("UPDATE users SET role = 'admin'", &[])
        .await
        .expect("demote");
    let (status, v) = create_key(
        &t,
        &cookie,
        json!({"name": "w", "scopes": ["servers:write"]}),
    )
    .await;
    assert_eq!(status, 201, "admin may still grant servers:write: {v}");
    t.db()
        .await
        .execute("UPDATE users SET role = 'viewer'", &[])
        .await
        .expect("demote");
    let (status, v) = t.get("/v1/api-keys", &cookie).await;
    assert_eq!((status, error_code(&v)), (403, "insufficient_scope"));
    // The viewer's existing key keeps only what a viewer may do.
    assert_eq!(t.get_with_key("/v1/audit", &secret).await.0, 200);
}
