//! `logins`: how many sign-ins a second the control plane sustains, and what a flood of them
//! does to everyone else (`/healthz` latency), against the real binary.
//!
//! Each client is its own address (the plane believes the load generator's
//! `X-Forwarded-For`, as behind a load balancer) and its own account, so no throttle is in the
//! way: every attempt is a real Argon2id verification, which is what the figure measures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::stats::{Report, Spread};
use crate::Setup;

#[derive(clap::Args, Clone, Copy)]
pub struct LoginOptions {
    /// Clients signing in at once, one after another each.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds of the flood.
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
}

const PASSWORD: &str = "load generator password";

fn client_address(i: usize) -> String {
    format!("198.18.{}.{}", i / 250, i % 250 + 1)
}

/// `/healthz` every 20 ms until `stop`; the latencies.
async fn probe_health(
    http: reqwest::Client,
    url: String,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let status = http.get(&url).send().await?.status();
        samples.push(started.elapsed());
        if status != 200 {
            bail!("/healthz answered {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(samples)
}

pub async fn run(report: &mut Report, options: LoginOptions) -> anyhow::Result<Value> {
    let LoginOptions { clients, secs } = options;
    let setup = Setup::new(crate::Liveness::default(), None).await?;
    let base = setup.base();
    let health_url = format!("{base}/healthz");
    // One account per client, each made from its own address (signups are throttled per
    // address).
    for i in 0..clients {
        let r = setup
            .http
            .post(format!("{base}/v1/auth/signup"))
            .header("x-forwarded-for", client_address(i))
            .json(&json!({"email": format!("login{i}@sensei.test"), "password": PASSWORD, "account_name": "L"}))
            .send()
            .await?;
        if r.status() != 201 {
            bail!("signup {i} answered {}", r.status());
        }
    }

    // /healthz with nothing else going on.
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = tokio::spawn(probe_health(
        setup.http.clone(),
        health_url.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let quiet = quiet.await??;

    let signed_in = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn(probe_health(
        setup.http.clone(),
        health_url.clone(),
        stop.clone(),
    ));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (http, url) = (setup.http.clone(), format!("{base}/v1/auth/login"));
        let (signed_in, refused) = (signed_in.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let status = http
                    .post(&url)
                    .header("x-forwarded-for", client_address(i))
                    .json(&json!({"email": format!("login{i}@sensei.test"), "password": PASSWORD}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                latencies.push(t0.elapsed());
                if status == 200 {
                    signed_in.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut login_latency = Vec::new();
    for task in tasks {
        login_latency.extend(task.await.context("login client")?);
    }
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let flooded = prober.await??;
    let (ok, bad) = (
        signed_in.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    let rate = ok as f64 / took.as_secs_f64();
    let quiet = Spread::of(&quiet).context("no quiet samples")?;
    let flooded = Spread::of(&flooded).context("no samples under the flood")?;
    let logins = Spread::of(&login_latency).context("no logins")?;
    report.add(
        "logins",
        "sign-ins sustained",
        format!(
            "{rate:.1}/s ({ok} in {:.1} s from {clients} clients, {bad} not 200)",
            took.as_secs_f64()
        ),
        json!({"per_sec": rate, "signed_in": ok, "not_ok": bad, "secs": took.as_secs_f64(), "clients": clients}),
    );
    report.add(
        "logins",
        "login latency under the flood",
        logins.text(),
        logins.json(),
    );
    report.add("logins", "/healthz, quiet", quiet.text(), quiet.json());
    report.add(
        "logins",
        "/healthz during the flood",
        flooded.text(),
        flooded.json(),
    );
    Ok(json!({"clients": clients, "secs": secs}))
}
