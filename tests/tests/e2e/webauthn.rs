//! Security keys (WebAuthn) as a second factor, in real Chromium with its virtual
//! authenticator (Chrome DevTools Protocol `WebAuthn.*` through chromedriver): registration
//! from Settings → Security, sign-in with password and key, a removed key and a cloned key
//! refused, recovery codes; and the API's refusals of stale and foreign challenges.

use sensei_e2e::browser::Browser;
use sensei_e2e::TestPlane;
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

/// A control plane whose public URL is `https://localhost:PORT`: a relying party needs a DNS
/// name, and the browser reaches the plane by that name.
async fn plane() -> TestPlane {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("address")
        .port();
    TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        move |o| {
            o.api_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            o.public_url = Some(format!("https://localhost:{port}"));
        },
    )
    .await
}

/// Gives the browser's tab a USB security key that verifies its user and answers at once.
async fn virtual_key(b: &Browser) -> String {
    b.cdp("WebAuthn.enable", json!({})).await;
    let added = b
        .cdp(
            "WebAuthn.addVirtualAuthenticator",
            json!({"options": {
                "protocol": "ctap2",
                "transport": "usb",
                "hasResidentKey": true,
                "hasUserVerification": true,
                "isUserVerified": true,
                "automaticPresenceSimulation": true,
            }}),
        )
        .await;
    added["authenticatorId"]
        .as_str()
        .expect("an authenticator id")
        .to_owned()
}

/// The credentials the virtual authenticator holds (with their private keys and counters).
async fn credentials(b: &Browser, authenticator: &str) -> Vec<Value> {
    b.cdp(
        "WebAuthn.getCredentials",
        json!({"authenticatorId": authenticator}),
    )
    .await["credentials"]
        .as_array()
        .expect("credentials")
        .clone()
}

async fn password_step(b: &Browser, email: &str) {
    b.open("/ui/sign-in").await;
    b.fill("#email", email).await;
    b.fill("#password", PW).await;
    b.click("#sign-in").await;
}

/// Registers a key named `name` on the security page; answers the recovery codes shown when
/// it is the first second factor.
async fn register_key(b: &Browser, name: &str) -> Vec<String> {
    b.open("/ui/settings/security").await;
    b.fill("#key-name", name).await;
    b.click("#register-key").await;
    b.wait_for("#recovery-codes li, #key-error:not([hidden])")
        .await;
    if b.has("#key-error:not([hidden])").await {
        let error = b.wait_for("#key-error").await.text().await.expect("text");
        panic!("registration failed in the browser: {error}");
    }
    let mut codes = Vec::new();
    for li in b
        .driver
        .find_all(thirtyfour::By::Css("#recovery-codes li"))
        .await
        .expect("codes")
    {
        codes.push(li.text().await.expect("code"));
    }
    codes
}

