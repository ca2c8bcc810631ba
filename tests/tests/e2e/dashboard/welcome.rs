//! The pages for people not signed in: creating an account where signups are open, a
//! password reset whose link arrives by real SMTP, and accepting an invitation from its
//! emailed link. The token travels in the link's fragment; the page's script puts it in
//! the form.

use std::time::Duration;

use sensei_e2e::browser::Browser;
use sensei_e2e::{eventually, fresh_database, test_keys, unfold, SmtpSink, TestPlane};
use serde_json::json;

use super::{page, session_valid, PW};

/// The dashboard link in the newest email whose body holds `page`.
async fn emailed_link(smtp: &SmtpSink, count: usize, page: &str) -> String {
    assert!(
        eventually(Duration::from_secs(15), || async {
            smtp.messages().len() >= count
        })
        .await,
        "email {count} did not arrive"
    );
    smtp.messages()
        .iter()
        .map(|m| unfold(m))
        .flat_map(|m| {
            m.split_whitespace()
                .filter(|w| w.contains(&format!("{page}#token=")))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .last()
        .unwrap_or_else(|| panic!("no link to {page} in the email"))
}

/// The link's path and fragment: it names the public URL, and the browser reaches the same
/// plane at `t.base`.
fn on_base(link: &str) -> String {
    let url = reqwest::Url::parse(link).expect("a URL");
    format!("{}#{}", url.path(), url.fragment().expect("a fragment"))
}

#[tokio::test]
async fn an_account_is_created_a_password_reset_and_an_invitation_accepted_from_the_pages() {
    let smtp = SmtpSink::start();
    let url = smtp.url();
    let t = TestPlane::start_configured(
        fresh_database().await,
        test_keys(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        move |o| {
            o.mail.smtp_url = Some(url);
            o.mail.from = Some("Sensei <noreply@sensei.example>".into());
        },
    )
    .await;
    let email = "founder@example.com";
    let b = Browser::start(&t.base).await;

    // The first owner, from the sign-up page (signups are open on this plane).
    b.open("/ui/sign-in").await;
    b.click("#to-sign-up").await;
    b.fill("#account_name", "Acme").await;
    b.fill("#email", email).await;
    b.fill("#password", PW).await;
    b.screenshot("sign-up").await;
    b.click("#sign-up").await;
    b.wait_path("/ui/servers").await;
    let first_session = b.session_cookie().await;
    let (_, me) = t.get("/v1/auth/me", &first_session).await;
    assert_eq!(me["user"]["role"], "owner", "{me}");
    // The same address again: the API's answer, on the page, and no second account.
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    b.open("/ui/sign-up").await;
    b.fill("#account_name", "Other").await;
    b.fill("#email", email).await;
    b.fill("#password", PW).await;
    b.click("#sign-up").await;
    b.wait_text("#form-error", |text| text.contains("already exists"))
        .await;
    let accounts: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(accounts, 1);

    // A password reset: asked for on the page, the link by email, the new password set.
    let second_session = t.login(email, PW).await;
    b.open("/ui/sign-in").await;
    b.click("#forgot").await;
    b.fill("#email", email).await;
    b.click("#request-reset").await;
    b.wait_text("#reset-sent", |text| {
        text.contains("if this address has an account")
    })
    .await;
    let link = emailed_link(&smtp, 1, "/ui/reset-password/confirm").await;
    let link = on_base(&link);
    b.open(&link).await;
    let token_field = b.wait_for("#token").await;
    let token = link.split("#token=").nth(1).expect("token");
    assert!(
        eventually(Duration::from_secs(10), || async {
            token_field.value().await.ok().flatten().as_deref() == Some(token)
        })
        .await,
        "the script did not fill the token in"
    );
    // …and took it out of the address bar.
    let shown = b.driver.current_url().await.expect("url");
    assert_eq!(shown.fragment(), None, "{shown}");
    let new_password = "a brand new passphrase";
    b.fill("#password", new_password).await;
    b.click("#set-password").await;
    b.wait_path("/ui/sign-in").await;
    b.wait_text(".notice", |text| text.contains("password is set"))
        .await;
    // Every session of the user ended; the new password signs in, the old one does not.
    assert!(!session_valid(&t, &first_session).await);
    assert!(!session_valid(&t, &second_session).await);
    b.fill("#email", email).await;
    b.fill("#password", PW).await;
    b.click("#sign-in").await;
    b.wait_for("#sign-in-error").await;
    b.fill("#email", email).await;
    b.fill("#password", new_password).await;
    b.click("#sign-in").await;
    b.wait_path("/ui/servers").await;
    let owner = b.session_cookie().await;
    // The link works once: used again, it is refused and changes nothing.
    b.open(&link).await;
    b.wait_for("#token").await;
    b.fill("#token", token).await;
    b.fill("#password", "yet another passphrase").await;
    b.click("#set-password").await;
    b.wait_text("#form-error", |text| text.contains("not valid"))
        .await;
    assert!(session_valid(&t, &owner).await);

    // An invitation: the emailed link, a password, and the newcomer is in with their role.
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &owner,
            json!({"email": "newcomer@example.com", "role": "operator"}),
        )
        .await;
    assert_eq!(status, 201, "{inv}");
    let link = emailed_link(&smtp, 2, "/ui/invitation").await;
    let link = on_base(&link);
    b.open("/ui/servers").await;
    b.click("#sign-out").await;
    b.wait_path("/ui/sign-in").await;
    b.open(&link).await;
    b.wait_for("#token").await;
    b.fill("#password", "short").await;
    // The browser's own check stops a too-short password; the API's stops what gets past it.
    b.driver
        .execute(
            "document.getElementById('password').removeAttribute('minlength')",
            vec![],
        )
        .await
        .expect("script");
    b.click("#accept-invitation").await;
    b.wait_text("#form-error", |text| text.contains("password"))
        .await;
    b.fill("#password", PW).await;
    b.click("#accept-invitation").await;
    b.wait_path("/ui/servers").await;
    let newcomer = b.session_cookie().await;
    let (_, me) = t.get("/v1/auth/me", &newcomer).await;
    assert_eq!(me["user"]["email"], "newcomer@example.com", "{me}");
    assert_eq!(me["user"]["role"], "operator", "{me}");
    let violations = b.csp_violations().await;
    assert!(violations.is_empty(), "{violations:?}");
    b.close().await;

    // Forms from another origin are refused before anything happens.
    let r = super::raw_client(&t)
        .post(t.url("/ui/reset-password"))
        .header("origin", "https://evil.example")
        .form(&[("email", email)])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert_eq!(smtp.messages().len(), 2, "no mail for a cross-site request");
}

#[tokio::test]
async fn a_closed_plane_has_no_sign_up_page() {
    let t = TestPlane::start_configured(
        fresh_database().await,
        test_keys(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        |o| o.signup = sensei_control_plane::identity::signup::SignupPolicy::Closed,
    )
    .await;
    let (status, html, _) = page(&t, "/ui/sign-up", "").await;
    assert_eq!(status, 404, "{html}");
    let (_, sign_in, _) = page(&t, "/ui/sign-in", "").await;
    assert!(!sign_in.contains("/ui/sign-up"));
    assert!(sign_in.contains("/ui/reset-password"));
    let r = super::raw_client(&t)
        .post(t.url("/ui/sign-up"))
        .header("origin", t.plane.public_url().trim_end_matches('/'))
        .form(&[
            ("account_name", "X"),
            ("email", "x@example.com"),
            ("password", PW),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let accounts: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(accounts, 0);
}
