//! What an operator needs: the deployment history and cursor pagination on every list,
//! idempotent retries, request ids and trusted proxies, the metrics an operator alerts on,
//! deployment-log retention, and a backup restored into a new cluster.

use std::collections::HashSet;

use sensei_e2e::{error_code, git_repo, open_tempdir, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";

fn email() -> String {
    format!("op{}@example.com", uuid::Uuid::new_v4().simple())
}

/// Follows `next_cursor` through a list with pages of `limit`; returns every item's id and
/// how many pages it took.
async fn walk(
    t: &TestPlane,
    cookie: &str,
    path: &str,
    field: &str,
    limit: usize,
) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            None => format!("{path}{sep}limit={limit}"),
            Some(c) => format!("{path}{sep}limit={limit}&cursor={c}"),
        };
        let (status, body) = t.get(&url, cookie).await;
        assert_eq!(status, 200, "{url}: {body}");
        let items = body[field].as_array().expect("items");
        assert!(items.len() <= limit, "{url}: a page larger than its limit");
        ids.extend(items.iter().map(|i| {
            i["id"]
                .as_str()
                .or_else(|| i["server_id"].as_str())
                .expect("id")
                .to_owned()
        }));
        pages += 1;
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return (ids, pages),
        }
        assert!(pages < 100, "pagination does not end");
    }
}

#[tokio::test]
async fn every_list_pages_with_a_cursor_without_repeats_or_gaps() {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup(&email(), PW).await;
    let mut servers = Vec::new();
    for i in 0..5 {
        let (id, _) = t
            .create_agent_server(&cookie, &format!("web-{i}"), json!({"tier": "web"}))
            .await;
        servers.push(id.to_string());
    }
    // One server outside the label filter.
    t.create_agent_server(&cookie, "db-1", json!({"tier": "db"}))
        .await;
    let (ids, pages) = walk(&t, &cookie, "/v1/servers?label=tier%3Dweb", "servers", 2).await;
    assert_eq!(
        ids, servers,
        "oldest first, each once, filter kept across pages"
    );
    assert_eq!(pages, 3);
    let (all, _) = walk(&t, &cookie, "/v1/servers", "servers", 4).await;
    assert_eq!(all.len(), 6);

    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let mut projects = Vec::new();
    for i in 0..3 {
        let (status, p) = t
            .post(
                "/v1/projects",
                &cookie,
                json!({"name": format!("p{i}"), "repo_url": repo.display().to_string(),
                       "deploy_path": dir.path().join(format!("app{i}")).display().to_string()}),
            )
            .await;
        assert_eq!(status, 201, "{p}");
        projects.push(p["id"].as_str().expect("id").to_owned());
    }
    let (ids, pages) = walk(&t, &cookie, "/v1/projects", "projects", 1).await;
    assert_eq!((ids, pages), (projects, 3));

    for i in 0..3 {
        let (status, _) = t
            .post(
                "/v1/invitations",
                &cookie,
                json!({"email": format!("inv{i}@example.com"), "role": "viewer"}),
            )
            .await;
        assert_eq!(status, 201);
        let (status, _) = t
            .post(
                "/v1/api-keys",
                &cookie,
                json!({"name": format!("k{i}"), "scopes": ["servers:read"]}),
            )
            .await;
        assert_eq!(status, 201);
    }
    for (path, field) in [
        ("/v1/invitations", "invitations"),
        ("/v1/api-keys", "api_keys"),
    ] {
        let (ids, pages) = walk(&t, &cookie, path, field, 2).await;
        assert_eq!(ids.len(), 3, "{path}");
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            3,
            "{path}: a repeat"
        );
        assert_eq!(pages, 2, "{path}");
    }
    let (members, _) = walk(&t, &cookie, "/v1/members", "members", 1).await;
    assert_eq!(members.len(), 1);

    // An id that is not one is named in the API's own error format.
    for path in [
        "/v1/servers/not-a-uuid",
        "/v1/deployments/42",
        "/v1/rollouts/x/targets",
    ] {
        let (status, body) = t.get(path, &cookie).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_id"),
            "{path}: {body}"
        );
    }
    // Bad limits and forged cursors get a clear error, and nothing else.
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=not-a-cursor",
        "cursor=AAAA",
    ] {
        for path in [
            "/v1/servers",
            "/v1/projects",
            "/v1/deployments",
            "/v1/rollouts",
            "/v1/members",
        ] {
            let (status, body) = t.get(&format!("{path}?{bad}"), &cookie).await;
            assert_eq!(status, 400, "{path}?{bad}: {body}");
            assert!(
                matches!(
                    error_code(&body),
                    "invalid_limit" | "invalid_cursor" | "invalid_filter"
                ),
                "{path}?{bad}: {body}"
            );
        }
    }
}

