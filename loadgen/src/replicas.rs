//! Several control-plane replicas on one PostgreSQL, the fleet split across them: idle cost
//! per replica, dispatch when the job is queued on a replica that does not hold the agent
//! (the `NOTIFY` path), revocation through one replica of agents held by every replica, and
//! failover when one replica is killed with SIGKILL while its agents run jobs.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::stats::{Report, Spread};
use crate::{connect_fleet, dispatch_latency, mib, Connecting, Setup};

#[derive(clap::Args, Clone)]
pub struct ReplicaOptions {
    /// Control-plane replicas on the one database.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    #[arg(long, default_value_t = 10000)]
    agents: usize,
    /// Seconds of idle CPU measurement.
    #[arg(long, default_value_t = 60)]
    idle_secs: u64,
    /// Deployments queued one after another, per holding replica.
    #[arg(long, default_value_t = 100)]
    dispatches: usize,
    /// Certificates revoked one after another, per holding replica.
    #[arg(long, default_value_t = 20)]
    revocations: usize,
    /// Jobs running on the killed replica's agents when it is killed.
    #[arg(long, default_value_t = 200)]
    running_jobs: usize,
    #[command(flatten)]
    connecting: Connecting,
    #[command(flatten)]
    liveness: crate::Liveness,
}

pub async fn run(report: &mut Report, options: ReplicaOptions) -> anyhow::Result<Value> {
    let ReplicaOptions {
        replicas,
        agents,
        idle_secs,
        dispatches,
        revocations,
        running_jobs,
        connecting,
        liveness,
    } = options;
    if replicas < 2 {
        bail!("--replicas must be at least 2");
    }
    let mut setup = Setup::new(liveness, None).await?;
    setup.add_replicas(replicas - 1).await?;
    let baselines: Vec<u64> = (0..replicas)
        .map(|i| setup.replica(i).map(|p| p.rss_kib()))
        .collect::<Result<_, _>>()?;
    let (fleet, server_ids) = connect_fleet(report, &setup, agents, connecting).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Agent i starts on replica i mod n: check that each replica holds its share.
    let holders = |k: usize| {
        server_ids
            .iter()
            .enumerate()
            .filter(move |(i, _)| i % replicas == k)
            .map(|(_, s)| *s)
    };
    for k in 0..replicas {
        let held = setup
            .replica_metric(k, "sensei_agents_connected")
            .await?
            .round() as usize;
        let expected = holders(k).count();
        if held != expected {
            bail!("replica {k} holds {held} agents, not the {expected} it was given");
        }
    }

    // 1. Idle: each replica's CPU and memory with its share of the fleet.
    let cpu_before: Vec<Duration> = (0..replicas)
        .map(|i| setup.replica(i).map(|p| p.cpu()))
        .collect::<Result<_, _>>()?;
    let db_before = setup.db_reading().await?;
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let db_after = setup.db_reading().await?;
    let elapsed = measured.elapsed().as_secs_f64();
    let mut per_replica = Vec::new();
    for (k, (before, baseline)) in cpu_before.iter().zip(&baselines).enumerate() {
        let plane = setup.replica(k)?;
        let cpu = (plane.cpu() - *before).as_secs_f64() / elapsed;
        let rss = plane.rss_kib();
        let held = holders(k).count();
        let per_agent = rss.saturating_sub(*baseline) as f64 / held as f64;
        report.add(
            "replicas idle",
            &format!("replica {k}"),
            format!(
                "{held} agents: CPU {:.1}% of one core over {idle_secs} s; RSS {:.1} MiB (baseline {:.1} MiB), {per_agent:.1} KiB per agent",
                cpu * 100.0,
                mib(rss),
                mib(*baseline)
            ),
            json!({"agents": held, "core_fraction": cpu, "rss_kib": rss, "baseline_kib": baseline,
                   "per_agent_kib": per_agent}),
        );
        per_replica.push(cpu);
    }
    let (text, value) = crate::dbshare::share(&db_before, &db_after, agents);
    report.add("replicas idle", "database share", text, value);

    // 2. Dispatch: every job queued through replica 0's API; held by replica 0 it is woken
    // in process, held by another it crosses PostgreSQL's NOTIFY.
    for k in 0..replicas {
        let servers = holders(k).step_by(7).take(dispatches);
        let (latencies, api) = dispatch_latency(&setup, &fleet, servers).await?;
        let spread = Spread::of(&latencies).context("no dispatches")?;
        let path = if k == 0 {
            "queued on the holding replica"
        } else {
            "queued on replica 0, agent on another (NOTIFY)"
        };
        report.add(
            "replicas dispatch",
            &format!("agent on replica {k}: {path}"),
            spread.text(),
            json!({"holder": k, "latency": spread.json(), "api": Spread::of(&api).map(|s| s.json())}),
        );
    }

    // 3. Revocation through replica 0's API of agents held by each replica: from the call to
    // the agent being told (its connection closed with the "revoked" code).
    let mut revoked = Vec::new();
    for k in 0..replicas {
        let mut latencies = Vec::new();
        // Servers not used for the dispatches above.
        for server in holders(k).skip(1).step_by(7).take(revocations) {
            let sent = Instant::now();
            let status = setup
                .delete(&format!("/v1/servers/{server}/agent-certificate"))
                .await?;
            if status != 204 {
                bail!("revoking {server}'s certificate answered {status}");
            }
            let Some(at) = crate::fleet::wait_for_mark(
                &fleet.shared.revoked_signal,
                Duration::from_secs(30),
                || fleet.shared.revoked_at(server),
            )
            .await
            else {
                bail!("the agent of {server} was not told of its revocation within 30 s");
            };
            latencies.push(at.saturating_duration_since(sent));
            revoked.push(server);
        }
        let spread = Spread::of(&latencies).context("no revocations")?;
        report.add(
            "replicas revocation",
            &format!("agent on replica {k}: API call → agent told"),
            spread.text(),
            json!({"holder": k, "latency": spread.json()}),
        );
    }

    // 4. Failover: the last replica is killed while its agents run jobs. Its agents notice
    // when their connection's idle timeout passes (their jobs stop with it), then move to the
    // next address; each one's first poll there ends the job it lost.
    let victim = replicas - 1;
    let live = agents - revoked.len();
    fleet.shared.hold_ms.store(3_600_000, Ordering::Relaxed);
    let mut jobs = Vec::new();
    for server in holders(victim)
        .filter(|s| !revoked.contains(s))
        .skip(2)
        .step_by(3)
        .take(running_jobs)
    {
        jobs.push(setup.queue_deployment(server).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running: i64 = setup
            .db
            .query_one(
                "SELECT count(*) FROM deployments WHERE id = ANY($1) AND status = 'running'",
                &[&jobs],
            )
            .await?
            .get(0);
        if running as usize == jobs.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {running} of {} jobs were running on replica {victim} after 60 s",
                jobs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim_held = holders(victim).filter(|s| !revoked.contains(s)).count();
    let sessions_before = fleet.shared.sessions.load(Ordering::Relaxed);
    let failed_before = fleet.shared.failed_attempts.load(Ordering::Relaxed);
    let reported_before = fleet
        .shared
        .reported_after_reconnect
        .load(Ordering::Relaxed);
    let survivors_cpu: Vec<Duration> = (0..victim)
        .map(|i| setup.replica(i).map(|p| p.cpu()))
        .collect::<Result<_, _>>()?;
    let (_, victim_plane) = setup.extra.last_mut().context("no extra replica")?;
    let victim_plane = victim_plane.take().context("the victim is not running")?;
    let killed = Instant::now();
    victim_plane.kill()?;
    // Every agent the victim held has made a new session with a survivor.
    let Some(reconnected) = fleet
        .wait_sessions(sessions_before, victim_held, Duration::from_secs(300))
        .await
    else {
        bail!(
            "after the kill only {} of {victim_held} agents made a new session within 300 s",
            fleet.shared.sessions.load(Ordering::Relaxed) - sessions_before
        );
    };
    let connected = fleet.shared.connected.load(Ordering::Relaxed);
    if connected != live {
        bail!("{connected} agents connected after the failover, not {live}");
    }
    // Every job the victim handed out is finished or failed.
    let deadline = Instant::now() + Duration::from_secs(300);
    let settled = loop {
        let open: i64 = setup
            .db
            .query_one(
                "SELECT count(*) FROM deployments WHERE id = ANY($1) AND status IN ('queued', 'running')",
                &[&jobs],
            )
            .await?
            .get(0);
        if open == 0 {
            break killed.elapsed();
        }
        if Instant::now() > deadline {
            bail!("{open} of the killed replica's jobs were still open 300 s after the kill");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    fleet.shared.hold_ms.store(0, Ordering::Relaxed);
    let outcomes: Vec<(String, Option<String>, i64)> = setup
        .db
        .query(
            "SELECT status, error_message, count(*) FROM deployments WHERE id = ANY($1) \
             GROUP BY 1, 2 ORDER BY 3 DESC",
            &[&jobs],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let survivors_cpu: f64 = survivors_cpu
        .iter()
        .enumerate()
        .map(|(i, before)| setup.replica(i).map(|p| (p.cpu() - *before).as_secs_f64()))
        .sum::<anyhow::Result<f64>>()?;
    let reported = fleet
        .shared
        .reported_after_reconnect
        .load(Ordering::Relaxed)
        - reported_before;
    let failed = fleet.shared.failed_attempts.load(Ordering::Relaxed) - failed_before;
    report.add(
        "replicas failover",
        &format!("kill -9 replica {victim} → its agents on the others"),
        format!(
            "{victim_held} agents reconnected {:.1} s after the kill ({failed} failed attempts); \
             survivors' CPU {survivors_cpu:.2} s",
            reconnected.as_secs_f64()
        ),
        json!({"agents": victim_held, "reconnected_secs": reconnected.as_secs_f64(),
               "failed_attempts": failed, "survivors_cpu_secs": survivors_cpu}),
    );
    report.add(
        "replicas failover",
        "kill -9 → every job it handed out ended",
        format!(
            "{} jobs ended {:.1} s after the kill; {reported} reported by their agents on reconnecting; outcomes {}",
            jobs.len(),
            settled.as_secs_f64(),
            outcomes
                .iter()
                .map(|(status, why, n)| format!("{n} {status} ({})", why.as_deref().unwrap_or("-")))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        json!({"jobs": jobs.len(), "settled_secs": settled.as_secs_f64(), "reported": reported,
               "outcomes": outcomes.iter().map(|(s, w, n)| json!({"status": s, "error": w, "count": n})).collect::<Vec<_>>()}),
    );
    let refused = fleet.shared.refused.load(Ordering::Relaxed);
    fleet.stop().await;
    if refused > 0 {
        bail!("{refused} jobs failed verification");
    }
    Ok(
        json!({"replicas": replicas, "agents": agents, "idle_secs": idle_secs,
              "dispatches": dispatches, "revocations": revocations, "running_jobs": running_jobs,
              "heartbeat_secs": liveness.heartbeat_secs, "idle_timeout_secs": liveness.idle_timeout_secs, "idle_core_fractions": per_replica}),
    )
}
