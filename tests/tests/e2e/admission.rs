//! Who gets in: the signup policy, `create-owner` and `invite-signup`, signups throttled per
//! address, enrollments throttled per address and per server, and an enrollment racing the
//! deletion of its server.

use std::process::Stdio;
use std::time::Duration;

use sensei_agent::enroll::{enroll, EnrollError};
use sensei_control_plane::identity::admission;
use sensei_control_plane::identity::signup::SignupPolicy;
use sensei_e2e::{control_plane_binary, error_code, open_tempdir, TestPlane};
use serde_json::{json, Value};
use uuid::Uuid;

const PW: &str = "correct horse battery";

async fn plane_with(adjust: impl FnOnce(&mut sensei_control_plane::ServeOptions)) -> TestPlane {
    TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        adjust,
    )
    .await
}

async fn signup_answer(t: &TestPlane, body: Value) -> (u16, Value) {
    let r = t
        .http
        .post(t.url("/v1/auth/signup"))
        .json(&body)
        .send()
        .await
        .expect("signup");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn count(t: &TestPlane, sql: &str) -> i64 {
    t.db()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

/// Runs `sensei-control-plane ARGS` against the plane's database, as its operator would.
async fn operator(t: &TestPlane, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let stdin = stdin.map(str::to_owned);
    let (app, owner) = (sensei_e2e::app_conninfo(&t.conninfo), t.conninfo.clone());
    let data_dir = open_tempdir();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new(control_plane_binary())
            .env("CODESENSEI_FIELD_KEY", sensei_e2e::test_field_key())
            .env("DATABASE_URL", app)
            .env("DATABASE_OWNER_URL", owner)
            .env_remove("SENSEI_AUDIT_KEY")
            .env_remove("SENSEI_PUBLIC_URL")
            .args(["--data-dir", &data_dir.path().display().to_string()])
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
        drop(input);
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn signup_is_closed_by_default_and_create_owner_makes_the_first_owner() {
    let t = plane_with(|o| o.signup = SignupPolicy::Closed).await;
    assert_eq!(
        sensei_control_plane::ServeOptions::new(
            "/x".into(),
            sensei_control_plane::DatabaseSource::Embedded,
            sensei_e2e::test_keys()
        )
        .signup,
        SignupPolicy::Closed,
        "closed is the default"
    );
    let (status, body) = signup_answer(
        &t,
        json!({"email": "stranger@example.com", "password": PW, "account_name": "S"}),
    )
    .await;
    assert_eq!(
        (status, error_code(&body)),
        (403, "signup_closed"),
        "{body}"
    );
    assert_eq!(count(&t, "SELECT count(*) FROM accounts").await, 0);
    assert_eq!(count(&t, "SELECT count(*) FROM users").await, 0);

    // The operator makes the first owner, with a password from standard input.
    let (code, stdout, stderr) = operator(
        &t,
        &[
            "create-owner",
            "--email",
            "ops@example.com",
            "--account",
            "Ops",
            "--password-stdin",
        ],
        Some(&format!("{PW}\n")),
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("create-owner: account"), "{stdout}");
    assert!(
        !stdout.contains(PW) && !stderr.contains(PW),
        "the password is not echoed"
    );
    let cookie = t.login("ops@example.com", PW).await;
    let (status, me) = t.get("/v1/auth/me", &cookie).await;
    assert_eq!(status, 200);
    assert_eq!(me["user"]["role"], "owner");

    // Without a password: a single-use token sets it.
    let (code, stdout, stderr) = operator(
        &t,
        &[
            "create-owner",
            "--email",
            "second@example.com",
            "--account",
            "Second",
            "--public-url",
            "https://sensei.example",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("https://sensei.example/v1/auth/password-reset/confirm"),
        "{stdout}"
    );
    let token = stdout
        .split_whitespace()
        .find(|w| w.starts_with("pr_"))
        .expect("a password-setting token")
        .to_owned();
    let r = t
        .http
        .post(t.url("/v1/auth/password-reset/confirm"))
        .json(&json!({"token": token, "password": "the second owner's password"}))
        .send()
        .await
        .expect("confirm");
    assert_eq!(r.status(), 204);
    t.login("second@example.com", "the second owner's password")
        .await;

    // A taken email, a weak password: refused, nothing written.
    let accounts = count(&t, "SELECT count(*) FROM accounts").await;
    let (code, _, stderr) = operator(
        &t,
        &[
            "create-owner",
            "--email",
            "OPS@example.com",
            "--account",
            "Again",
            "--password-stdin",
        ],
        Some(&format!("{PW}\n")),
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("already exists"), "{stderr}");
    let (code, _, stderr) = operator(
        &t,
        &[
            "create-owner",
            "--email",
            "weak@example.com",
            "--account",
            "W",
            "--password-stdin",
        ],
        Some("short\n"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("password"), "{stderr}");
    assert_eq!(count(&t, "SELECT count(*) FROM accounts").await, accounts);
    let created: Vec<String> = t
        .db()
        .await
        .query(
            "SELECT actor_type FROM audit_log WHERE action = 'account.created' ORDER BY id",
            &[],
        )
        .await
        .expect("audit")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        created,
        ["system", "system"],
        "the operator's accounts are audited"
    );
}

#[tokio::test]
async fn invite_only_signup_takes_one_account_per_invitation() {
    let t = plane_with(|o| o.signup = SignupPolicy::InviteOnly).await;
    let body = |email: &str, invitation: Option<&str>| {
        let mut b = json!({"email": email, "password": PW, "account_name": "Invited"});
        if let Some(i) = invitation {
            b["signup_invitation"] = json!(i);
        }
        b
    };
    let (status, answer) = signup_answer(&t, body("a@example.com", None)).await;
    assert_eq!(
        (status, error_code(&answer)),
        (403, "signup_invitation_required")
    );
    let forged = format!("su_{}_{}", Uuid::new_v4().simple(), "A".repeat(43));
    let (status, answer) = signup_answer(&t, body("a@example.com", Some(&forged))).await;
    assert_eq!((status, error_code(&answer)), (400, "invalid_token"));

    let (code, stdout, stderr) = operator(
        &t,
        &["invite-signup", "--valid-hours", "2", "--note", "for Ada"],
        None,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let invitation = stdout.trim().to_owned();
    assert!(invitation.starts_with("su_"), "{stdout}");
    let (status, answer) = signup_answer(&t, body("a@example.com", Some(&invitation))).await;
    assert_eq!(status, 201, "{answer}");
    // Single use: a second account with the same invitation is refused.
    let (status, answer) = signup_answer(&t, body("b@example.com", Some(&invitation))).await;
    assert_eq!((status, error_code(&answer)), (400, "invalid_token"));
    assert_eq!(count(&t, "SELECT count(*) FROM accounts").await, 1);
    let used = count(
        &t,
        "SELECT count(*) FROM signup_invitations WHERE used_at IS NOT NULL AND account_id IS NOT NULL",
    )
    .await;
    assert_eq!(used, 1);
    // An expired one is refused too.
    let (_, stdout, _) = operator(&t, &["invite-signup"], None).await;
    t.db()
        .await
        .execute(
            "UPDATE signup_invitations SET expires_at = now() - interval '1 second' WHERE used_at IS NULL",
            &[],
        )
        .await
        .expect("expire");
    let (status, answer) = signup_answer(&t, body("c@example.com", Some(stdout.trim()))).await;
    assert_eq!((status, error_code(&answer)), (400, "invalid_token"));
}

#[tokio::test]
async fn a_burst_of_signups_from_one_address_gets_the_limit_through_and_hashes_no_more() {
    // Behind a trusted proxy (loopback), so that the test can speak for several addresses.
    let t = plane_with(|o| o.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")]).await;
    let before = t.metric("sensei_password_hashes_total").await as u64;
    let burst = (0..16).map(|i| {
        let (http, url) = (t.http.clone(), t.url("/v1/auth/signup"));
        tokio::spawn(async move {
            let r = http
                .post(url)
                .header("x-forwarded-for", "203.0.113.9")
                .json(&json!({"email": format!("flood{i}@example.com"), "password": PW, "account_name": "F"}))
                .send()
                .await
                .expect("signup");
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").is_some();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&body).to_owned(), retry)
        })
    });
    let (mut created, mut refused) = (0, 0);
    for answer in burst {
        match answer.await.expect("task") {
            (201, _, _) => created += 1,
            (429, code, true) if code == "too_many_signups" => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    println!("16 parallel signups from one address: {created} created, {refused} refused");
    assert_eq!(created, admission::SIGNUP_PER_ADDRESS.max);
    assert_eq!(created + refused, 16);
    assert_eq!(
        (t.metric("sensei_password_hashes_total").await as u64) - before,
        created as u64,
        "a refused signup hashes nothing"
    );
    assert_eq!(count(&t, "SELECT count(*) FROM accounts").await, created);
    // The same /64 is the same client; another address is not held back.
    let r = t
        .http
        .post(t.url("/v1/auth/signup"))
        .header("x-forwarded-for", "198.51.100.20")
        .json(&json!({"email": "elsewhere@example.com", "password": PW, "account_name": "E"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
}

fn refusal(r: Result<sensei_agent::identity::Identity, EnrollError>) -> String {
    match r {
        Err(EnrollError::Refused(reason)) => reason,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got an identity"),
    }
}

async fn refusal_rows(t: &TestPlane, throttled: bool) -> i64 {
    t.db()
        .await
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'agent.enrollment_refused' \
             AND (metadata->>'throttled')::boolean = $1",
            &[&throttled],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test]
async fn enrollment_floods_are_throttled_per_address_and_per_server_and_audited_once() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("enroll-flood@example.com", PW).await;
    let dir = open_tempdir();

    // Guessing tokens from one address.
    for _ in 0..admission::ENROLL_PER_ADDRESS.max {
        let forged = format!("et_{}_{}", Uuid::new_v4().simple(), "A".repeat(43));
        let reason = refusal(enroll(&t.enroll_options(&forged, dir.path())).await);
        assert_eq!(reason, "unknown enrollment token");
    }
    let (_, good) = t.create_agent_server(&cookie, "good", json!({})).await;
    for _ in 0..5 {
        let reason = refusal(enroll(&t.enroll_options(&good, dir.path())).await);
        assert!(
            reason.contains("too many failed enrollments from this address"),
            "{reason}"
        );
    }
    assert_eq!(
        refusal_rows(&t, false).await,
        admission::ENROLL_PER_ADDRESS.max
    );
    assert_eq!(
        refusal_rows(&t, true).await,
        1,
        "a throttled address is audited once"
    );
    assert_eq!(
        count(&t, "SELECT count(*) FROM agent_certificates").await,
        0
    );
    // The window passes (here: its rows are forgotten); the good token still works once.
    t.db()
        .await
        .execute("DELETE FROM admission_attempts", &[])
        .await
        .expect("forget");
    let enrolled_dir = open_tempdir();
    enroll(&t.enroll_options(&good, enrolled_dir.path()))
        .await
        .expect("the good token, once the address is let through");

    // A spent token replayed: counted against its server, from any address.
    for _ in 0..admission::ENROLL_PER_SERVER.max {
        let reason = refusal(enroll(&t.enroll_options(&good, dir.path())).await);
        assert!(reason.contains("already used"), "{reason}");
    }
    let reason = refusal(enroll(&t.enroll_options(&good, dir.path())).await);
    assert!(
        reason.contains("too many failed enrollments for this server"),
        "{reason}"
    );
    // Another server enrolls meanwhile: the address is under its own limit.
    let (_, other) = t.create_agent_server(&cookie, "other", json!({})).await;
    enroll(&t.enroll_options(&other, open_tempdir().path()))
        .await
        .expect("another server enrolls");
    assert_eq!(refusal_rows(&t, true).await, 2);
    assert_eq!(
        count(&t, "SELECT count(*) FROM agent_certificates").await,
        2
    );
}

#[tokio::test]
async fn an_enrollment_racing_its_servers_deletion_leaves_no_valid_certificate() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup("race@example.com", PW).await;
    let (server, token) = t.create_agent_server(&cookie, "doomed", json!({})).await;
    // The deletion has begun: it holds the server's row, as DELETE /v1/servers/{id} does.
    let mut deleter = t.db().await;
    let tx = deleter.transaction().await.expect("tx");
    tx.execute("SELECT 1 FROM servers WHERE id = $1 FOR UPDATE", &[&server])
        .await
        .expect("lock");
    let dir = open_tempdir();
    let options = t.enroll_options(&token, dir.path());
    let enrolling = tokio::spawn(async move { enroll(&options).await });
    // The enrollment must wait for the deletion, not slip past it.
    let waiting = sensei_e2e::eventually(Duration::from_secs(30), || async {
        t.db()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND datname = current_database() \
                 AND query LIKE '%FROM servers WHERE id = $1 FOR UPDATE%'",
                &[],
            )
            .await
            .expect("activity")
            .get::<_, i64>(0)
            == 1
    })
    .await;
    assert!(waiting, "the enrollment did not wait for the server's row");
    assert!(!enrolling.is_finished());
    // The rest of the deletion, then its commit.
    tx.execute(
        "DELETE FROM enrollment_tokens WHERE server_id = $1",
        &[&server],
    )
    .await
    .expect("tokens");
    tx.execute(
        "UPDATE servers SET deleted_at = now() WHERE id = $1",
        &[&server],
    )
    .await
    .expect("delete");
    tx.commit().await.expect("commit");
    let reason = refusal(enrolling.await.expect("join"));
    assert_eq!(reason, "unknown enrollment token");
    let certs: i64 = t
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM agent_certificates WHERE server_id = $1",
            &[&server],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(certs, 0, "a deleted server has no certificate");
}

#[tokio::test]
async fn one_signup_invitation_spent_by_parallel_signups_makes_one_account() {
    let t = plane_with(|o| o.signup = SignupPolicy::InviteOnly).await;
    let invitation = sensei_control_plane::identity::signup::issue_invitation(
        t.plane.pool(),
        &t.keys,
        Duration::from_secs(3600),
        "raced",
    )
    .await
    .expect("invitation");
    let racers = (0..8).map(|i| {
        let (http, url, invitation) =
            (t.http.clone(), t.url("/v1/auth/signup"), invitation.clone());
        tokio::spawn(async move {
            let r = http
                .post(url)
                .json(
                    &json!({"email": format!("racer{i}@example.com"), "password": PW,
                              "account_name": "R", "signup_invitation": invitation}),
                )
                .send()
                .await
                .expect("signup");
            r.status().as_u16()
        })
    });
    let mut statuses = Vec::new();
    for r in racers {
        statuses.push(r.await.expect("task"));
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 400, 400, 400, 400, 400, 400, 400]);
    assert_eq!(count(&t, "SELECT count(*) FROM accounts").await, 1);
}
