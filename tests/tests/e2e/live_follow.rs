//! Live-follow streams: pushed by PostgreSQL notifications (whichever replica writes the
//! row), resumed with `Last-Event-ID`, kept alive while quiet, and capped per user and per
//! replica.

use std::time::Duration;

use sensei_agent::enroll::enroll;
use sensei_e2e::{error_code, open_tempdir, TestPlane};
use serde_json::{json, Value};

const PW: &str = "correct horse battery";
/// A bound for a failing test, not a timing: events arrive in milliseconds.
const PATIENCE: Duration = Duration::from_secs(20);

async fn plane(keep_alive: Duration, max_streams: usize) -> TestPlane {
    TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        move |o| {
            o.live_keep_alive = keep_alive;
            o.max_live_streams = max_streams;
        },
    )
    .await
}

/// A tenant with an enrolled agent server (whose agent never connects) and a project: its
/// deployments stay queued until the test says otherwise.
struct Tenant {
    cookie: String,
    server: String,
    project: String,
    _dirs: Vec<tempfile::TempDir>,
}

async fn tenant(t: &TestPlane, email: &str) -> Tenant {
    let (cookie, _) = t.signup(email, PW).await;
    let (server, token) = t.create_agent_server(&cookie, "quiet", json!({})).await;
    let state = open_tempdir();
    enroll(&t.enroll_options(&token, state.path()))
        .await
        .expect("enroll");
    let repo_dir = open_tempdir();
    let repo = sensei_e2e::git_repo(repo_dir.path(), &["v1"]);
    let (status, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "live", "repo_url": repo.display().to_string(), "deploy_path": "/srv/live"}),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    Tenant {
        cookie,
        server: server.to_string(),
        project: project["id"].as_str().expect("id").to_owned(),
        _dirs: vec![state, repo_dir],
    }
}

async fn queued_deployment(t: &TestPlane, tenant: &Tenant) -> String {
    let (status, d) = t
        .post(
            "/v1/deployments",
            &tenant.cookie,
            json!({"project_id": tenant.project, "server_id": tenant.server, "ref": "main"}),
        )
        .await;
    assert_eq!(status, 201, "{d}");
    d["id"].as_str().expect("id").to_owned()
}

/// One server-sent event (or comment) as it arrived.
#[derive(Debug, Default, Clone)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    data: String,
    comment: Option<String>,
}

/// Reads a response's event stream one event at a time.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(t: &TestPlane, path: &str, cookie: &str, last_event_id: Option<&str>) -> Self {
        let mut request = t.http.get(t.url(path)).header("cookie", cookie);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.expect("follow");
        assert_eq!(response.status(), 200, "{path}");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        event.comment = Some(c.trim().to_owned());
                    } else if let Some((field, value)) = line.split_once(": ") {
                        match field {
                            "id" => event.id = Some(value.to_owned()),
                            "event" => event.event = Some(value.to_owned()),
                            "data" => event.data.push_str(value),
                            _ => {}
                        }
                    }
                }
                return Some(event);
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("the stream went silent")
                .expect("stream");
            match chunk {
                Some(bytes) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                None => return None,
            }
        }
    }

    /// The next event that is not a keep-alive.
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            let e = self.next().await?;
            if e.comment.is_none() {
                return Some(e);
            }
        }
    }
}

/// Writes a log line as another replica would: straight into the table.
async fn write_line(t: &TestPlane, deployment: &str, line: &str) {
    let id: uuid::Uuid = deployment.parse().expect("uuid");
    t.db()
        .await
        .execute(
            "INSERT INTO deployment_logs (deployment_id, stream, line) VALUES ($1, 1, $2)",
            &[&id, &line],
        )
        .await
        .expect("insert line");
}

#[tokio::test]
async fn log_lines_are_pushed_as_written_and_a_reconnect_resumes_after_the_last_seen() {
    // No keep-alive within the test: anything that arrives was pushed, not polled for.
    let t = plane(Duration::from_secs(3600), 64).await;
    let a = tenant(&t, "follow@example.com").await;
    let d = queued_deployment(&t, &a).await;
    let path = format!("/v1/deployments/{d}/logs?follow=true");
    let mut stream = EventStream::open(&t, &path, &a.cookie, None).await;
    write_line(&t, &d, "one").await;
    let one = stream.next_event().await.expect("line one");
    assert_eq!(one.event.as_deref(), Some("line"));
    assert!(one.data.contains("\"line\":\"one\""), "{one:?}");
    write_line(&t, &d, "two").await;
    let two = stream.next_event().await.expect("line two");
    assert!(two.data.contains("\"line\":\"two\""), "{two:?}");
    drop(stream);

    // The client lost the connection after "one": it resumes with "two".
    let mut resumed = EventStream::open(&t, &path, &a.cookie, one.id.as_deref()).await;
    let first = resumed.next_event().await.expect("resumed");
    assert_eq!(first.id, two.id, "{first:?}");
    // The end of the deployment ends the stream.
    let id: uuid::Uuid = d.parse().expect("uuid");
    t.db()
        .await
        .execute(
            "UPDATE deployments SET status = 'failed', error_step = 'dispatch', \
             error_message = 'test', finished_at = now() WHERE id = $1",
            &[&id],
        )
        .await
        .expect("finish");
    let end = resumed.next_event().await.expect("status");
    assert_eq!(end.event.as_deref(), Some("status"));
    assert!(end.data.contains("failed"));
    assert!(resumed.next().await.is_none(), "the stream ends");
}

