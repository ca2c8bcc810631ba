//! A page on another origin cannot make a signed-in browser change anything: every unsafe
//! route a cookie authenticates refuses a foreign `Origin` and a missing one, and a body that
//! is not JSON; API keys and clients without a cookie are unaffected.

use sensei_e2e::{error_code, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";
const EVIL: &str = "https://evil.example";

/// Every documented (method, path) that a cookie may call and that is not a read, with its
/// path parameters filled in by a random id (the check runs before any handler).
async fn unsafe_cookie_routes(t: &TestPlane) -> Vec<(reqwest::Method, String)> {
    let mut routes = Vec::new();
    for (method, path) in t.documented_routes().await {
        let method: reqwest::Method = method.parse().expect("method");
        let rule = sensei_control_plane::api::access::rule_for(&method, &path).expect("rule");
        if method == reqwest::Method::GET || rule == sensei_control_plane::api::access::Rule::Public
        {
            continue;
        }
        routes.push((
            method,
            path.replace("{id}", &uuid::Uuid::new_v4().to_string()),
        ));
    }
    routes
}

#[tokio::test]
async fn every_unsafe_cookie_route_refuses_a_foreign_origin_and_a_missing_one() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("csrf@example.com", PW).await;
    let foreign = sensei_e2e::api_client(t.plane.ca_pem(), EVIL);
    let bare = sensei_e2e::client_without_origin(t.plane.ca_pem());
    let routes = unsafe_cookie_routes(&t).await;
    assert!(routes.len() >= 25, "only {} routes found", routes.len());
    for (method, path) in &routes {
        for (who, client) in [("a foreign Origin", &foreign), ("no Origin", &bare)] {
            let r = client
                .request(method.clone(), t.url(path))
                .header("cookie", &cookie)
                .json(&json!({}))
                .send()
                .await
                .expect("request");
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (status, error_code(&body)),
                (403, "cross_site_request"),
                "{method} {path} with {who}: {body}"
            );
        }
    }
    println!(
        "{} unsafe cookie routes refuse foreign and missing origins",
        routes.len()
    );
    // Nothing happened: the session still works, no key, server or project was made.
    let (status, _) = t.get("/v1/auth/me", &cookie).await;
    assert_eq!(
        status, 200,
        "the session survived sign-out-everywhere and logout attempts"
    );
    let db = t.db().await;
    for table in ["api_keys", "servers", "projects", "deployments", "rollouts"] {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "{table} changed");
    }
}

#[tokio::test]
async fn a_text_plain_body_is_refused_even_from_the_right_origin() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("plain@example.com", PW).await;
    let (server, _) = t.create_agent_server(&cookie, "s", json!({})).await;
    let tokens = || async {
        t.db()
            .await
            .query_one("SELECT count(*) FROM enrollment_tokens", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let before = tokens().await;
    // What a form with enctype=text/plain, or fetch in no-cors mode, can send.
    let r = t
        .http
        .post(t.url(&format!("/v1/servers/{server}/enrollment-token")))
        .header("cookie", &cookie)
        .header("content-type", "text/plain")
        .body(r#"{"enrollment_ttl_seconds": 600}"#)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json");
    assert_eq!((status, error_code(&body)), (415, "unsupported_media_type"));
    let r = t
        .http
        .post(t.url(&format!("/v1/servers/{server}/enrollment-token")))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 415);
    assert_eq!(tokens().await, before, "no token was made");
    // The same request as JSON, from the plane's origin, works.
    let (status, body) = t
        .post(
            &format!("/v1/servers/{server}/enrollment-token"),
            &cookie,
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn same_origin_browsers_api_keys_and_originless_logins_pass() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("pass@example.com", PW).await;
    let bare = sensei_e2e::client_without_origin(t.plane.ca_pem());
    let foreign = sensei_e2e::api_client(t.plane.ca_pem(), EVIL);
    // A browser on the plane's own origin says so with Sec-Fetch-Site (which pages cannot set).
    let r = bare
        .post(t.url("/v1/api-keys"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"name": "ci", "scopes": ["projects:write"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 201);
    let key: Value = r.json().await.expect("json");
    let secret = key["secret"].as_str().expect("secret").to_owned();
    // A page cannot make a browser send Authorization: API keys pass from anywhere.
    let r = foreign
        .post(t.url("/v1/projects"))
        .bearer_auth(&secret)
        .json(
            &json!({"name": "p", "repo_url": "https://example.com/p.git", "deploy_path": "/srv/p"}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 201);
    // A sibling subdomain's page is same-site, not same-origin.
    let r = bare
        .post(t.url("/v1/projects"))
        .header("cookie", &cookie)
        .header("sec-fetch-site", "same-site")
        .json(
            &json!({"name": "q", "repo_url": "https://example.com/q.git", "deploy_path": "/srv/q"}),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);

    // Signing a visitor in to an account of another site's choosing is refused; a client
    // that names no origin (curl, the CLI) signs in.
    let login = json!({"email": "pass@example.com", "password": PW});
    let r = foreign
        .post(t.url("/v1/auth/login"))
        .json(&login)
        .send()
        .await
        .expect("login");
    let status = r.status().as_u16();
    let signed_in = sensei_e2e::session_cookie(&r).is_some();
    let body: Value = r.json().await.expect("json");
    assert_eq!((status, error_code(&body)), (403, "cross_site_request"));
    assert!(!signed_in, "no session cookie for a foreign page");
    let r = bare
        .post(t.url("/v1/auth/login"))
        .json(&login)
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
}
