//! A long run with churn: the fleet stays connected for many minutes while a share of the
//! agents restart every minute and deployments keep arriving. What must hold: memory flat
//! (nothing keyed by agent, job or connection grows without bound), and no error.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::stats::{Report, Spread};
use crate::{connect_fleet, dispatch_latency, mib, Connecting, Setup};

#[derive(clap::Args, Clone)]
pub struct SoakOptions {
    #[arg(long, default_value_t = 10000)]
    agents: usize,
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Share of the fleet that restarts every minute, in percent.
    #[arg(long, default_value_t = 1.0)]
    churn_percent: f64,
    /// A deployment to a random agent this often.
    #[arg(long, default_value_t = 3)]
    deploy_every_secs: u64,
    #[command(flatten)]
    connecting: Connecting,
    #[command(flatten)]
    liveness: crate::Liveness,
}

/// One minute of the soak.
#[derive(Default)]
struct Minute {
    rss_kib: u64,
    cpu: f64,
    connected: usize,
    dispatches: Vec<Duration>,
    dispatch_failures: u64,
}

pub async fn run(report: &mut Report, options: SoakOptions) -> anyhow::Result<Value> {
    let SoakOptions {
        agents,
        minutes,
        churn_percent,
        deploy_every_secs,
        connecting,
        liveness,
    } = options;
    let setup = Setup::new(liveness, None).await?;
    let baseline = setup.plane()?.rss_kib();
    let (fleet, server_ids) = connect_fleet(report, &setup, agents, connecting).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let failed_before = fleet.shared.failed_attempts.load(Ordering::Relaxed);
    let db_before = setup.db_reading().await?;
    let started = Instant::now();
    let mut deploys = tokio::time::interval(Duration::from_secs(deploy_every_secs.max(1)));
    let mut minute_ends = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(60),
        Duration::from_secs(60),
    );
    let mut cpu_mark = setup.plane()?.cpu();
    let mut mark = Instant::now();
    let mut current = Minute::default();
    let mut done: Vec<Minute> = Vec::new();
    let mut all_dispatches = Vec::new();
    let mut dispatch_failures = 0u64;
    while (done.len() as u64) < minutes {
        tokio::select! {
            _ = deploys.tick() => {
                let server: Uuid = server_ids[(rand::random::<u64>() % server_ids.len() as u64) as usize];
                match dispatch_latency(&setup, &fleet, std::iter::once(server)).await {
                    Ok((latency, _)) => current.dispatches.extend(latency),
                    Err(e) => {
                        eprintln!("soak: a deployment to {server} failed: {e:#}");
                        current.dispatch_failures += 1;
                    }
                }
            }
            _ = minute_ends.tick() => {
                let plane = setup.plane()?;
                let cpu = plane.cpu();
                current.rss_kib = plane.rss_kib();
                current.cpu = (cpu - cpu_mark).as_secs_f64() / mark.elapsed().as_secs_f64();
                current.connected = fleet.shared.connected.load(Ordering::Relaxed);
                (cpu_mark, mark) = (cpu, Instant::now());
                let spread = Spread::of(&current.dispatches);
                let n = done.len() + 1;
                report.add(
                    "soak",
                    &format!("minute {n}"),
                    format!(
                        "RSS {:.1} MiB, CPU {:.1}%, {} connected, {} churned so far; dispatch {}; {} failed",
                        mib(current.rss_kib),
                        current.cpu * 100.0,
                        current.connected,
                        fleet.shared.churned.load(Ordering::Relaxed),
                        spread.map(|s| s.text()).unwrap_or_default(),
                        current.dispatch_failures,
                    ),
                    json!({"minute": n, "rss_kib": current.rss_kib, "core_fraction": current.cpu,
                           "connected": current.connected, "dispatch": spread.map(|s| s.json()),
                           "dispatch_failures": current.dispatch_failures,
                           "churned": fleet.shared.churned.load(Ordering::Relaxed)}),
                );
                all_dispatches.extend(current.dispatches.iter().copied());
                dispatch_failures += current.dispatch_failures;
                done.push(std::mem::take(&mut current));
                // The churn for the next minute: this share of the fleet restarts now.
                if (done.len() as u64) < minutes {
                    fleet.churn(churn_percent / 100.0);
                }
            }
        }
    }
    let db_after = setup.db_reading().await?;
    let (text, value) = crate::dbshare::share(&db_before, &db_after, agents);
    report.add("soak", "database share", text, value);
    // Memory from the second minute on (the first still settles the allocator's arenas).
    let settled = done.get(1).or(done.first()).context("no minute")?.rss_kib;
    let last = done.last().context("no minute")?.rss_kib;
    let peak = done.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    let failed = fleet.shared.failed_attempts.load(Ordering::Relaxed) - failed_before;
    let refused = fleet.shared.refused.load(Ordering::Relaxed);
    let spread = Spread::of(&all_dispatches).context("no dispatch")?;
    report.add(
        "soak",
        "whole run",
        format!(
            "{minutes} min, {agents} agents (baseline RSS {:.1} MiB): RSS {:.1} MiB after minute 2, {:.1} MiB at the end ({:+.1} MiB), peak {:.1} MiB; \
             {} reconnects by churn, {failed} failed connection attempts, {refused} jobs refused; \
             {} deployments, dispatch {}, {dispatch_failures} failed; run time {:.0} s",
            mib(baseline),
            mib(settled),
            mib(last),
            mib(last) - mib(settled),
            mib(peak),
            fleet.shared.churned.load(Ordering::Relaxed),
            all_dispatches.len(),
            spread.text(),
            started.elapsed().as_secs_f64(),
        ),
        json!({"minutes": minutes, "agents": agents, "baseline_kib": baseline,
               "rss_settled_kib": settled, "rss_end_kib": last, "rss_peak_kib": peak,
               "churned": fleet.shared.churned.load(Ordering::Relaxed), "failed_attempts": failed,
               "refused": refused, "dispatches": all_dispatches.len(), "dispatch": spread.json(),
               "dispatch_failures": dispatch_failures}),
    );
    fleet.stop().await;
    Ok(
        json!({"agents": agents, "minutes": minutes, "churn_percent": churn_percent,
              "deploy_every_secs": deploy_every_secs, "heartbeat_secs": liveness.heartbeat_secs, "idle_timeout_secs": liveness.idle_timeout_secs}),
    )
}