struct Fleet {
    t: TestPlane,
    cookie: String,
    project: String,
    agents: Vec<sensei_e2e::TestAgent>,
    _dir: tempfile::TempDir,
}

async fn fleet(n: usize) -> Fleet {
    let t = TestPlane::start().await;
    let (cookie, _) = t.signup(&email(), PW).await;
    let mut agents = Vec::new();
    for i in 0..n {
        agents.push(t.start_agent(&cookie, &format!("web-{i}")).await);
    }
    let dir = open_tempdir();
    let repo = git_repo(dir.path(), &["v1"]);
    let (status, p) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "site", "repo_url": repo.display().to_string(),
                   "deploy_path": dir.path().join("app").display().to_string()}),
        )
        .await;
    assert_eq!(status, 201, "{p}");
    for a in &agents {
        assert!(
            sensei_e2e::eventually(std::time::Duration::from_secs(30), || t
                .agent_connected(&cookie, a.server_id))
            .await
        );
    }
    Fleet {
        project: p["id"].as_str().expect("id").to_owned(),
        t,
        cookie,
        agents,
        _dir: dir,
    }
}

impl Fleet {
    async fn post_with_key(&self, path: &str, key: &str, body: Value) -> (u16, Value, bool) {
        let r = self
            .t
            .http
            .post(self.t.url(path))
            .header("cookie", &self.cookie)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .expect("request");
        let replayed = r.headers().get("idempotent-replayed").is_some();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null), replayed)
    }
}

