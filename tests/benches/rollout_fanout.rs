//! Rollout fan-out, two ways.
//!
//! By default: how long a rollout takes to start a batch of N agent servers, from
//! `POST /v1/rollouts` to every target's job queued (and its agent woken), through the real
//! API, scheduler and PostgreSQL. The servers are created with valid certificate rows
//! directly in SQL (no agents connect: this measures the control plane's fan-out, not the
//! agents).
//!
//! `cargo bench -p sensei-e2e --bench rollout_fanout` (set SENSEI_BENCH_TARGETS, default 1000)
//!
//! With SENSEI_BENCH_FLEET=N: a real fleet. N real `sensei-agent` processes (the release
//! binary, enrolled with the command the API gives) and N real sshd, each in a mount
//! namespace of its own so that every server has its own disk at the same deploy path, all
//! deploying one real git repository at once: a Sensei rollout (all at once) to the agents,
//! one to the sshd through the SSH runner, Ansible with N forks and Capistrano to the same
//! sshd (when installed; configuration in `loadgen/peers/`). Wall time, control-side CPU,
//! target-side CPU, and for the agents the per-target job time; every run must switch
//! `current` on every target. SENSEI_BENCH_ROUNDS measured rounds (default 3) after a
//! warm-up round.
//!
//! `cargo build --release -p sensei-agent && SENSEI_BENCH_FLEET=50 cargo bench -p sensei-e2e --bench rollout_fanout`

// A module in a directory of its own, so cargo does not take it for a bench target.
#[path = "rollout_fanout/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use sensei_e2e::TestPlane;
use serde_json::json;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    if let Some(n) = std::env::var("SENSEI_BENCH_FLEET")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let rounds = std::env::var("SENSEI_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3);
        runtime.block_on(fleet::run(n, rounds));
        return;
    }
    runtime.block_on(queued_fanout());
}

async fn queued_fanout() {
    let targets: i64 = std::env::var("SENSEI_BENCH_TARGETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let t = TestPlane::start().await;
    let (cookie, body) = t.signup("bench@example.com", "correct horse battery").await;
    let account: uuid::Uuid = body["account"]["id"]
        .as_str()
        .expect("id")
        .parse()
        .expect("uuid");
    let db = t.db().await;
    db.execute(
        "INSERT INTO servers (id, account_id, name, host, transport, labels) \
         SELECT gen_random_uuid(), $1, 'bench-' || g, 'h', 'agent', '{\"fleet\":\"bench\"}' \
         FROM generate_series(1, $2::bigint) g",
        &[&account, &targets],
    )
    .await
    .expect("servers");
    db.execute(
        "INSERT INTO agent_certificates (fingerprint, server_id, serial, not_after) \
         SELECT sha256(id::text::bytea), id, 'bench', now() + interval '1 day' \
         FROM servers WHERE account_id = $1",
        &[&account],
    )
    .await
    .expect("certificates");
    let (_, project) = t
        .post(
            "/v1/projects",
            &cookie,
            json!({"name": "bench", "repo_url": "/nonexistent", "deploy_path": "/srv/bench"}),
        )
        .await;
    let started = Instant::now();
    let (status, rollout) = t
        .post(
            "/v1/rollouts",
            &cookie,
            json!({"project_id": project["id"], "ref": "main", "selector": {"labels": {"fleet": "bench"}},
                   "strategy": {"canary": 0, "batch_percent": 100}}),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let created = started.elapsed();
    let id: uuid::Uuid = rollout["id"].as_str().expect("id").parse().expect("uuid");
    loop {
        let queued: i64 = db
            .query_one(
                "SELECT count(*) FROM rollout_targets WHERE rollout_id = $1 AND deployment_id IS NOT NULL",
                &[&id],
            )
            .await
            .expect("count")
            .get(0);
        if queued == targets {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {queued} of {targets} queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_queued = started.elapsed();
    println!("rollout fan-out, {targets} agent servers, one batch:");
    println!(
        "  POST /v1/rollouts answered        {:>8.1} ms",
        created.as_secs_f64() * 1e3
    );
    println!(
        "  every target's job queued after   {:>8.1} ms",
        all_queued.as_secs_f64() * 1e3
    );
    println!(
        "  per target                        {:>8.3} ms",
        all_queued.as_secs_f64() * 1e3 / targets as f64
    );
    t.plane.shutdown().await;
}