#[tokio::test]
async fn quiet_streams_send_keep_alives_and_streams_are_capped_per_user_and_replica() {
    let t = plane(Duration::from_millis(200), 10).await;
    let a = tenant(&t, "cap-a@example.com").await;
    let b = tenant(&t, "cap-b@example.com").await;
    let (da, db) = (
        queued_deployment(&t, &a).await,
        queued_deployment(&t, &b).await,
    );
    let path_a = format!("/v1/deployments/{da}/logs?follow=true");
    let path_b = format!("/v1/deployments/{db}/logs?follow=true");
    let mut held = vec![EventStream::open(&t, &path_a, &a.cookie, None).await];
    let quiet = held[0].next().await.expect("keep-alive");
    assert_eq!(quiet.comment.as_deref(), Some("keep-alive"), "{quiet:?}");
    for _ in 1..sensei_control_plane::api::live::PER_USER {
        held.push(EventStream::open(&t, &path_a, &a.cookie, None).await);
    }
    let refused = |t: &TestPlane, path: String, cookie: String| {
        let (http, url) = (t.http.clone(), t.url(&path));
        async move {
            let r = http
                .get(url)
                .header("cookie", cookie)
                .send()
                .await
                .expect("follow");
            let status = r.status().as_u16();
            let retry = r.headers().contains_key("retry-after");
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, error_code(&body).to_owned(), retry)
        }
    };
    assert_eq!(
        refused(&t, path_a.clone(), a.cookie.clone()).await,
        (429, "too_many_streams".to_owned(), true),
        "a ninth stream for one user"
    );
    // Another user is not held back by the first one's streams, until the replica is full.
    held.push(EventStream::open(&t, &path_b, &b.cookie, None).await);
    held.push(EventStream::open(&t, &path_b, &b.cookie, None).await);
    assert_eq!(
        refused(&t, path_b.clone(), b.cookie.clone()).await.0,
        429,
        "the replica serves its most"
    );
    // A stream whose client went away gives its place back (noticed at its next keep-alive).
    drop(held.remove(0));
    let freed =
        sensei_e2e::eventually(PATIENCE, || async { t.plane.live_streams_open() < 10 }).await;
    assert!(freed, "the closed stream kept its slot");
    held.push(EventStream::open(&t, &path_b, &b.cookie, None).await);
    // Plain log reads are not streams and are never capped.
    let (status, _) = t
        .get(&format!("/v1/deployments/{db}/logs"), &b.cookie)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn rollout_events_are_pushed_and_last_event_id_skips_the_state_already_seen() {
    let t = plane(Duration::from_secs(3600), 64).await;
    let a = tenant(&t, "rollout-live@example.com").await;
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &a.cookie,
            json!({"project_id": a.project, "ref": "main", "server_ids": [a.server]}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_str().expect("id").to_owned();
    let path = format!("/v1/rollouts/{id}/events");
    let mut stream = EventStream::open(&t, &path, &a.cookie, None).await;
    let first = stream.next_event().await.expect("the state now");
    assert_eq!(first.event.as_deref(), Some("rollout"));
    // Pausing is a change: it is pushed.
    let (status, _) = t
        .post(&format!("/v1/rollouts/{id}/pause"), &a.cookie, json!({}))
        .await;
    assert_eq!(status, 200);
    let paused = loop {
        let e = stream.next_event().await.expect("a change");
        let view: Value = serde_json::from_str(&e.data).expect("json");
        if view["state"] == "paused" {
            break e;
        }
    };
    drop(stream);
    // A client that already has the paused state is not sent it again: the first event of
    // the new stream is the next change.
    let mut resumed = EventStream::open(&t, &path, &a.cookie, paused.id.as_deref()).await;
    let (status, _) = t
        .post(&format!("/v1/rollouts/{id}/resume"), &a.cookie, json!({}))
        .await;
    assert_eq!(status, 200);
    // Never the state it already has; then, pushed, the resumed state.
    loop {
        let next = resumed.next_event().await.expect("the change after");
        assert_ne!(
            next.id, paused.id,
            "the state the client had was sent again"
        );
        let view: Value = serde_json::from_str(&next.data).expect("json");
        if view["state"] != "paused" {
            break;
        }
    }
}

/// The presence entries of a presence event: `(server id, status)`.
fn presences(event: &Event) -> Vec<(String, String)> {
    assert_eq!(event.event.as_deref(), Some("presence"), "{event:?}");
    let list: Value = serde_json::from_str(&event.data).expect("json");
    list.as_array()
        .expect("a list")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_owned(),
                p["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn presence_streams_show_agents_in_reach_as_they_connect_and_end_with_the_session() {
    let t = plane(Duration::from_millis(500), 64).await;
    let a = tenant(&t, "presence-a@live.example").await;
    let b = tenant(&t, "presence-b@live.example").await;
    // A viewer of tenant A confined to servers labelled env=staging.
    let (status, inv) = t
        .post(
            "/v1/invitations",
            &a.cookie,
            json!({"email": "scoped@live.example", "role": "viewer"}),
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
    let scoped = sensei_e2e::session_cookie(&r).expect("cookie");
    let member: Value = r.json().await.expect("json");
    let (status, v) = t
        .patch(
            &format!("/v1/members/{}", member["id"].as_str().expect("id")),
            &a.cookie,
            json!({"resource_scope": {"server_labels": {"env": "staging"}}}),
        )
        .await;
    assert_eq!(status, 200, "{v}");

    // First, every agent server of the account: the quiet one is enrolled, not connected.
    let mut all = EventStream::open(&t, "/v1/servers/events", &a.cookie, None).await;
    let first = presences(&all.next_event().await.expect("a first event"));
    assert_eq!(first, [(a.server.clone(), "offline".to_owned())]);
    let mut narrow = EventStream::open(&t, "/v1/servers/events", &scoped, None).await;

    // An agent connects: pushed at once (the keep-alive alone would not say "connected"
    // sooner than the test's patience for a silent stream).
    let staging = t
        .start_labelled_agent(
            &a.cookie,
            "stg-1",
            json!({"env": "staging"}),
            sensei_agent::jobs::JobPolicy::default(),
        )
        .await;
    let id = staging.server_id.to_string();
    let mut statuses = Vec::new();
    while !statuses.contains(&"connected".to_owned()) {
        let event = all.next_event().await.expect("presence");
        statuses.extend(
            presences(&event)
                .into_iter()
                .filter(|(s, _)| *s == id)
                .map(|(_, status)| status),
        );
    }
    // The scoped member sees that server, and never the unlabelled one.
    loop {
        let event = narrow.next_event().await.expect("presence");
        let seen = presences(&event);
        assert!(seen.iter().all(|(s, _)| *s == id), "{seen:?}");
        if seen.contains(&(id.clone(), "connected".to_owned())) {
            break;
        }
    }
    // One server: its own; another account's is not found; a server out of reach neither.
    let mut one = EventStream::open(
        &t,
        &format!("/v1/servers/events?server_id={id}"),
        &a.cookie,
        None,
    )
    .await;
    assert_eq!(
        presences(&one.next_event().await.expect("presence")),
        [(id.clone(), "connected".to_owned())]
    );
    for (path, cookie, status, code) in [
        (
            format!("/v1/servers/events?server_id={}", b.server),
            &a.cookie,
            404,
            "not_found",
        ),
        (
            format!("/v1/servers/events?server_id={}", a.server),
            &scoped,
            404,
            "not_found",
        ),
        (
            "/v1/servers/events?everything=1".to_owned(),
            &a.cookie,
            400,
            "invalid_filter",
        ),
    ] {
        let (got, body) = t.get(&path, cookie).await;
        assert_eq!((got, error_code(&body)), (status, code), "{path}: {body}");
    }

    // The agent stops: offline, pushed.
    staging.stop.send(true).expect("stop");
    loop {
        let seen = presences(&one.next_event().await.expect("presence"));
        if seen == [(id.clone(), "offline".to_owned())] {
            break;
        }
    }
    // The member signs out: their stream ends (at its next keep-alive), the others go on.
    let r = t
        .http
        .post(t.url("/v1/auth/logout"))
        .header("cookie", &scoped)
        .send()
        .await
        .expect("logout");
    assert!(r.status().is_success(), "{}", r.status());
    while narrow.next().await.is_some() {}
    assert!(all.next().await.is_some(), "the owner's stream goes on");
}

#[tokio::test]
async fn presence_streams_count_against_the_users_streams_and_end_at_their_lifetime() {
    let lifetime = Duration::from_secs(2);
    let t = TestPlane::start_configured(
        sensei_e2e::fresh_database().await,
        sensei_e2e::test_keys(),
        "127.0.0.1:0".parse().expect("addr"),
        move |o| {
            o.live_keep_alive = Duration::from_millis(300);
            o.presence_lifetime = lifetime;
        },
    )
    .await;
    let a = tenant(&t, "presence-bounds@live.example").await;
    let opened = tokio::time::Instant::now();
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(EventStream::open(&t, "/v1/servers/events", &a.cookie, None).await);
    }
    let (status, body) = t.get("/v1/servers/events", &a.cookie).await;
    assert_eq!((status, error_code(&body)), (429, "too_many_streams"));
    // Each ends by itself at its lifetime (the browser then opens a new one), giving its
    // slot back.
    for stream in &mut held {
        while stream.next().await.is_some() {}
    }
    assert!(opened.elapsed() >= lifetime, "{:?}", opened.elapsed());
    let mut again = EventStream::open(&t, "/v1/servers/events", &a.cookie, None).await;
    assert_eq!(
        presences(&again.next_event().await.expect("presence")),
        [(a.server.clone(), "offline".to_owned())]
    );
}