#[tokio::test]
async fn a_retried_deploy_rollback_or_rollout_with_its_key_queues_nothing_new() {
    let f = fleet(1).await;
    let server = f.agents[0].server_id.to_string();
    let body = json!({"project_id": f.project, "server_id": server, "ref": "main"});
    let (status, first, replayed) = f
        .post_with_key("/v1/deployments", "deploy-1", body.clone())
        .await;
    assert_eq!((status, replayed), (201, false), "{first}");
    let (status, again, replayed) = f
        .post_with_key("/v1/deployments", "deploy-1", body.clone())
        .await;
    assert_eq!((status, replayed), (201, true), "{again}");
    assert_eq!(
        again["id"], first["id"],
        "the retry answers the first deployment"
    );
    assert_eq!(f.t.count("SELECT count(*) FROM deployments").await, 1);
    // The same key for another request is refused, and queues nothing.
    let (status, err, _) = f
        .post_with_key(
            "/v1/deployments",
            "deploy-1",
            json!({"project_id": f.project, "server_id": server, "ref": "other"}),
        )
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(error_code(&err), "idempotency_key_reused");
    assert_eq!(f.t.count("SELECT count(*) FROM deployments").await, 1);
    // A malformed key is refused before anything happens.
    let (status, err, _) = f
        .post_with_key("/v1/deployments", "has space", body.clone())
        .await;
    assert_eq!((status, error_code(&err)), (422, "invalid_idempotency_key"));
    let id = first["id"].as_str().expect("id");
    let done = f.t.wait_deployment(&f.cookie, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    let path = format!("/v1/deployments/{id}/rollback");
    let (status, rb, _) = f.post_with_key(&path, "rb-1", json!({})).await;
    assert_eq!(status, 201, "{rb}");
    let (status, rb2, replayed) = f.post_with_key(&path, "rb-1", json!({})).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(rb2["id"], rb["id"]);
    assert_eq!(
        f.t.count("SELECT count(*) FROM deployments WHERE kind = 'rollback'")
            .await,
        1
    );

    let rollout = json!({"project_id": f.project, "ref": "main", "server_ids": [server]});
    let (status, r1, _) = f
        .post_with_key("/v1/rollouts", "ro-1", rollout.clone())
        .await;
    assert_eq!(status, 201, "{r1}");
    let (status, r2, replayed) = f.post_with_key("/v1/rollouts", "ro-1", rollout).await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(r2["id"], r1["id"]);
    assert_eq!(f.t.count("SELECT count(*) FROM rollouts").await, 1);
    // Keys are per account: another account's identical key is its own.
    let (other, _) = f.t.signup(&email(), PW).await;
    let r =
        f.t.http
            .post(f.t.url("/v1/rollouts"))
            .header("cookie", &other)
            .header("idempotency-key", "ro-1")
            .json(&json!({"project_id": f.project, "ref": "main", "server_ids": [server]}))
            .send()
            .await
            .expect("request");
    assert_eq!(r.status(), 404, "another account sees nothing of this one");
}

#[tokio::test]
async fn the_deployment_history_filters_and_says_who_what_and_which_rollout() {
    let f = fleet(2).await;
    let (s0, s1) = (
        f.agents[0].server_id.to_string(),
        f.agents[1].server_id.to_string(),
    );
    let mut single = Vec::new();
    for _ in 0..3 {
        let (status, d) =
            f.t.post(
                "/v1/deployments",
                &f.cookie,
                json!({"project_id": f.project, "server_id": s0, "ref": "main"}),
            )
            .await;
        assert_eq!(status, 201, "{d}");
        single.push(d["id"].as_str().expect("id").to_owned());
    }
    for id in &single {
        f.t.wait_deployment(&f.cookie, id).await;
    }
    let (status, rollout) =
        f.t.post(
            "/v1/rollouts",
            &f.cookie,
            json!({"project_id": f.project, "ref": "main", "server_ids": [s1],
                   "strategy": {"canary": 0}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rollout_id = rollout["id"].as_str().expect("id").to_owned();
    let (_, me) = f.t.get("/v1/auth/me", &f.cookie).await;
    assert!(
        sensei_e2e::eventually(std::time::Duration::from_secs(60), || async {
            let (_, r) =
                f.t.get(&format!("/v1/rollouts/{rollout_id}"), &f.cookie)
                    .await;
            r["state"] == "succeeded"
        })
        .await
    );

    // Newest first; the three on server 0 in reverse order of queueing.
    let (_, list) =
        f.t.get(&format!("/v1/deployments?server_id={s0}"), &f.cookie)
            .await;
    let ids: Vec<&str> = list["deployments"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["id"].as_str().expect("id"))
        .collect();
    let expected: Vec<&str> = single.iter().rev().map(String::as_str).collect();
    assert_eq!(ids, expected);
    let d = &list["deployments"][0];
    assert_eq!(d["status"], "succeeded");
    assert_eq!(d["queued_by"]["user_id"], me["user"]["id"], "{d}");
    assert!(d["queued_by"]["email"]
        .as_str()
        .is_some_and(|e| e.contains('@')));
    assert!(d["commit"].as_str().is_some_and(|c| c.len() == 40), "{d}");
    assert!(d["release_id"].as_str().is_some());
    assert!(d["duration_secs"].as_f64().is_some_and(|s| s >= 0.0), "{d}");
    assert!(d["rollout_id"].is_null());

    let (_, by_rollout) =
        f.t.get(
            &format!("/v1/deployments?rollout_id={rollout_id}"),
            &f.cookie,
        )
        .await;
    let by_rollout = by_rollout["deployments"].as_array().expect("list");
    assert_eq!(by_rollout.len(), 1);
    assert_eq!(by_rollout[0]["server_id"], s1.as_str());
    assert_eq!(by_rollout[0]["rollout_id"], rollout_id.as_str());

    let (_, ok) =
        f.t.get("/v1/deployments?status=succeeded&kind=deploy", &f.cookie)
            .await;
    assert_eq!(ok["deployments"].as_array().map(Vec::len), Some(4));
    let (_, none) = f.t.get("/v1/deployments?status=failed", &f.cookie).await;
    assert_eq!(none["deployments"].as_array().map(Vec::len), Some(0));
    let future = "2999-01-01T00:00:00Z";
    let (_, late) =
        f.t.get(&format!("/v1/deployments?since={future}"), &f.cookie)
            .await;
    assert_eq!(late["deployments"].as_array().map(Vec::len), Some(0));
    let (_, early) =
        f.t.get(&format!("/v1/deployments?until={future}"), &f.cookie)
            .await;
    assert_eq!(early["deployments"].as_array().map(Vec::len), Some(4));
    let (ids, pages) = walk(&f.t, &f.cookie, "/v1/deployments", "deployments", 3).await;
    assert_eq!((ids.len(), pages), (4, 2));
    for bad in [
        "status=done",
        "kind=deploys",
        "server_id=not-a-uuid",
        "colour=red",
    ] {
        let (status, body) = f.t.get(&format!("/v1/deployments?{bad}"), &f.cookie).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(error_code(&body), "invalid_filter", "{bad}");
    }
    // The rollout's own view carries target counts, and its targets page too.
    let (_, rollouts) = f.t.get("/v1/rollouts", &f.cookie).await;
    assert_eq!(rollouts["rollouts"][0]["target_counts"]["succeeded"], 1);
    assert!(
        rollouts["rollouts"][0].get("targets").is_none(),
        "lists leave targets out"
    );
    let (targets, _) = walk(
        &f.t,
        &f.cookie,
        &format!("/v1/rollouts/{rollout_id}/targets"),
        "targets",
        1,
    )
    .await;
    assert_eq!(targets, vec![s1]);
    // Another account sees none of it.
    let (other, _) = f.t.signup(&email(), PW).await;
    let (_, theirs) = f.t.get("/v1/deployments", &other).await;
    assert_eq!(theirs["deployments"].as_array().map(Vec::len), Some(0));
    let (status, _) =
        f.t.get(&format!("/v1/rollouts/{rollout_id}/targets"), &other)
            .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn request_ids_are_answered_and_proxies_are_believed_only_when_trusted() {
    let t = TestPlane::start().await;
    let r = t
        .http
        .get(t.url("/v1/servers"))
        .header("x-request-id", "client-chosen-id")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    assert_ne!(
        id, "client-chosen-id",
        "an untrusted client cannot pick its request id"
    );
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["request_id"], id.as_str(), "{body}");

    // An untrusted peer's X-Forwarded-For is ignored: the audit row names the real peer.
    let mail = email();
    let r = t
        .http
        .post(t.url("/v1/auth/signup"))
        .header("x-forwarded-for", "203.0.113.77")
        .json(&json!({"email": mail, "password": PW, "account_name": "A"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
    let ip: String = t
        .db()
        .await
        .query_one(
            "SELECT client_ip FROM audit_log WHERE action = 'account.created' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("audit")
        .get(0);
    assert_eq!(ip, "127.0.0.1");

    // Behind a trusted proxy (loopback here), the forwarded client is the client.
    let proxied = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| o.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")],
    )
    .await;
    let r = proxied
        .http
        .post(proxied.url("/v1/auth/signup"))
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.77")
        .header("x-request-id", "lb-assigned-42")
        .json(&json!({"email": email(), "password": PW, "account_name": "B"}))
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-request-id"], "lb-assigned-42");
    let ip: String = proxied
        .db()
        .await
        .query_one(
            "SELECT client_ip FROM audit_log WHERE action = 'account.created' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("audit")
        .get(0);
    assert_eq!(ip, "203.0.113.77", "the nearest hop the trusted proxy saw");
    // An API key allowed only from that address works through the proxy and not without.
    let cookie = proxied.login(&proxied_email(&proxied).await, PW).await;
    let (status, key) = proxied
        .post(
            "/v1/api-keys",
            &cookie,
            json!({"name": "ci", "scopes": ["servers:read"], "ip_allowlist": ["203.0.113.0/24"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let secret = key["secret"].as_str().expect("secret");
    let through = proxied
        .http
        .get(proxied.url("/v1/servers"))
        .bearer_auth(secret)
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .expect("request");
    assert_eq!(through.status(), 200);
    let direct = proxied.get_with_key("/v1/servers", secret).await;
    assert_eq!(
        direct.0, 403,
        "from the proxy's own address the key is refused"
    );
}

/// The email of the account signed up last on `t`.
async fn proxied_email(t: &TestPlane) -> String {
    t.db()
        .await
        .query_one(
            "SELECT email FROM users ORDER BY created_at DESC LIMIT 1",
            &[],
        )
        .await
        .expect("user")
        .get(0)
}

#[tokio::test]
async fn metrics_show_the_fleet_and_can_require_a_token_and_a_listener_of_their_own() {
    let f = fleet(1).await;
    let text =
        f.t.http
            .get(f.t.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
    for needle in [
        "sensei_agents_connected 1",
        "sensei_agent_certificates_expiring_30d 0",
        "sensei_agent_certificates_expiring_7d 0",
        "sensei_ssh_jobs_in_flight 0",
        "sensei_password_hash_queue 0",
        "sensei_metrics_database_up 1",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "sensei_build_info{version=\"",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    // A certificate that expires within 30 days is counted.
    f.t.db()
        .await
        .execute(
            "UPDATE agent_certificates SET not_after = now() + interval '10 days'",
            &[],
        )
        .await
        .expect("age the certificate");
    let text =
        f.t.http
            .get(f.t.url("/metrics"))
            .send()
            .await
            .expect("m")
            .text()
            .await
            .expect("t");
    assert!(
        text.contains("sensei_agent_certificates_expiring_30d 1"),
        "{text}"
    );
    assert!(
        text.contains("sensei_agent_certificates_expiring_7d 0"),
        "{text}"
    );

    let token = "metrics-bearer-token-for-the-test";
    let guarded = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| {
            o.metrics_token = Some(token.into());
            o.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        },
    )
    .await;
    // Not on the API listener any more.
    let r = guarded
        .http
        .get(guarded.url("/metrics"))
        .send()
        .await
        .expect("m");
    assert_eq!(r.status(), 404);
    let addr = guarded.plane.metrics_addr().expect("metrics listener");
    let url = format!("https://localhost:{}/metrics", addr.port());
    let r = guarded.http.get(&url).send().await.expect("m");
    assert_eq!(r.status(), 401, "no token");
    let r = guarded
        .http
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .expect("m");
    assert_eq!(r.status(), 401, "a wrong token");
    let r = guarded
        .http
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .expect("m");
    assert_eq!(r.status(), 200);
    assert!(r.text().await.expect("t").contains("sensei_build_info"));
    // The metrics listener serves nothing else.
    let other = format!("https://localhost:{}/v1/servers", addr.port());
    assert_eq!(
        guarded.http.get(&other).send().await.expect("r").status(),
        404
    );
}

#[tokio::test]
async fn deployment_logs_expire_by_the_accounts_retention_and_nothing_else_does() {
    let f = fleet(1).await;
    let server = f.agents[0].server_id.to_string();
    let (_, d) =
        f.t.post(
            "/v1/deployments",
            &f.cookie,
            json!({"project_id": f.project, "server_id": server, "ref": "main"}),
        )
        .await;
    let id = d["id"].as_str().expect("id").to_owned();
    f.t.wait_deployment(&f.cookie, &id).await;
    let db = f.t.db().await;
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.query_one(sql, &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    let total = count("SELECT count(*) FROM deployment_logs").await;
    assert!(total > 3);
    // Retention is validated.
    for bad in [0, 2558] {
        let r =
            f.t.http
                .patch(f.t.url("/v1/account"))
                .header("cookie", &f.cookie)
                .json(&json!({"deploy_log_retention_days": bad}))
                .send()
                .await
                .expect("patch");
        assert_eq!(r.status(), 422);
        let body: Value = r.json().await.expect("json");
        assert_eq!(error_code(&body), "invalid_log_retention");
    }
    let r =
        f.t.http
            .patch(f.t.url("/v1/account"))
            .header("cookie", &f.cookie)
            .json(&json!({"deploy_log_retention_days": 7}))
            .send()
            .await
            .expect("patch");
    assert_eq!(r.status(), 200);
    let settings: Value = r.json().await.expect("json");
    assert_eq!(settings["deploy_log_retention_days"], 7);
    // Half the lines are eight days old: past retention. The rest are fresh.
    db.execute(
        "UPDATE deployment_logs SET at = now() - interval '8 days' WHERE id IN \
         (SELECT id FROM deployment_logs ORDER BY id LIMIT (SELECT count(*) / 2 FROM deployment_logs))",
        &[],
    )
    .await
    .expect("age");
    let old =
        count("SELECT count(*) FROM deployment_logs WHERE at < now() - interval '7 days'").await;
    assert!(old > 0);
    let report = sensei_control_plane::app::maintenance::run_once(f.t.plane.pool(), &f.t.keys)
        .await
        .expect("housekeeping");
    assert_eq!(report.log_lines, u64::try_from(old).expect("count"));
    assert_eq!(
        count("SELECT count(*) FROM deployment_logs").await,
        total - old
    );
    // The deployment itself and the audit trail are untouched.
    let (_, kept) = f.t.get(&format!("/v1/deployments/{id}"), &f.cookie).await;
    assert_eq!(kept["status"], "succeeded");
    assert!(f
        .t
        .audit_actions()
        .await
        .contains(&"deployment.queued".to_owned()));
}

#[tokio::test]
async fn a_public_url_that_is_not_a_web_address_stops_the_start_with_its_name() {
    let conninfo = sensei_e2e::fresh_database().await;
    for bad in ["ftp://sensei.example.com", "sensei.example.com", "https://"] {
        let (options, _dir) = TestPlane::options(
            &conninfo,
            sensei_e2e::test_keys(),
            "127.0.0.1:0".parse().expect("addr"),
            |o| o.public_url = Some(bad.into()),
        );
        let refused = sensei_control_plane::ControlPlane::start(options).await;
        let message = match refused {
            Ok(_) => panic!("{bad}: the control plane started"),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains("public URL") && message.contains(bad),
            "{bad}: {message}"
        );
    }
    // The same database serves a plane with a good URL afterwards: nothing was left half-made.
    let t = TestPlane::start_configured(
        conninfo,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| o.public_url = Some("https://sensei.example.com/".into()),
    )
    .await;
    assert_eq!(t.plane.public_url(), "https://sensei.example.com");
}
