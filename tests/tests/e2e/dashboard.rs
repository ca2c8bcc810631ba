//! The dashboard in a real browser (headless Chromium through chromedriver) against a real
//! control plane and real agents, and the attacks on its forms as plain HTTP.

use std::time::Duration;

use sensei_agent::session::RunOutcome;
use sensei_e2e::browser::Browser;
use sensei_e2e::{eventually, git_repo, open_tempdir, session_cookie, totp_code, TestPlane};
use serde_json::{json, Value};
use thirtyfour::Key;

mod accessibility;
mod manage;
mod presence;
mod welcome;

const PW: &str = "correct horse battery";

fn fresh_email(prefix: &str) -> String {
    format!("{prefix}{}@example.com", uuid::Uuid::new_v4().simple())
}

/// An HTTPS client trusting the plane's CA that sends only the headers a test gives it and
/// does not follow redirects (a test reads the 303 itself).
fn raw_client(t: &TestPlane) -> reqwest::Client {
    let tls = sensei_certs::tls::client_config_trusting(t.plane.ca_pem()).expect("client tls");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// The page's form token (`<input type="hidden" name="csrf" value="…">`).
fn form_token(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("the page has a form token");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').expect("end of value")].to_owned()
}

async fn page(
    t: &TestPlane,
    path: &str,
    cookie: &str,
) -> (u16, String, reqwest::header::HeaderMap) {
    let r = raw_client(t)
        .get(t.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .expect("page");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.text().await.expect("body"), headers)
}

/// Signs the browser in with a password only.
async fn sign_in(b: &Browser, email: &str) {
    sign_in_to(b, email, "/ui/servers").await;
}

/// Signs in with a password; the dashboard then shows `landing`.
async fn sign_in_to(b: &Browser, email: &str, landing: &str) {
    b.open("/ui/sign-in").await;
    b.fill("#email", email).await;
    b.fill("#password", PW).await;
    b.click("#sign-in").await;
    b.wait_path(landing).await;
}

/// Lets the page write to (and the test read) the clipboard, as a person's browser asks them.
async fn allow_clipboard(b: &Browser) {
    b.cdp(
        "Browser.grantPermissions",
        json!({"origin": b.base, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}),
    )
    .await;
}

/// Tabs to the copy button of `id` (it is reachable by keyboard), presses Enter and waits
/// for its live region to say the text was copied.
async fn copy_with_keyboard(b: &Browser, id: &str) {
    allow_clipboard(b).await;
    let button = b.wait_for(&format!("button[data-copy='{id}']")).await;
    assert!(
        button.is_displayed().await.expect("shown"),
        "the script shows the button"
    );
    button.focus().await.expect("focus");
    b.driver
        .active_element()
        .await
        .expect("focused")
        .send_keys(Key::Enter)
        .await
        .expect("press Enter");
    let status = format!("button[data-copy='{id}'] + .copy-status");
    b.wait_text(&status, |text| text == "Copied.").await;
    let live = b.wait_for(&status).await;
    assert_eq!(
        live.attr("aria-live").await.expect("attr").as_deref(),
        Some("polite")
    );
}

/// What the clipboard holds.
async fn clipboard(b: &Browser) -> String {
    b.driver
        .execute_async(
            "var done = arguments[arguments.length - 1]; \
             navigator.clipboard.readText().then(done, function (e) { done('failed: ' + e); });",
            vec![],
        )
        .await
        .expect("read the clipboard")
        .json()
        .as_str()
        .expect("text")
        .to_owned()
}

async fn session_valid(t: &TestPlane, cookie: &str) -> bool {
    t.get("/v1/auth/me", cookie).await.0 == 200
}

#[tokio::test]
async fn sign_in_with_totp_see_the_fleet_deploy_and_follow_the_live_log() {
    let t = TestPlane::start().await;
    // A database of its own: a plain address reads better in the screenshots.
    let email = "ops@example.com".to_owned();
    let (cookie, _) = t.signup(&email, PW).await;
    let secret = t.enable_totp(&cookie).await;
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
    let gate = dir.path().join("gate");
    // The build waits for the test to open a gate, so the log is followed while it runs.
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({
                "name": "site",
                "repo_url": repo.display().to_string(),
                "deploy_path": dir.path().join("app").display().to_string(),
                "hooks": {"build": [
                    "echo building $(cat index.html)",
                    // More lines than one read of the log: a reopened page streams the rest.
                    "seq 1 1200",
                    format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display()),
                    "echo the gate is open",
                ]},
            }),
        )
        .await;
    assert_eq!(status, 201, "{project}");

    let b = Browser::start(&t.base).await;
    // Signed out, the dashboard sends the browser to sign in.
    b.open("/").await;
    b.wait_path("/ui/sign-in").await;
    b.screenshot("sign-in").await;
    b.fill("#email", &email).await;
    b.fill("#password", PW).await;
    b.click("#sign-in").await;
    // The second step: the password alone does not sign in.
    b.wait_for("#code").await;
    assert_eq!(b.path().await, "/ui/sign-in");
    assert!(b.driver.get_named_cookie("sensei_session").await.is_err());
    b.screenshot("second-factor").await;
    b.fill("#code", &totp_code(&secret, 1)).await;
    b.click("#verify").await;
    b.wait_path("/ui/servers").await;

    // The fleet: the agent's server, connected, with its label and version.
    let row = b
        .wait_text("#servers tbody", |text| {
            text.contains("web-1") && text.contains("connected")
        })
        .await;
    assert!(row.contains("env=prod"), "{row}");
    assert!(row.contains(env!("CARGO_PKG_VERSION")), "{row}");
    b.screenshot("fleet").await;
    b.open("/ui/servers?label=env%3Dstaging").await;
    b.wait_text("main", |text| text.contains("No servers match."))
        .await;
    b.open("/ui/servers?label=env%3Dprod&status=connected")
        .await;
    b.wait_text("#servers tbody", |text| text.contains("web-1"))
        .await;

    // The server's page names its certificate as the API does.
    b.click("#servers a").await;
    let (_, server) = t
        .get(&format!("/v1/servers/{}", agent.server_id), &cookie)
        .await;
    let fingerprint = server["agent"]["certificate_fingerprint"]
        .as_str()
        .expect("fingerprint");
    assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    b.wait_text("#cert-fingerprint", |text| text == fingerprint)
        .await;
    b.wait_text("#cert-serial", |text| {
        Some(text) == server["agent"]["certificate_serial"].as_str()
    })
    .await;
    b.screenshot("server").await;

    // Deploy from the page, and watch the log arrive while the deploy runs.
    b.open("/ui/deployments").await;
    b.fill("#ref", "main").await;
    b.click("#deploy").await;
    b.wait_text("#log", |text| text.contains("building v1"))
        .await;
    let path = b.path().await;
    assert!(path.starts_with("/ui/deployments/"), "{path}");
    let log = b.wait_for("#log").await.text().await.expect("log");
    assert!(!log.contains("the gate is open"), "{log}");
    std::fs::write(&gate, b"").expect("open the gate");
    b.wait_text("#log", |text| text.contains("the gate is open"))
        .await;
    // Set by the script on the stream's final event: the page was not reloaded.
    b.wait_for("#log[data-ended='succeeded']").await;
    b.wait_for("#deployment-status [data-status='succeeded']")
        .await;
    let id = path.trim_start_matches("/ui/deployments/");
    let (_, deployment) = t.get(&format!("/v1/deployments/{id}"), &cookie).await;
    assert_eq!(deployment["status"], "succeeded", "{deployment}");
    let commit = deployment["commit"].as_str().expect("commit");
    b.wait_text("#commit", |text| text == commit).await;
    // Reopened after the end, the page shows the first read and streams the remainder.
    b.open(&path).await;
    b.wait_text("#log", |text| text.contains("the gate is open"))
        .await;
    b.wait_for("#log[data-ended='succeeded']").await;
    b.screenshot("deployment").await;

    b.open("/ui/deployments").await;
    b.wait_text(".deployments tbody", |text| text.contains("succeeded"))
        .await;
    b.screenshot("deployments").await;
    b.open("/ui/settings/sessions").await;
    b.wait_text("#sessions", |text| text.contains("(this browser)"))
        .await;
    b.screenshot("sessions").await;
    b.open("/ui/settings/audit?action=user.logged_in").await;
    let audit = b.wait_text("#audit tbody", |text| !text.is_empty()).await;
    assert!(audit.contains("user.logged_in"), "{audit}");
    assert!(!audit.contains("deployment.created"), "{audit}");
    b.screenshot("audit").await;
    b.open("/ui/projects").await;
    b.wait_text("#projects", |text| text.contains("site")).await;
    b.open("/ui/servers/new").await;
    b.wait_for("#create-server").await;
    b.screenshot("add-server").await;

    // Every page above ran under the policy without a violation.
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn revoking_a_certificate_from_the_page_cuts_the_agent_off() {
    let t = TestPlane::start().await;
    let email = fresh_email("revoke");
    let (cookie, _) = t.signup(&email, PW).await;
    let agent = t.start_agent(&cookie, "edge-1").await;
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&cookie, agent.server_id))
        .await
    );
    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    b.open(&format!("/ui/servers/{}", agent.server_id)).await;
    b.click("#revoke").await;
    // A confirmation step first: nothing is revoked by following the link.
    b.wait_for("#confirm-revoke").await;
    assert!(t.agent_connected(&cookie, agent.server_id).await);
    b.click("#confirm-revoke").await;
    b.wait_text(".notice", |text| text.contains("revoked"))
        .await;
    b.wait_text("#cert-fingerprint", |text| text.starts_with("none"))
        .await;
    assert!(!b.has("#revoke").await);
    // The agent was cut off and told why; its certificate is refused from now on.
    let outcome = tokio::time::timeout(Duration::from_secs(30), agent.task)
        .await
        .expect("the agent was not cut off")
        .expect("join")
        .expect("run");
    assert_eq!(outcome, RunOutcome::Revoked);
    assert!(!t.agent_connected(&cookie, agent.server_id).await);
    let (_, server) = t
        .get(&format!("/v1/servers/{}", agent.server_id), &cookie)
        .await;
    assert_eq!(server["agent"]["certificate_fingerprint"], Value::Null);
    assert!(t
        .audit_actions()
        .await
        .iter()
        .any(|a| a == "agent.certificate_revoked"));
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn signing_out_a_session_from_settings_ends_it_for_the_api() {
    let t = TestPlane::start().await;
    let email = fresh_email("sessions");
    let (_signup_cookie, _) = t.signup(&email, PW).await;
    // Another device: a session made through the API.
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": email, "password": PW}))
        .send()
        .await
        .expect("login");
    let other = session_cookie(&r).expect("cookie");
    let other_id = r.json::<Value>().await.expect("json")["session_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert!(session_valid(&t, &other).await);

    let b = Browser::start(&t.base).await;
    // By keyboard only: type, Tab to the next field, Enter submits.
    b.open("/ui/sign-in").await;
    b.wait_for("#email")
        .await
        .send_keys(email.as_str())
        .await
        .expect("type");
    let focused = b.driver.active_element().await.expect("focus");
    focused.send_keys(Key::Tab).await.expect("tab");
    let focused = b.driver.active_element().await.expect("focus");
    assert_eq!(focused.id().await.expect("id").as_deref(), Some("password"));
    focused.send_keys(PW).await.expect("type");
    focused.send_keys(Key::Enter).await.expect("enter");
    b.wait_path("/ui/servers").await;
    let mine = b.session_cookie().await;
    b.open("/ui/settings/sessions").await;
    b.click(&format!("tr[data-session='{other_id}'] button"))
        .await;
    b.wait_text(".notice", |text| text.contains("signed out"))
        .await;
    assert!(!b.has(&format!("tr[data-session='{other_id}']")).await);
    assert!(
        !session_valid(&t, &other).await,
        "the signed-out cookie still works"
    );
    assert!(session_valid(&t, &mine).await);

    // Sign out everywhere ends this browser's session too.
    b.click("#sign-out-everywhere").await;
    b.wait_path("/ui/sign-in").await;
    assert!(!session_valid(&t, &mine).await);
    b.open("/ui/servers").await;
    b.wait_path("/ui/sign-in").await;
    b.close().await;
}

#[tokio::test]
async fn forged_and_cross_origin_forms_are_refused_and_every_page_sends_the_headers() {
    let t = TestPlane::start().await;
    let email = fresh_email("csrf");
    let (cookie, _) = t.signup(&email, PW).await;
    let victim = t.login(&email, PW).await;
    let victim_id = {
        let (_, list) = t.get("/v1/auth/sessions", &cookie).await;
        let sessions = list["sessions"].as_array().expect("sessions").clone();
        let current_cookie_session = sessions
            .iter()
            .find(|s| s["current"] == false)
            .expect("the second session")
            .clone();
        current_cookie_session["id"]
            .as_str()
            .expect("id")
            .to_owned()
    };
    let (status, html, _) = page(&t, "/ui/settings/sessions", &cookie).await;
    assert_eq!(status, 200);
    let token = form_token(&html);
    // Another account's page gives another token.
    let (stranger, _) = t.signup(&fresh_email("stranger"), PW).await;
    let (_, stranger_html, _) = page(&t, "/ui/servers", &stranger).await;
    let stranger_token = form_token(&stranger_html);
    assert_ne!(token, stranger_token);

    let origin = t.plane.public_url().trim_end_matches('/').to_owned();
    let action = t.url(&format!("/ui/settings/sessions/{victim_id}/sign-out"));
    let post = |origin: Option<&str>, body: String| {
        let mut r = raw_client(&t)
            .post(&action)
            .header("cookie", &cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(origin) = origin {
            r = r.header("origin", origin);
        }
        r.send()
    };
    // From another origin, with the right token: refused.
    let r = post(Some("https://evil.example"), format!("csrf={token}"))
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let text = r.text().await.expect("body");
    assert!(text.contains("does not come from the dashboard"), "{text}");
    // No Origin and no Sec-Fetch-Site at all: refused.
    let r = post(None, format!("csrf={token}")).await.expect("post");
    assert_eq!(r.status(), 403);
    // The right origin without the token, with a wrong one, or with another session's.
    for body in [
        String::new(),
        "csrf=".to_owned(),
        "csrf=0000".to_owned(),
        format!("csrf={stranger_token}"),
    ] {
        let r = post(Some(&origin), body.clone()).await.expect("post");
        assert_eq!(r.status(), 403, "{body}");
    }
    assert!(
        session_valid(&t, &victim).await,
        "a refused form changed something"
    );
    // The real form works.
    let r = post(Some(&origin), format!("csrf={token}"))
        .await
        .expect("post");
    assert_eq!(r.status(), 303);
    assert!(!session_valid(&t, &victim).await);

    // Another site cannot sign a visitor in either.
    let r = raw_client(&t)
        .post(t.url("/ui/sign-in"))
        .header("origin", "https://evil.example")
        .form(&[("email", email.as_str()), ("password", PW)])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert!(session_cookie(&r).is_none());

    // The headers, on every kind of answer: pages, the sign-in page, errors, assets.
    let (_, html, _) = page(&t, "/ui/servers", &cookie).await;
    let script = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a script")
        .to_owned();
    assert!(script.starts_with("/ui/static/app."), "{script}");
    assert!(!html.contains("<script>"), "inline script");
    for (path, with_cookie, status) in [
        ("/ui/servers", true, 200),
        ("/ui/deployments", true, 200),
        ("/ui/projects", true, 200),
        ("/ui/rollouts", true, 200),
        ("/ui/settings/sessions", true, 200),
        ("/ui/settings/audit", true, 200),
        ("/ui/servers/new", true, 200),
        ("/ui/sign-in", false, 200),
        ("/ui/no-such-page", true, 404),
        ("/ui/servers", false, 303),
        (
            "/ui/servers/00000000-0000-0000-0000-000000000000",
            true,
            404,
        ),
        (script.as_str(), false, 200),
    ] {
        let (got, _, headers) = page(&t, path, if with_cookie { &cookie } else { "" }).await;
        assert_eq!(got, status, "{path}");
        let csp = headers["content-security-policy"].to_str().expect("csp");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert!(headers.contains_key("referrer-policy"), "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
    }
    let (_, _, headers) = page(&t, &script, "").await;
    assert!(headers["cache-control"]
        .to_str()
        .expect("cache")
        .contains("immutable"));
    let (_, _, headers) = page(&t, "/ui/servers", &cookie).await;
    assert_eq!(headers["cache-control"], "no-store");
}

#[tokio::test]
async fn a_viewer_sees_no_destructive_buttons_and_a_forged_one_is_refused() {
    let t = TestPlane::start().await;
    let (owner, _) = t.signup(&fresh_email("owner"), PW).await;
    let agent = t.start_agent(&owner, "db-1").await;
    let viewer_email = fresh_email("viewer");
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": viewer_email, "role": "viewer"}),
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
    let viewer = session_cookie(&r).expect("cookie");
    assert!(
        eventually(Duration::from_secs(30), || t
            .agent_connected(&owner, agent.server_id))
        .await
    );
    let (status, project) = t
        .post(
            "/v1/projects",
            &owner,
            json!({"name": "site", "repo_url": "/tmp/site.git", "deploy_path": "/srv/site",
                   "env": {"SECRET": "s"}}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project_id = project["id"].as_str().expect("id").to_owned();

    let b = Browser::start(&t.base).await;
    sign_in(&b, &viewer_email).await;
    b.wait_text("#servers tbody", |text| text.contains("db-1"))
        .await;
    assert!(!b.has("#add-server").await);
    b.click("#servers a").await;
    b.wait_for("#cert-fingerprint").await;
    assert!(!b.has("#revoke").await);
    assert!(!b.has("button.danger").await);
    b.open("/ui/deployments").await;
    b.wait_for(".deployments, main p").await;
    assert!(!b.has("#deploy-form").await);
    b.open("/ui/projects").await;
    b.wait_for("main h1").await;
    assert!(!b.has("#create-project").await);
    b.click("#projects a").await;
    b.wait_for("tr[data-env='SECRET']").await;
    for button in [
        "#set-env",
        "#save-project",
        "#delete-project",
        "button.danger",
    ] {
        assert!(!b.has(button).await, "{button}");
    }
    b.open("/ui/servers").await;
    b.click("#servers a").await;
    b.wait_for("#cert-fingerprint").await;
    for button in ["#new-token", "#delete-server"] {
        assert!(!b.has(button).await, "{button}");
    }
    b.open("/ui/rollouts").await;
    b.wait_for("main h1").await;
    assert!(!b.has("#rollout-form").await);
    b.close().await;

    // The viewer's own token, the right origin: the server still refuses.
    let (_, html, _) = page(&t, "/ui/servers", &viewer).await;
    let token = form_token(&html);
    let origin = t.plane.public_url().trim_end_matches('/').to_owned();
    let client = raw_client(&t);
    let server = agent.server_id;
    for path in [
        format!("/ui/servers/{server}/revoke-certificate"),
        format!("/ui/servers/{server}/enrollment-token"),
        format!("/ui/servers/{server}/delete"),
        "/ui/servers/new".to_owned(),
        "/ui/projects".to_owned(),
        format!("/ui/projects/{project_id}"),
        format!("/ui/projects/{project_id}/env"),
        format!("/ui/projects/{project_id}/env/unset"),
        format!("/ui/projects/{project_id}/delete"),
        "/ui/rollouts".to_owned(),
    ] {
        let r = client
            .post(t.url(&path))
            .header("cookie", &viewer)
            .header("origin", &origin)
            // Every field any of these forms needs, so that only the access rule refuses.
            .form(&[
                ("csrf", token.as_str()),
                ("name", "SECRET"),
                ("value", "x"),
                ("host", "x.example"),
                ("repo_url", "/tmp/x"),
                ("deploy_path", "/srv/x"),
                ("keep_releases", "1"),
                ("hook_timeout_secs", "1"),
                ("project_id", project_id.as_str()),
                ("ref", "main"),
                ("selector", "env=prod"),
                ("canary", "1"),
                ("max_failures", "0"),
                ("pause_seconds", "0"),
                ("unreachable_after_seconds", "60"),
            ])
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 403, "{path}");
    }
    for confirmation in [
        format!("/ui/servers/{server}/revoke-certificate"),
        format!("/ui/servers/{server}/enrollment-token"),
        format!("/ui/servers/{server}/delete"),
        format!("/ui/projects/{project_id}/delete"),
    ] {
        let (status, _, _) = page(&t, &confirmation, &viewer).await;
        assert_eq!(status, 403, "{confirmation}");
    }
    // Nothing changed.
    assert!(t.agent_connected(&owner, agent.server_id).await);
    let (_, servers) = t.get("/v1/servers", &owner).await;
    assert_eq!(servers["servers"].as_array().expect("servers").len(), 1);
    let (_, unchanged) = t.get(&format!("/v1/projects/{project_id}"), &owner).await;
    assert_eq!(unchanged["name"], "site", "{unchanged}");
    assert_eq!(unchanged["keep_releases"], 5);
    assert_eq!(unchanged["env_names"], json!(["SECRET"]));
    let (_, rollouts) = t.get("/v1/rollouts", &owner).await;
    assert_eq!(rollouts["rollouts"], json!([]));
    assert!(!t
        .audit_actions()
        .await
        .iter()
        .any(|a| a == "server.enrollment_token_created" || a == "server.deleted"));
}

#[tokio::test]
async fn a_rollout_started_from_the_page_follows_progress_live_and_approves_the_canary() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let policy = sensei_agent::jobs::JobPolicy::default;
    let first = t
        .start_labelled_agent(&cookie, "web-1", json!({"env": "prod"}), policy())
        .await;
    let second = t
        .start_labelled_agent(&cookie, "web-2", json!({"env": "prod"}), policy())
        .await;
    for agent in [&first, &second] {
        assert!(
            eventually(Duration::from_secs(30), || t
                .agent_connected(&cookie, agent.server_id))
            .await
        );
    }
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    // A server the selector leaves out.
    let staging = t
        .start_labelled_agent(&cookie, "web-3", json!({"env": "staging"}), policy())
        .await;

    // Started from the page: servers chosen by label, a canary and manual approval.
    let b = Browser::start(&t.base).await;
    sign_in(&b, email).await;
    b.open("/ui/rollouts").await;
    b.fill("#selector", "env=prod").await;
    b.fill("#canary", "1").await;
    b.fill("#batch_size", "1").await;
    b.click("#manual_approval").await;
    b.screenshot("rollout-new").await;
    b.click("#start-rollout").await;
    b.wait_for("#rollout").await;
    let path = b.path().await;
    let id = path
        .strip_prefix("/ui/rollouts/")
        .expect("the rollout's page");
    let (_, rollout) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
    assert_eq!(rollout["ref"], "main", "{rollout}");
    assert_eq!(rollout["strategy"]["canary"], 1, "{rollout}");
    assert_eq!(rollout["strategy"]["batch_size"], 1, "{rollout}");
    assert_eq!(rollout["strategy"]["manual_approval"], true, "{rollout}");
    let mut targets: Vec<String> = rollout["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .map(|t| t["server_id"].as_str().expect("id").to_owned())
        .collect();
    targets.sort();
    let mut prod = vec![first.server_id.to_string(), second.server_id.to_string()];
    prod.sort();
    assert_eq!(targets, prod, "only env=prod, not {}", staging.server_id);
    // The script marks the state each event brings: the canary's end arrives on this page.
    b.wait_for("#rollout[data-state='paused:approval']").await;
    b.wait_text("#rollout-reason", |text| text.contains("approval"))
        .await;
    b.wait_text("#target-counts", |text| text.contains("succeeded: 1"))
        .await;
    let approve = b.wait_for("#rollout-approve").await;
    assert!(approve.is_displayed().await.expect("displayed"));
    assert!(!b
        .wait_for("#rollout-resume")
        .await
        .is_displayed()
        .await
        .expect("displayed"));
    b.screenshot("rollout").await;
    approve.click().await.expect("approve");
    b.wait_for("#rollout[data-state='succeeded']").await;
    b.wait_text("#target-counts", |text| text.contains("succeeded: 2"))
        .await;
    // The targets table follows the events too.
    b.wait_for(&format!(
        "tr[data-target='{}'] [data-status='succeeded']",
        second.server_id
    ))
    .await;
    for button in ["#rollout-pause", "#rollout-approve", "#rollout-abort"] {
        assert!(!b
            .wait_for(button)
            .await
            .is_displayed()
            .await
            .expect("shown"));
    }
    let (_, done) = t.get(&format!("/v1/rollouts/{id}"), &cookie).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(t
        .audit_actions()
        .await
        .iter()
        .any(|a| a == "rollout.approved"));
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn adding_servers_shows_the_enroll_command_and_the_public_key_once() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let b = Browser::start(&t.base).await;
    sign_in(&b, email).await;
    b.click("#add-server").await;
    b.fill("#name", "new-1").await;
    b.fill("#host", "new-1.example").await;
    b.fill("#labels", "env=staging\nrole=web").await;
    b.click("#create-server").await;
    let command = b
        .wait_text("#enroll-command", |text| {
            text.starts_with("sensei-agent enroll")
        })
        .await;
    b.screenshot("server-added").await;
    // The copy button, pressed from the keyboard, puts the command on the clipboard and says
    // so in its live region.
    copy_with_keyboard(&b, "enroll-command").await;
    assert_eq!(clipboard(&b).await, command);
    let word_after = |flag: &str| {
        let mut words = command.split_whitespace();
        words.find(|w| *w == flag);
        words.next().expect("a value").to_owned()
    };
    assert_eq!(word_after("--control-plane"), t.agent_endpoint());
    assert_eq!(
        word_after("--ca-fingerprint"),
        t.plane.ca_fingerprint().to_string()
    );
    let token = word_after("--token");
    let server_id: uuid::Uuid = word_after("--server-id").parse().expect("server id");

    // The command works: an agent enrolls with exactly these values and connects.
    let dir = open_tempdir();
    let mut options = t.enroll_options(&token, dir.path());
    options.expected_server_id = Some(server_id);
    sensei_agent::enroll::enroll(&options)
        .await
        .expect("enroll with the page's command");
    // Shown once: the server's page does not have it.
    b.open(&format!("/ui/servers/{server_id}")).await;
    b.wait_text("main", |text| text.contains("env=staging"))
        .await;
    assert!(!b.driver.source().await.expect("source").contains(&token));
    let (_, server) = t.get(&format!("/v1/servers/{server_id}"), &cookie).await;
    assert!(server["agent"]["certificate_fingerprint"]
        .as_str()
        .is_some_and(|f| f.starts_with("SHA256:")));

    // An SSH server: the public key to install, once; its fingerprint stays on the page.
    b.open("/ui/servers/new").await;
    b.fill("#name", "legacy").await;
    b.fill("#host", "127.0.0.1").await;
    b.click("input[name='transport'][value='ssh']").await;
    b.fill("#username", "deploy").await;
    b.click("#create-server").await;
    let key = b
        .wait_text("#public-key", |text| text.starts_with("ssh-ed25519 "))
        .await;
    copy_with_keyboard(&b, "public-key").await;
    assert_eq!(clipboard(&b).await, key);
    b.click("main p a").await;
    let fingerprint = b
        .wait_text("#ssh-fingerprint", |text| text.starts_with("SHA256:"))
        .await;
    assert!(!b.driver.source().await.expect("source").contains(&key));
    let (_, list) = t.get("/v1/servers", &cookie).await;
    let legacy = list["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["name"] == "legacy")
        .expect("the SSH server")
        .clone();
    assert_eq!(legacy["fingerprint"], fingerprint.as_str());
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn the_audit_log_page_filters_by_action_and_pages_by_fifty() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup(&fresh_email("audit"), PW).await;
    for i in 0..51 {
        t.create_agent_server(&cookie, &format!("s-{i}"), json!({}))
            .await;
    }
    let rows = |html: &str| html.matches("<code>server.created</code>").count();
    let (status, first, _) = page(&t, "/ui/settings/audit?action=server.created", &cookie).await;
    assert_eq!(status, 200);
    assert_eq!(rows(&first), 50);
    assert!(!first.contains("<code>account.created</code>"));
    let at = first
        .find("id=\"older-events\"")
        .expect("a link to older events");
    let href = first[..at]
        .rsplit("href=\"")
        .next()
        .and_then(|rest| rest.split('"').next())
        .expect("href")
        .replace("&amp;", "&");
    let (_, second, _) = page(&t, &href, &cookie).await;
    assert_eq!(rows(&second), 1, "{href}");
    assert!(!second.contains("older-events"));
    let (_, other, _) = page(&t, "/ui/settings/audit?action=account.created", &cookie).await;
    assert_eq!(other.matches("<code>account.created</code>").count(), 1);
    assert_eq!(rows(&other), 0);
    // Markup in a filter comes back as text.
    let (_, all, _) = page(&t, "/ui/settings/audit?action=%3Cscript%3E", &cookie).await;
    assert!(
        all.contains("value=\"&lt;script&gt;\""),
        "the filter is escaped"
    );
    assert!(!all.contains("<script>"));

    // By target and by time; a malformed id or time is said, not ignored.
    let (status, one) = t.get("/v1/servers?limit=1", &cookie).await;
    assert_eq!(status, 200);
    let target = one["servers"][0]["id"].as_str().expect("id").to_owned();
    let (_, by_target, _) = page(&t, &format!("/ui/settings/audit?target={target}"), &cookie).await;
    assert_eq!(rows(&by_target), 1, "one server.created names that server");
    let (_, future, _) = page(&t, "/ui/settings/audit?since=2999-01-01T00%3A00", &cookie).await;
    assert!(future.contains("No events match."));
    let (_, past, _) = page(&t, "/ui/settings/audit?until=2000-01-01T00%3A00", &cookie).await;
    assert!(past.contains("No events match."));
    for bad in ["actor=nobody", "target=1", "since=yesterday"] {
        let (status, _, _) = page(&t, &format!("/ui/settings/audit?{bad}"), &cookie).await;
        assert_eq!(status, 422, "{bad}");
    }

    // The same filters download as JSON lines, oldest first; a viewer's export holds only
    // their own events.
    let at = first.find("id=\"export-audit\"").expect("an export link");
    let href = first[..at]
        .rsplit("href=\"")
        .next()
        .and_then(|rest| rest.split('"').next())
        .expect("href")
        .replace("&amp;", "&");
    let (status, lines, headers) = page(&t, &href, &cookie).await;
    assert_eq!(status, 200, "{href}");
    assert!(headers
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("attachment")));
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(events.len(), 51);
    assert!(events.iter().all(|e| e["event"] == "server.created"));
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &cookie,
            json!({"email": fresh_email("viewer"), "role": "viewer"}),
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
    let viewer = session_cookie(&r).expect("cookie");
    let (status, theirs, _) = page(&t, "/ui/settings/audit/export", &viewer).await;
    assert_eq!(status, 200);
    let actors: Vec<Value> = theirs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line")["actor"]["id"].clone())
        .collect();
    assert!(!actors.is_empty(), "the viewer's own sign-up shows");
    let viewer_id = r.json::<Value>().await.expect("json")["id"].clone();
    assert!(actors.iter().all(|a| *a == viewer_id), "{theirs}");
}

#[tokio::test]
async fn api_keys_and_invitations_from_settings_work_against_the_api() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (owner, _) = t.signup(email, PW).await;
    let b = Browser::start(&t.base).await;
    sign_in(&b, email).await;

    // An API key: created with one scope, its secret shown once, working, then revoked.
    b.open("/ui/settings/api-keys").await;
    b.fill("#name", "ci").await;
    b.click("input[name='scope'][value='servers:read']").await;
    b.click("#create-api-key").await;
    let secret = b
        .wait_text("#api-key-secret", |text| !text.trim().is_empty())
        .await;
    b.screenshot("api-key-created").await;
    copy_with_keyboard(&b, "api-key-secret").await;
    assert_eq!(clipboard(&b).await, secret);
    let (status, _) = t.get_with_key("/v1/servers", &secret).await;
    assert_eq!(status, 200);
    let (status, _) = t.get_with_key("/v1/projects", &secret).await;
    assert_eq!(status, 403, "only the scope ticked");
    b.open("/ui/settings/api-keys").await;
    assert!(!b.driver.source().await.expect("source").contains(&secret));
    b.click("#api-keys button").await;
    b.wait_text(".notice", |text| text.contains("revoked"))
        .await;
    let (status, _) = t.get_with_key("/v1/servers", &secret).await;
    assert_eq!(status, 401, "a revoked key still works");

    // An invitation: the token shown once lets the new member in, with the role chosen.
    b.open("/ui/settings/members").await;
    b.fill("#email", "new@example.com").await;
    b.click("#role option[value='operator']").await;
    b.click("#invite").await;
    let token = b
        .wait_text("#invitation-token", |text| !text.trim().is_empty())
        .await;
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": token, "password": PW}))
        .send()
        .await
        .expect("accept");
    assert_eq!(r.status(), 201);
    b.open("/ui/settings/members").await;
    let members = b
        .wait_text("#members", |text| text.contains("new@example.com"))
        .await;
    assert!(members.contains("operator"), "{members}");
    b.screenshot("members").await;
    let newcomer = session_cookie(&r).expect("the new member's cookie");

    // An open invitation revoked from the page can no longer be accepted.
    b.open("/ui/settings/members").await;
    b.fill("#email", "late@example.com").await;
    b.click("#invite").await;
    let late = b
        .wait_text("#invitation-token", |text| !text.trim().is_empty())
        .await;
    b.open("/ui/settings/members").await;
    b.click("#invitations button").await;
    b.wait_text(".notice", |text| text.contains("invitation is revoked"))
        .await;
    assert!(!b.has("#invitations").await);
    let r = t
        .http
        .post(t.url("/v1/invitations/accept"))
        .json(&json!({"token": late, "password": PW}))
        .send()
        .await
        .expect("accept");
    assert!(r.status().is_client_error(), "{}", r.status());
    let (_, list) = t.get("/v1/members", &owner).await;
    assert_eq!(list["members"].as_array().map(Vec::len), Some(2));
    let member_id = list["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["email"] == "new@example.com")
        .and_then(|m| m["id"].as_str())
        .expect("the new member")
        .to_owned();

    // Their role changed on the page, then removed after a confirmation step.
    let row = format!("tr[data-member='{member_id}']");
    b.click(&format!("{row} option[value='developer']")).await;
    b.click(&format!("{row} button")).await;
    b.wait_text(".notice", |text| text.contains("role")).await;
    let (_, me) = t.get("/v1/auth/me", &newcomer).await;
    assert_eq!(me["user"]["role"], "developer", "{me}");
    b.click(&format!("{row} a.danger")).await;
    b.wait_for("#confirm-remove").await;
    assert!(
        session_valid(&t, &newcomer).await,
        "removed before confirming"
    );
    b.click("#confirm-remove").await;
    b.wait_text(".notice", |text| text.contains("removed"))
        .await;
    assert!(!session_valid(&t, &newcomer).await);
    let (_, list) = t.get("/v1/members", &owner).await;
    assert_eq!(list["members"].as_array().map(Vec::len), Some(1));
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn a_rollback_from_the_deployment_page_returns_to_the_release_chosen() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (cookie, _) = t.signup(email, PW).await;
    let agent = t.start_agent(&cookie, "web-1").await;
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let app = dir.path().join("app");
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": app.display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let deploy = || async {
        let (status, d) = t
            .post(
                "/v1/deployments",
                &cookie,
                json!({"project_id": project["id"], "server_id": agent.server_id, "ref": "main"}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        t.wait_deployment(&cookie, d["id"].as_str().expect("id"))
            .await
    };
    let first = deploy().await;
    sensei_e2e::git_commit(&repo, "v2");
    let second = deploy().await;
    sensei_e2e::git_commit(&repo, "v3");
    let third = deploy().await;
    assert_eq!(third["status"], "succeeded", "{third}");
    let served = || std::fs::read_to_string(app.join("current/index.html")).unwrap_or_default();
    assert_eq!(served(), "v3");
    let third_page = format!("/ui/deployments/{}", third["id"].as_str().expect("id"));

    let b = Browser::start(&t.base).await;
    sign_in(&b, email).await;
    // The picker offers the earlier releases, not the current one.
    b.open(&third_page).await;
    let release = |d: &Value| d["release_id"].as_str().expect("release").to_owned();
    let offered = b.wait_text("#to_release", |text| !text.is_empty()).await;
    assert!(offered.contains(&release(&first)), "{offered}");
    assert!(offered.contains(&release(&second)), "{offered}");
    assert!(!offered.contains(&release(&third)), "{offered}");

    // A release this project never made there, forged into the form: refused, nothing queued.
    let cookie_of_browser = b.session_cookie().await;
    let (_, html, _) = page(&t, &third_page, &cookie_of_browser).await;
    let r = raw_client(&t)
        .post(t.url(&format!("{third_page}/rollback")))
        .header("cookie", &cookie_of_browser)
        .header("origin", t.plane.public_url().trim_end_matches('/'))
        .form(&[
            ("csrf", form_token(&html).as_str()),
            ("to_release", "20200101000000-aaaaaaaaaaaa"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 422);
    let (_, rollbacks) = t.get("/v1/deployments?kind=rollback", &cookie).await;
    assert_eq!(rollbacks["deployments"], json!([]), "{rollbacks}");

    // Back to v1, past v2, chosen on the page.
    let picker = b.wait_for("#to_release").await;
    thirtyfour::components::SelectElement::new(&picker)
        .await
        .expect("select")
        .select_by_value(&release(&first))
        .await
        .expect("choose v1");
    b.click("#rollback").await;
    // The rollback's own page, then its end (the page of the deploy had ended already).
    b.wait_text("main h1", |text| text.starts_with("rollback of site"))
        .await;
    b.wait_for("#deployment-status [data-status='succeeded']")
        .await;
    b.wait_text("#commit", |text| Some(text) == first["commit"].as_str())
        .await;
    assert_eq!(served(), "v1");
    b.close().await;
}

/// Sets TOTP up on the security page for `email`; returns the recovery codes shown.
async fn set_up_totp(b: &Browser, email: &str) -> Vec<String> {
    b.open("/ui/settings/security").await;
    b.click("#enroll-totp").await;
    let secret = b
        .wait_text("#totp-secret", |text| !text.trim().is_empty())
        .await;
    // The QR code, drawn by the control plane in the page (the unit test of its drawing
    // decodes it back to the link), is shown with the link it encodes, which names this
    // account and this secret.
    let qr = b.wait_for("svg#totp-qr[role='img'][aria-label]").await;
    let size = qr.rect().await.expect("size");
    assert!(size.width > 100.0 && size.height > 100.0, "{size:?}");
    let uri = b.wait_text("#totp-uri", |text| !text.is_empty()).await;
    let account = email.replace('@', "%40");
    assert!(
        uri.starts_with(&format!(
            "otpauth://totp/Sensei:{account}?secret={}&",
            secret.trim()
        )),
        "{uri}"
    );
    b.screenshot("totp-setup").await;
    let secret = sensei_e2e::base32_decode(secret.trim());
    b.fill("#code", &totp_code(&secret, 0)).await;
    b.click("#confirm-totp").await;
    b.wait_for("#recovery-codes li").await;
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

#[tokio::test]
async fn totp_is_set_up_on_the_security_page_and_a_recovery_code_signs_in_once() {
    let t = TestPlane::start().await;
    let email = "ops@example.com";
    let (owner, _) = t.signup(email, PW).await;
    let b = Browser::start(&t.base).await;
    sign_in(&b, email).await;
    let codes = set_up_totp(&b, email).await;
    assert_eq!(codes.len(), 10, "{codes:?}");
    b.open("/ui/settings/security").await;
    b.wait_text("#totp-state", |text| text.contains("authenticator"))
        .await;
    b.screenshot("security").await;
    // Required of every member from now on, from Settings → Account.
    b.open("/ui/settings/account").await;
    b.click("#require_mfa").await;
    b.click("#save-account").await;
    b.wait_text(".notice", |text| text.contains("Saved")).await;
    let (_, account) = t.get("/v1/account", &owner).await;
    assert_eq!(account["require_mfa"], true, "{account}");
    let (_, me) = t.get("/v1/auth/me", &owner).await;
    assert_eq!(me["mfa_enabled"], true, "{me}");

    // Signed out, the password alone is not enough; a recovery code is, once.
    for attempt in 0..2 {
        b.open("/ui/sign-in").await;
        b.fill("#email", email).await;
        b.fill("#password", PW).await;
        b.click("#sign-in").await;
        b.click("input[name='code_kind'][value='recovery']").await;
        b.fill("#code", &codes[0]).await;
        b.click("#verify").await;
        if attempt == 0 {
            b.wait_path("/ui/servers").await;
            b.click("#sign-out").await;
            b.wait_path("/ui/sign-in").await;
        } else {
            b.wait_text("#sign-in-error", |text| text.contains("already used"))
                .await;
            assert!(b.driver.get_named_cookie("sensei_session").await.is_err());
        }
    }

    // An account that requires a second factor sends a member without one to set it up.
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": "new@example.com", "role": "operator"}),
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
    sign_in_to(&b, "new@example.com", "/ui/settings/security").await;
    b.wait_text("main", |text| text.contains("requires a second factor"))
        .await;
    b.open("/ui/servers").await;
    b.wait_text("main", |text| text.contains("multi-factor"))
        .await;
    assert!(!b.has("#servers").await);
    set_up_totp(&b, "new@example.com").await;
    b.open("/ui/servers").await;
    b.wait_for("main h1").await;
    assert!(!b.has(".error").await);
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;
}

#[tokio::test]
async fn a_custom_role_and_a_project_scope_given_from_settings_narrow_what_a_member_sees() {
    let t = TestPlane::start().await;
    let email = fresh_email("owner");
    let (owner, _) = t.signup(&email, PW).await;
    let mut project_ids = Vec::new();
    for name in ["shop", "blog"] {
        let (status, p) = t
            .post(
                "/v1/projects",
                &owner,
                json!({"name": name, "repo_url": "https://example.com/x.git", "deploy_path": format!("/srv/{name}")}),
            )
            .await;
        assert_eq!(status, 201, "{p}");
        project_ids.push(p["id"].as_str().expect("id").to_owned());
    }
    let member_email = fresh_email("reader");
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": member_email, "role": "viewer"}),
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
    let member = session_cookie(&r).expect("cookie");
    let member_id = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();

    let b = Browser::start(&t.base).await;
    sign_in(&b, &email).await;
    // A role defined on Settings → Roles.
    b.open("/ui/settings/roles").await;
    b.fill("#role-name", "shop readers").await;
    b.click("#new-projects-read").await;
    b.click("#new-deployments-read").await;
    b.click("#create-role").await;
    let roles = b
        .wait_text("#custom-roles", |text| text.contains("shop readers"))
        .await;
    assert!(
        roles.contains("projects:read") && roles.contains("deployments:read"),
        "{roles}"
    );
    b.screenshot("roles").await;
    // Given to the member with a scope of one project, on their access page.
    b.open(&format!("/ui/settings/members/{member_id}/access"))
        .await;
    b.click("#access-role option[value='shop readers']").await;
    b.click("#reach-limited").await;
    b.click(&format!("#project-{}", project_ids[0])).await;
    b.click("#save-access").await;
    let members = b
        .wait_text("#members", |text| text.contains("shop readers"))
        .await;
    assert!(members.contains("(scoped)"), "{members}");
    // The role is in use: no Delete button on its row.
    b.open("/ui/settings/roles").await;
    b.wait_for("#custom-roles").await;
    assert!(!b.has("#custom-roles button.danger").await);
    b.close().await;

    // The member reaches the one project, in the API and on the dashboard.
    let (_, projects) = t.get("/v1/projects", &member).await;
    let names: Vec<&str> = projects["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["shop"]);
    let (status, html, _) = page(&t, "/ui/projects", &member).await;
    assert_eq!(status, 200);
    assert!(html.contains("shop") && !html.contains("blog"), "{html}");
    let (status, _) = t
        .get(&format!("/v1/projects/{}", project_ids[1]), &member)
        .await;
    assert_eq!(status, 404);
    // Servers are not among the role's permissions, nor roles: the pages refuse.
    for path in ["/ui/servers", "/ui/settings/roles"] {
        let (status, _, _) = page(&t, path, &member).await;
        assert_eq!(status, 403, "{path}");
    }
    // A forged role form from the member, with their own token, is refused and adds nothing.
    let (_, html, _) = page(&t, "/ui/projects", &member).await;
    let token = form_token(&html);
    let origin = t.plane.public_url().trim_end_matches('/').to_owned();
    let r = raw_client(&t)
        .post(t.url("/ui/settings/roles"))
        .header("cookie", &member)
        .header("origin", &origin)
        .form(&[
            ("csrf", token.as_str()),
            ("name", "mine"),
            ("permission", "servers:write"),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    let (_, roles) = t.get("/v1/roles", &owner).await;
    assert_eq!(roles["custom"].as_array().map(Vec::len), Some(1));
}