async fn audit_rows(t: &TestPlane, action: &str) -> Vec<(String, Value)> {
    t.db()
        .await
        .query(
            "SELECT result, metadata FROM audit_log WHERE action = $1 ORDER BY id",
            &[&action],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn key_count(t: &TestPlane) -> i64 {
    t.db()
        .await
        .query_one("SELECT count(*) FROM webauthn_credentials", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn a_key_registered_in_settings_signs_in_and_a_removed_key_is_refused() {
    let t = plane().await;
    let email = "keys@example.com";
    let (owner, _) = t.signup(email, PW).await;
    let b = Browser::start(&t.base).await;
    let authenticator = virtual_key(&b).await;
    password_step(&b, email).await;
    b.wait_path("/ui/servers").await;

    let codes = register_key(&b, "Desk key").await;
    assert_eq!(codes.len(), 10, "{codes:?}");
    b.open("/ui/settings/security").await;
    b.wait_text("#security-keys", |text| text.contains("Desk key"))
        .await;
    assert_eq!(credentials(&b, &authenticator).await.len(), 1);
    let (_, me) = t.get("/v1/auth/me", &owner).await;
    assert_eq!(me["mfa_enabled"], true, "{me}");
    assert_eq!(me["totp_enabled"], false, "{me}");
    let registered = audit_rows(&t, "webauthn.registered").await;
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].1["name"], "Desk key");

    // Signed out, the password alone is not enough; the key is.
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    password_step(&b, email).await;
    b.click("#use-key").await;
    b.wait_path("/ui/servers").await;
    let logins = audit_rows(&t, "user.logged_in").await;
    let last = &logins.last().expect("a sign-in").1;
    assert_eq!(last["second_factor"], "webauthn", "{last}");
    assert_eq!(last["mfaUsed"], true, "{last}");
    let (_, list) = t
        .get("/v1/auth/mfa/webauthn/keys", &b.session_cookie().await)
        .await;
    let key_id = list["keys"][0]["id"].as_str().expect("key id").to_owned();
    assert!(list["keys"][0]["last_used_at"].is_string(), "{list}");

    // Over the API the password alone is refused too; a recovery code still signs in.
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": PW}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "mfa_required", "{body}");
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": PW, "recovery_code": codes[0]}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let recovered = sensei_e2e::session_cookie(&r).expect("cookie");

    // Another member cannot see, rename or remove this user's key, whatever their role.
    let (_, inv) = t
        .post(
            "/v1/invitations",
            &recovered,
            json!({"email": "viewer@example.com", "role": "viewer"}),
        )
        .await;
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": inv["token"], "password": PW}))
        .send()
        .await
        .expect("accept");
    assert_eq!(r.status(), 201);
    let viewer = sensei_e2e::session_cookie(&r).expect("viewer cookie");
    let (_, theirs) = t.get("/v1/auth/mfa/webauthn/keys", &viewer).await;
    assert_eq!(theirs["keys"], json!([]), "{theirs}");
    let path = format!("/v1/auth/mfa/webauthn/keys/{key_id}");
    for method in [reqwest::Method::DELETE, reqwest::Method::PATCH] {
        let r = t
            .http
            .request(method.clone(), t.url(&path))
            .header("cookie", &viewer)
            .json(&json!({"name": "mine now"}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 404, "{method}");
    }
    let (_, keys_now) = t.get("/v1/auth/mfa/webauthn/keys", &recovered).await;
    assert_eq!(keys_now["keys"][0]["name"], "Desk key", "{keys_now}");

    // Sign-in challenges belong to the user whose password asked for them, once.
    let key_challenge = |who: &'static str| {
        let t = &t;
        async move {
            let r = t
                .http
                .post(t.url("/v1/auth/login/webauthn"))
                .json(&json!({"email": who, "password": PW}))
                .send()
                .await
                .expect("options");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("json"))
        }
    };
    let login_with = |who: &'static str, challenge: Value| {
        let t = &t;
        async move {
            t.post(
                "/v1/auth/login",
                "",
                json!({"email": who, "password": PW,
                       "webauthn": {"challenge_id": challenge, "credential": {"id": "AAAA"}}}),
            )
            .await
        }
    };
    let (status, body) = key_challenge("viewer@example.com").await;
    assert_eq!(status, 409, "the viewer has no key yet: {body}");
    assert_eq!(body["error"]["code"], "no_security_keys");
    let (status, owners) = key_challenge(email).await;
    assert_eq!(status, 200, "{owners}");
    assert_eq!(owners["totp_enabled"], false);
    assert_eq!(
        owners["options"]["publicKey"]["allowCredentials"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{owners}"
    );
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    password_step(&b, "viewer@example.com").await;
    b.wait_path("/ui/servers").await;
    register_key(&b, "Viewer key").await;
    let (status, body) = login_with("viewer@example.com", owners["challenge_id"].clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["error"]["code"], "invalid_webauthn_challenge",
        "{body}"
    );
    let (_, viewers) = key_challenge("viewer@example.com").await;
    let (status, body) = login_with("viewer@example.com", viewers["challenge_id"].clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "webauthn_refused", "{body}");
    let (status, body) = login_with("viewer@example.com", viewers["challenge_id"].clone()).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        body["error"]["code"], "invalid_webauthn_challenge",
        "{body}"
    );

    // With TOTP on as well, the key's removal leaves a second factor to insist on.
    let (status, enrolled) = t.post("/v1/auth/mfa/totp", &recovered, json!({})).await;
    assert_eq!(status, 201, "{enrolled}");
    let secret = sensei_e2e::base32_decode(enrolled["secret"].as_str().expect("secret"));
    let (status, confirmed) = t
        .post(
            "/v1/auth/mfa/totp/confirm",
            &recovered,
            json!({"code": sensei_e2e::totp_code(&secret, 0)}),
        )
        .await;
    assert_eq!(status, 200, "{confirmed}");

    // An account that requires security keys refuses TOTP to a member who has a key, keeps
    // their last key, and sends a member without one to register one.
    let (status, account) = t
        .patch("/v1/account", &recovered, json!({"require_webauthn": true}))
        .await;
    assert_eq!(status, 200, "{account}");
    assert_eq!(account["require_webauthn"], true, "{account}");
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": email, "password": PW,
                   "totp_code": sensei_e2e::totp_code(&secret, 1)}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "webauthn_required", "{body}");
    // Nor in the recovery code's field: only a real recovery code is taken there.
    let sessions = t.count("SELECT count(*) FROM sessions").await;
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": email, "password": PW,
                   "recovery_code": sensei_e2e::totp_code(&secret, 1)}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_mfa_code", "{body}");
    assert_eq!(t.count("SELECT count(*) FROM sessions").await, sessions);
    let r = t
        .http
        .delete(t.url(&path))
        .header("cookie", &recovered)
        .send()
        .await
        .expect("remove");
    assert_eq!(
        r.status(),
        409,
        "the last key stays while keys are required"
    );
    let (_, inv) = t
        .post(
            "/v1/invitations",
            &recovered,
            json!({"email": "plain@example.com", "role": "operator"}),
        )
        .await;
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": inv["token"], "password": PW}))
        .send()
        .await
        .expect("accept");
    assert_eq!(r.status(), 201);
    let plain = sensei_e2e::session_cookie(&r).expect("cookie");
    let (_, me) = t.get("/v1/auth/me", &plain).await;
    assert_eq!(me["mfa_setup_required"], true, "{me}");
    let (status, body) = t.get("/v1/servers", &plain).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "mfa_setup_required");
    let (_, me) = t.get("/v1/auth/me", &viewer).await;
    assert_eq!(
        me["mfa_setup_required"], false,
        "the viewer has a key: {me}"
    );
    let (status, _) = t
        .patch(
            "/v1/account",
            &recovered,
            json!({"require_webauthn": false}),
        )
        .await;
    assert_eq!(status, 200);

    // A key removed while a sign-in waits for it is refused when it answers.
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    password_step(&b, email).await;
    b.wait_for("#use-key").await;
    let r = t
        .http
        .delete(t.url(&path))
        .header("cookie", &recovered)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 204);
    b.click("#use-key").await;
    b.wait_text("#sign-in-error", |text| {
        text.contains("not one of this user's keys")
    })
    .await;
    assert!(b.driver.get_named_cookie("sensei_session").await.is_err());
    assert!(!b.has("#use-key").await, "no key is left to offer");
    assert!(b.has("#code").await, "the code form is");
    let removed = audit_rows(&t, "webauthn.removed").await;
    assert_eq!(removed.len(), 1);
    let failed = audit_rows(&t, "user.login_failed").await;
    assert_eq!(
        failed.last().expect("a failure").1["failed_factor"],
        "webauthn"
    );
    let (_, left) = t.get("/v1/auth/mfa/webauthn/keys", &recovered).await;
    assert_eq!(left["keys"], json!([]), "{left}");
    assert_eq!(key_count(&t).await, 1, "the viewer's key stays");
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn a_cloned_key_with_a_lower_counter_is_refused_and_audited() {
    let t = plane().await;
    let email = "clone@example.com";
    t.signup(email, PW).await;
    let b = Browser::start(&t.base).await;
    let authenticator = virtual_key(&b).await;
    password_step(&b, email).await;
    b.wait_path("/ui/servers").await;
    let codes = register_key(&b, "Travel key").await;

    // A copy taken now, private key and counter included, as an attacker would take it.
    let copy = credentials(&b, &authenticator).await.remove(0);
    b.open("/ui/servers").await;
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    password_step(&b, email).await;
    b.click("#use-key").await;
    b.wait_path("/ui/servers").await;
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    let used = credentials(&b, &authenticator).await.remove(0);
    assert!(
        used["signCount"].as_u64() > copy["signCount"].as_u64(),
        "{used} {copy}"
    );

    // The authenticator now holds the copy: its counter is behind the one stored.
    b.cdp(
        "WebAuthn.removeCredential",
        json!({"authenticatorId": authenticator, "credentialId": copy["credentialId"]}),
    )
    .await;
    b.cdp(
        "WebAuthn.addCredential",
        json!({"authenticatorId": authenticator, "credential": copy}),
    )
    .await;
    password_step(&b, email).await;
    b.click("#use-key").await;
    b.wait_text("#sign-in-error", |text| text.contains("counter"))
        .await;
    assert!(b.driver.get_named_cookie("sensei_session").await.is_err());
    let suspected = audit_rows(&t, "webauthn.clone_suspected").await;
    assert_eq!(suspected.len(), 1, "{suspected:?}");
    assert_eq!(suspected[0].0, "failure");
    assert!(
        suspected[0].1["presented_counter"].as_u64() <= suspected[0].1["stored_counter"].as_u64(),
        "{:?}",
        suspected[0]
    );

    // A recovery code still signs in; the key is then renamed and removed from Settings.
    b.click("input[name='code_kind'][value='recovery']").await;
    b.fill("#code", &codes[1]).await;
    b.click("#verify").await;
    b.wait_path("/ui/servers").await;
    b.open("/ui/settings/security").await;
    b.fill("#security-keys input[name='name']", "Old travel key")
        .await;
    b.click("#security-keys button[type='submit']").await;
    b.wait_text(".notice", |text| text.contains("renamed"))
        .await;
    b.wait_text("#security-keys", |text| text.contains("Old travel key"))
        .await;
    b.click("#security-keys a.danger").await;
    b.wait_text("main h1", |text| text.contains("Old travel key"))
        .await;
    b.click("#confirm-remove-key").await;
    b.wait_text(".notice", |text| text.contains("removed"))
        .await;
    assert!(b.has("#keys-empty").await);
    assert_eq!(key_count(&t).await, 0);
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn stale_and_foreign_registration_challenges_are_refused() {
    let t = plane().await;
    let (owner, _) = t.signup("owner@example.com", PW).await;
    let (other, _) = t.signup("other@example.com", PW).await;
    // A session signed in long ago (a stolen cookie, say) registers no key and removes none.
    t.db()
        .await
        .execute(
            "UPDATE sessions SET created_at = now() - interval '1 hour' \
             WHERE user_id = (SELECT id FROM users WHERE email = 'other@example.com')",
            &[],
        )
        .await
        .expect("age the session");
    let (status, body) = t
        .post("/v1/auth/mfa/webauthn/registrations", &other, json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("recent_sign_in_required")),
        "{body}"
    );
    let r = t
        .http
        .delete(t.url(&format!(
            "/v1/auth/mfa/webauthn/keys/{}",
            uuid::Uuid::new_v4()
        )))
        .header("cookie", &other)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 403);
    let other = t.login("other@example.com", PW).await;
    let (status, ceremony) = t
        .post("/v1/auth/mfa/webauthn/registrations", &owner, json!({}))
        .await;
    assert_eq!(status, 201, "{ceremony}");
    let options = &ceremony["options"]["publicKey"];
    assert_eq!(options["rp"]["id"], "localhost", "{options}");
    assert!(options["challenge"].as_str().is_some_and(|c| c.len() >= 22));
    let challenge = ceremony["challenge_id"].clone();
    let finish = |cookie: &str, challenge: Value| {
        let body = json!({
            "challenge_id": challenge,
            "name": "forged",
            "credential": {
                "id": "AAAA", "rawId": "AAAA", "type": "public-key",
                "response": {"attestationObject": "AAAA", "clientDataJSON": "AAAA"},
            },
        });
        let cookie = cookie.to_owned();
        let t = &t;
        async move { t.post("/v1/auth/mfa/webauthn/keys", &cookie, body).await }
    };

    // Another user's challenge is not theirs to finish (and stays the owner's).
    let (status, body) = finish(&other, challenge.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_webauthn_challenge");
    // The owner's own answer that does not verify is refused, and spends the challenge.
    let (status, body) = finish(&owner, challenge.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "webauthn_refused");
    let (status, body) = finish(&owner, challenge).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_webauthn_challenge");

    // An expired challenge, and one from another session of the same user.
    let (_, fresh) = t
        .post("/v1/auth/mfa/webauthn/registrations", &owner, json!({}))
        .await;
    t.db()
        .await
        .execute(
            "UPDATE webauthn_ceremonies SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[&fresh["challenge_id"]
                .as_str()
                .expect("id")
                .parse::<uuid::Uuid>()
                .expect("uuid")],
        )
        .await
        .expect("expire");
    let (status, body) = finish(&owner, fresh["challenge_id"].clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_webauthn_challenge");
    let (_, fresh) = t
        .post("/v1/auth/mfa/webauthn/registrations", &owner, json!({}))
        .await;
    let second_session = t.login("owner@example.com", PW).await;
    let (status, body) = finish(&second_session, fresh["challenge_id"].clone()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_webauthn_challenge");

    // Names are bounded; nothing was stored by any of this.
    let (_, fresh) = t
        .post("/v1/auth/mfa/webauthn/registrations", &owner, json!({}))
        .await;
    let (status, body) = t
        .post(
            "/v1/auth/mfa/webauthn/keys",
            &owner,
            json!({"challenge_id": fresh["challenge_id"], "name": "x".repeat(65), "credential": {}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(key_count(&t).await, 0);
    assert!(audit_rows(&t, "webauthn.registered").await.is_empty());
}

#[tokio::test]
async fn keys_need_a_public_url_with_a_dns_name() {
    // The default test plane's public URL is https://127.0.0.1:PORT.
    let t = TestPlane::start().await;
    let (owner, _) = t.signup("ip@example.com", PW).await;
    let (status, body) = t
        .post("/v1/auth/mfa/webauthn/registrations", &owner, json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "webauthn_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--public-url")),
        "{body}"
    );
}

#[tokio::test]
async fn key_forms_need_the_dashboards_origin_and_form_token() {
    let t = plane().await;
    let (owner, _) = t.signup("forms@example.com", PW).await;
    let client = sensei_e2e::client_without_origin(t.plane.ca_pem());
    let html = client
        .get(t.url("/ui/settings/security"))
        .header("cookie", &owner)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(html.contains("id=\"register-key-form\""), "{html}");
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).expect("a form token") + marker.len();
    let token = &html[at..at + html[at..].find('"').expect("end")];
    let ceremonies = || async {
        t.db()
            .await
            .query_one("SELECT count(*) FROM webauthn_ceremonies", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let own = t.plane.public_url().to_owned();
    let options = |origin: &'static str, csrf: String| {
        let (client, t, own) = (&client, &t, own.clone());
        let owner = owner.clone();
        async move {
            let origin = if origin.is_empty() {
                own
            } else {
                origin.to_owned()
            };
            let r = client
                .post(t.url("/ui/settings/security/keys/options"))
                .header("cookie", owner)
                .header("origin", origin)
                .form(&[("csrf", csrf)])
                .send()
                .await
                .expect("options");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, body) = options("https://evil.example", token.to_owned()).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = options("", "forged".into()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].is_string(), "{body}");
    assert_eq!(ceremonies().await, 0, "nothing was started");
    let (status, body) = options("", token.to_owned()).await;
    assert_eq!(status, 201, "{body}");
    assert!(
        body["options"]["publicKey"]["challenge"].is_string(),
        "{body}"
    );
    assert_eq!(ceremonies().await, 1);

    // Removing someone else's (or no) key from the dashboard finds nothing to remove.
    let r = client
        .post(t.url(&format!(
            "/ui/settings/security/keys/{}/remove",
            uuid::Uuid::new_v4()
        )))
        .header("cookie", &owner)
        .header("origin", t.plane.public_url())
        .form(&[("csrf", token)])
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 404);
}
