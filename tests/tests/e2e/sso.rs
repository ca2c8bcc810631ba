//! Single sign-on against a real OpenID provider: the certified `oidc-provider` package run by
//! Node.js over HTTPS on loopback (tests/node/oidc-provider.mjs), signed in through in real
//! Chromium. The attacks go through the provider itself, as a compromised provider would send
//! them: ID tokens for another audience, expired, signed with a foreign key, or replayed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sensei_e2e::browser::Browser;
use sensei_e2e::{error_code, open_tempdir, session_cookie, totp_code, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";
const CLIENT_ID: &str = "sensei";
const CLIENT_SECRET: &str = "a-client-secret-only-the-provider-knows";

/// The provider process, killed when dropped.
struct OidcProvider {
    issuer: String,
    ca_pem: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OidcProvider {
    /// Starts the provider with the control plane of `t` as its one client.
    fn start(t: &TestPlane) -> Self {
        let node_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node");
        assert!(
            node_dir.join("node_modules/oidc-provider").exists(),
            "oidc-provider is not installed: run `npm ci --prefix tests/node` (./test does)"
        );
        let dir = open_tempdir();
        let ca =
            sensei_certs::CertificateAuthority::generate("Test identity provider CA").expect("CA");
        let issued = ca
            .issue_server_certificate(&["127.0.0.1".to_owned()], time::Duration::days(1))
            .expect("certificate");
        std::fs::write(dir.path().join("cert.pem"), &issued.cert_pem).expect("cert");
        std::fs::write(dir.path().join("key.pem"), &issued.key_pem).expect("key");
        let port = sensei_e2e::free_port();
        let log = dir.path().join("provider.log");
        let mut child = Command::new("node")
            .arg(node_dir.join("oidc-provider.mjs"))
            .current_dir(&node_dir)
            .env("PORT", port.to_string())
            .env("CERT", dir.path().join("cert.pem"))
            .env("KEY", dir.path().join("key.pem"))
            .env("CLIENT_ID", CLIENT_ID)
            .env("CLIENT_SECRET", CLIENT_SECRET)
            .env(
                "REDIRECT_URI",
                format!("{}/ui/sso/callback/acme", t.plane.public_url()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("node (./test installs nodejs)");
        // The script says when it listens: its first line.
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("provider output");
        // The rest of its output (notices) is drained: a closed pipe would end the provider.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        assert!(
            line.starts_with("listening "),
            "the provider did not start: {line}{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            issuer: format!("https://127.0.0.1:{port}"),
            ca_pem: ca.cert_pem().to_owned(),
            child,
            _dir: dir,
        }
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) {
        let tls = sensei_certs::tls::sink_client_config(&self.ca_pem).expect("tls");
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()
            .expect("client");
        let r = client
            .post(format!("{}{path}", self.issuer))
            .form(form)
            .send()
            .await
            .expect("provider control");
        assert_eq!(r.status(), 204);
    }

    /// The next ID token the provider issues is tampered with as `mode` says.
    async fn tamper(&self, mode: &str) {
        self.post("/_test/tamper", &[("mode", mode)]).await;
    }

    /// The provider signs with a new key from now on, published in its JWKS.
    async fn rotate_keys(&self) {
        self.post("/_test/rotate", &[]).await;
    }

    fn sso_settings(&self, extra: Value) -> Value {
        let mut body = json!({
            "slug": "acme",
            "display_name": "Acme Login",
            "issuer": self.issuer,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "scopes": ["openid", "email", "groups"],
            "allowed_domains": ["acme.test"],
            "default_role": "developer",
            "role_claim": "groups",
            "role_map": {"admins": "admin"},
            "ca_pem": self.ca_pem,
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

/// Signs up an owner and configures the provider for the account; answers the owner's cookie.
async fn account_with_sso(t: &TestPlane, idp: &OidcProvider, extra: Value) -> String {
    let (owner, _) = t.signup("owner@acme.test", PW).await;
    let r = t
        .http
        .put(t.url("/v1/account/sso"))
        .header("cookie", &owner)
        .json(&idp.sso_settings(extra))
        .send()
        .await
        .expect("put");
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    owner
}

/// From the sign-in page through the provider (its login form when it asks) and back; the
/// browser then shows the dashboard or the refusal.
async fn sign_in_through_provider(b: &Browser, idp: &OidcProvider, login: &str) {
    b.open("/ui/sign-in").await;
    b.fill("#org", "acme").await;
    b.click("#sso-continue").await;
    b.wait_text("#sso-start", |t| t == "Sign in with Acme Login")
        .await;
    b.click("#sso-start").await;
    // The provider asks who signs in unless it already knows this browser.
    let deadline = tokio::time::Instant::now() + sensei_e2e::browser::PATIENCE;
    loop {
        let url = b.driver.current_url().await.expect("url").to_string();
        if url.starts_with(&idp.issuer) && b.has("#login").await {
            b.fill("#login", login).await;
            b.click("#provider-sign-in").await;
            break;
        }
        if url.starts_with(&b.base) && !url.contains("/ui/sso") {
            break;
        }
        if url.starts_with(&b.base) && b.has("#sso-error").await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck at {url}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + sensei_e2e::browser::PATIENCE;
    loop {
        let url = b.driver.current_url().await.expect("url").to_string();
        if url.starts_with(&b.base) && (!url.contains("/ui/sso") || b.has("#sso-error").await) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stuck at {url}: {}",
            b.driver.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn browser_session(b: &Browser) -> Option<String> {
    b.driver
        .get_named_cookie("sensei_session")
        .await
        .ok()
        .filter(|c| !c.value.is_empty())
        .map(|c| format!("sensei_session={}", c.value))
}

async fn audit_rows(t: &TestPlane, action: &str) -> Vec<Value> {
    t.db()
        .await
        .query(
            "SELECT metadata FROM audit_log WHERE action = $1 ORDER BY id",
            &[&action],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn sso_sign_in_through_a_real_provider_creates_and_matches_members() {
    let t = TestPlane::start().await;
    let idp = OidcProvider::start(&t);
    let owner = account_with_sso(&t, &idp, json!({})).await;

    // The secret is sealed and never shown.
    let (status, settings) = t.get("/v1/account/sso", &owner).await;
    assert_eq!(status, 200, "{settings}");
    assert!(!settings.to_string().contains(CLIENT_SECRET));
    assert_eq!(
        settings["redirect_uri"],
        format!("{}/ui/sso/callback/acme", t.plane.public_url())
    );
    let sealed: String = t
        .db()
        .await
        .query_one("SELECT client_secret_sealed FROM account_sso", &[])
        .await
        .expect("row")
        .get(0);
    assert!(!sealed.contains(CLIENT_SECRET));
    let updates = audit_rows(&t, "account.sso_updated").await;
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["issuer"], idp.issuer.as_str());
    assert!(!updates[0].to_string().contains(CLIENT_SECRET));

    // The dashboard's settings page shows it (never the secret) and saves it again: the
    // stored secret and CA stay when their fields are left empty (the sign-ins below need them).
    let raw = reqwest::Client::builder()
        .use_preconfigured_tls(
            sensei_certs::tls::client_config_trusting(t.plane.ca_pem()).expect("tls"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let page = raw
        .get(t.url("/ui/settings/sso"))
        .header("cookie", &owner)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(page.contains(&idp.issuer), "{page}");
    assert!(!page.contains(CLIENT_SECRET));
    let at = page.find("name=\"csrf\" value=\"").expect("form token") + 19;
    let csrf = &page[at..at + page[at..].find('"').expect("end")];
    let r = raw
        .post(t.url("/ui/settings/sso"))
        .header("cookie", &owner)
        .header("origin", t.plane.public_url())
        .form(&[
            ("csrf", csrf),
            ("slug", "acme"),
            ("display_name", "Acme Login"),
            ("issuer", idp.issuer.as_str()),
            ("client_id", CLIENT_ID),
            ("client_secret", ""),
            ("scopes", "openid email groups"),
            ("allowed_domains", "acme.test"),
            ("default_role", "developer"),
            ("role_claim", "groups"),
            ("role_map", "admins=admin"),
            ("ca_pem", ""),
        ])
        .send()
        .await
        .expect("save");
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap_or_default());
    let updates = audit_rows(&t, "account.sso_updated").await;
    assert_eq!(updates.len(), 2);
    assert_eq!(updates[1]["client_secret_changed"], false);

    // A new person from an allowed domain becomes a member at their first sign-in.
    let b = Browser::start(t.plane.public_url()).await;
    sign_in_through_provider(&b, &idp, "ann@acme.test").await;
    b.wait_path("/ui/servers").await;
    let cookie = browser_session(&b).await.expect("signed in");
    let (status, me) = t.get("/v1/auth/me", &cookie).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"]["email"], "ann@acme.test");
    assert_eq!(me["user"]["role"], "developer");
    let logins = audit_rows(&t, "user.logged_in").await;
    let last = logins.last().expect("a sign-in");
    assert_eq!(last["method"], "oidc");
    assert_eq!(last["issuer"], idp.issuer.as_str());
    assert_eq!(audit_rows(&t, "member.joined").await.len(), 1);
    // A member the provider created has no password: none signs them in.
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": "ann@acme.test", "password": "!sso"}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (401, "invalid_credentials"));

    // Signed out and in again: the same member, found by (issuer, subject).
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    sign_in_through_provider(&b, &idp, "ann@acme.test").await;
    b.wait_path("/ui/servers").await;
    assert_eq!(
        t.count("SELECT count(*) FROM users WHERE email = 'ann@acme.test'")
            .await,
        1
    );
    assert_eq!(t.count("SELECT count(*) FROM sso_identities").await, 1);
    b.close().await;

    // A group the role map names gives its role.
    let b = Browser::start(t.plane.public_url()).await;
    sign_in_through_provider(&b, &idp, "admins+bob@acme.test").await;
    b.wait_path("/ui/servers").await;
    let cookie = browser_session(&b).await.expect("signed in");
    assert_eq!(
        t.get("/v1/auth/me", &cookie).await.1["user"]["role"],
        "admin"
    );
    b.close().await;

    // Another domain, an unverified address, and an email that already has a user (never
    // linked by email) are refused, and nobody is created.
    for (login, says) in [
        ("mallory@evil.test", "evil.test addresses cannot join"),
        ("unverified@acme.test", "has not verified this email"),
        ("owner@acme.test", "already exists and is not linked"),
    ] {
        let users = t.count("SELECT count(*) FROM users").await;
        let b = Browser::start(t.plane.public_url()).await;
        sign_in_through_provider(&b, &idp, login).await;
        let text = b.wait_text("#sso-error", |_| true).await;
        assert!(text.contains(says), "{login}: {text}");
        assert!(browser_session(&b).await.is_none(), "{login} got a session");
        assert_eq!(
            t.count("SELECT count(*) FROM users").await,
            users,
            "{login}"
        );
        b.close().await;
    }
    // Three refusals through the provider (besides the password tried for ann above).
    let failures = audit_rows(&t, "user.login_failed").await;
    assert_eq!(failures.len(), 4);
    assert_eq!(failures[0]["failed_factor"], "password");
    assert!(failures[1..].iter().all(|f| f["method"] == "oidc"));
    assert!(failures[1..]
        .iter()
        .all(|f| f["issuer"] == idp.issuer.as_str()));

    // The owner, signed in with the password, connects their identity at the provider from
    // the settings page; from then on the provider signs them in as themselves.
    let b = Browser::start(t.plane.public_url()).await;
    b.open("/ui/sign-in").await;
    b.fill("#email", "owner@acme.test").await;
    b.fill("#password", PW).await;
    b.click("#sign-in").await;
    b.wait_path("/ui/servers").await;
    b.open("/ui/settings/sso").await;
    b.click("#connect-sso").await;
    b.wait_for("#login").await;
    b.fill("#login", "owner@acme.test").await;
    b.click("#provider-sign-in").await;
    b.wait_path("/ui/servers").await;
    assert_eq!(audit_rows(&t, "user.sso_linked").await.len(), 1);
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    sign_in_through_provider(&b, &idp, "owner@acme.test").await;
    b.wait_path("/ui/servers").await;
    let cookie = browser_session(&b).await.expect("signed in");
    assert_eq!(
        t.get("/v1/auth/me", &cookie).await.1["user"]["role"],
        "owner"
    );
    b.close().await;
    // A connect that another site starts is refused.
    let r = raw
        .get(t.url("/ui/sso/connect"))
        .header("cookie", &owner)
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("connect");
    assert_eq!(r.status(), 403);

    // The provider rotates its signing key: the next sign-in fetches the new key.
    idp.rotate_keys().await;
    let b = Browser::start(t.plane.public_url()).await;
    sign_in_through_provider(&b, &idp, "ann@acme.test").await;
    b.wait_path("/ui/servers").await;
    b.close().await;
}

#[tokio::test]
async fn sso_forged_expired_and_replayed_id_tokens_are_refused() {
    let t = TestPlane::start().await;
    let idp = OidcProvider::start(&t);
    account_with_sso(&t, &idp, json!({})).await;
    let b = Browser::start(t.plane.public_url()).await;
    // One good sign-in first: its ID token is what the replay sends again.
    sign_in_through_provider(&b, &idp, "ann@acme.test").await;
    b.wait_path("/ui/servers").await;
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    let sessions = t.count("SELECT count(*) FROM sessions").await;

    for (mode, says) in [
        ("audience", "Invalid audiences"),
        ("expired", "Expired"),
        ("forged", "Signature verification failed"),
        ("replay", "Invalid nonce"),
    ] {
        idp.tamper(mode).await;
        sign_in_through_provider(&b, &idp, "ann@acme.test").await;
        let text = b.wait_text("#sso-error", |_| true).await;
        assert!(text.contains(says), "{mode}: {text}");
        assert!(browser_session(&b).await.is_none(), "{mode} signed in");
        assert_eq!(
            t.count("SELECT count(*) FROM sessions").await,
            sessions,
            "{mode}"
        );
    }
    assert_eq!(audit_rows(&t, "user.login_failed").await.len(), 4);
    b.close().await;

    // A callback this browser did not start, or with another state, signs nobody in.
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(
            sensei_certs::tls::client_config_trusting(t.plane.ca_pem()).expect("tls"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = client
        .get(t.url("/ui/sso/callback/acme?code=stolen&state=guessed"))
        .send()
        .await
        .expect("callback");
    assert_eq!(r.status(), 400);
    assert!(session_cookie(&r).is_none());
    // A sign-in started at this account whose answer arrives on another account's redirect
    // URI (a provider forwarding a code that is not its own: the mix-up attack) is refused
    // before anything is redeemed, and the started sign-in is spent.
    let started = client
        .get(t.url("/ui/sso/start?org=acme"))
        .header("sec-fetch-site", "same-origin")
        .send()
        .await
        .expect("start");
    assert!(started.status().is_redirection(), "{}", started.status());
    let location = started
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("to the provider")
        .to_owned();
    let state_param = reqwest::Url::parse(&location)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state");
    let flow_cookie = started
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("sensei_sso="))
        .and_then(|c| c.split(';').next())
        .expect("state cookie")
        .to_owned();
    let r = client
        .get(t.url(&format!(
            "/ui/sso/callback/someone-else?code=forwarded&state={state_param}"
        )))
        .header("cookie", &flow_cookie)
        .send()
        .await
        .expect("callback");
    assert_eq!(r.status(), 400);
    assert!(session_cookie(&r).is_none());
    let page = r.text().await.expect("page");
    assert!(page.contains("another account"), "{page}");
    // A start from another site's page is refused.
    let r = client
        .get(t.url("/ui/sso/start?org=acme"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), 403);

    // Starts are bounded per address (each stores a started sign-in): 60 in 15 minutes.
    let mut answers = Vec::new();
    for _ in 0..61 {
        let r = client
            .get(t.url("/ui/sso/start?org=acme"))
            .send()
            .await
            .expect("start");
        answers.push(r.status().as_u16());
        if r.status() == 429 {
            break;
        }
    }
    assert_eq!(answers.last(), Some(&429), "{answers:?}");
    assert!(answers[..answers.len() - 1].iter().all(|s| *s == 303));
    let stored = t.count("SELECT count(*) FROM sso_logins").await;
    let r = client
        .get(t.url("/ui/sso/start?org=acme"))
        .send()
        .await
        .expect("start");
    assert_eq!(r.status(), 429);
    assert_eq!(t.count("SELECT count(*) FROM sso_logins").await, stored);
}

#[tokio::test]
async fn sso_required_blocks_passwords_but_not_api_keys_or_owners_with_mfa() {
    let t = TestPlane::start().await;
    let idp = OidcProvider::start(&t);
    let owner = account_with_sso(&t, &idp, json!({})).await;
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": "dev@acme.test", "role": "developer"}),
        )
        .await;
    assert_eq!(status, 201, "{inv}");
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": inv["token"], "password": PW}))
        .send()
        .await
        .expect("accept");
    assert_eq!(r.status(), 201);
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &owner,
            json!({"name": "ci", "scopes": ["servers:read"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let key = key["secret"].as_str().expect("secret").to_owned();
    let secret = t.enable_totp(&owner).await;

    let r = t
        .http
        .put(t.url("/v1/account/sso"))
        .header("cookie", &owner)
        .json(&json!({
            "slug": "acme", "display_name": "Acme Login", "issuer": idp.issuer,
            "client_id": CLIENT_ID, "allowed_domains": ["acme.test"], "ca_pem": idp.ca_pem,
            "require_sso": true}))
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 200, "the stored secret stays when none is sent");

    // An invitation cannot be accepted with a password any more: the provider is the way in.
    let users = t.count("SELECT count(*) FROM users").await;
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": "late@acme.test", "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{inv}");
    let (status, body) = t
        .post(
            "/v1/invitations/accept",
            "",
            json!({"token": inv["token"], "password": PW}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (403, "sso_required"), "{body}");
    assert_eq!(t.count("SELECT count(*) FROM users").await, users);

    // A member's password no longer signs in, through the API or the page.
    let sessions = t.count("SELECT count(*) FROM sessions").await;
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": "dev@acme.test", "password": PW}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (403, "sso_required"), "{body}");
    let page = reqwest::Client::builder()
        .use_preconfigured_tls(
            sensei_certs::tls::client_config_trusting(t.plane.ca_pem()).expect("tls"),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .post(t.url("/ui/sign-in"))
        .header("origin", t.plane.public_url())
        .form(&[("email", "dev@acme.test"), ("password", PW)])
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 403);
    assert!(session_cookie(&page).is_none());
    assert!(page
        .text()
        .await
        .expect("text")
        .contains("requires single sign-on"));
    assert_eq!(t.count("SELECT count(*) FROM sessions").await, sessions);
    let refused = audit_rows(&t, "user.login_failed").await;
    assert!(refused.iter().all(|r| r["failed_factor"] == "sso_required"));
    assert_eq!(refused.len(), 2);

    // An owner keeps a break-glass password, with the second factor, and it is audited.
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": "owner@acme.test", "password": PW}),
        )
        .await;
    assert_eq!((status, error_code(&body)), (401, "mfa_required"), "{body}");
    let (status, body) = t
        .post(
            "/v1/auth/login",
            "",
            json!({"email": "owner@acme.test", "password": PW, "totp_code": totp_code(&secret, 1)}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let logins = audit_rows(&t, "user.logged_in").await;
    assert_eq!(logins.last().expect("login")["break_glass"], true);

    // API keys are not sign-ins: they keep working.
    assert_eq!(t.get_with_key("/v1/servers", &key).await.0, 200);

    // Turning it off again (removing single sign-on) restores the password.
    let r = t
        .http
        .delete(t.url("/v1/account/sso"))
        .header("cookie", &owner)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(audit_rows(&t, "account.sso_removed").await.len(), 1);
    t.login("dev@acme.test", PW).await;
}

#[tokio::test]
async fn sso_bad_configurations_are_refused_and_nothing_is_stored() {
    let t = TestPlane::start().await;
    let idp = OidcProvider::start(&t);
    let (owner, _) = t.signup("owner@acme.test", PW).await;
    for (change, code) in [
        (json!({"issuer": "http://127.0.0.1:1"}), "invalid_sso"),
        (json!({"slug": "A"}), "invalid_sso"),
        (json!({"default_role": "owner"}), "invalid_sso"),
        (json!({"role_map": {"x": "owner"}}), "invalid_sso"),
        (json!({"allowed_domains": ["not a domain"]}), "invalid_sso"),
        (json!({"scopes": ["email"]}), "invalid_sso"),
        (json!({"ca_pem": "not a certificate"}), "invalid_sso"),
        // The provider's own certificate is not trusted without its CA.
        (json!({"ca_pem": null}), "sso_provider_unusable"),
        // An issuer the provider does not claim to be.
        (
            json!({"issuer": format!("{}/elsewhere", idp.issuer)}),
            "sso_provider_unusable",
        ),
        // The metadata service is never a provider.
        (
            json!({"issuer": "https://169.254.169.254"}),
            "sso_provider_unusable",
        ),
    ] {
        let r = t
            .http
            .put(t.url("/v1/account/sso"))
            .header("cookie", &owner)
            .json(&idp.sso_settings(change.clone()))
            .send()
            .await
            .expect("put");
        let status = r.status().as_u16();
        let body: Value = r.json().await.expect("json");
        assert_eq!((status, error_code(&body)), (422, code), "{change}: {body}");
    }
    assert_eq!(t.count("SELECT count(*) FROM account_sso").await, 0);
    assert!(audit_rows(&t, "account.sso_updated").await.is_empty());
    // A viewer reads nothing secret and changes nothing; the route table has the rest.
    let (status, _) = t.get("/v1/account/sso", &owner).await;
    assert_eq!(status, 404);
}
