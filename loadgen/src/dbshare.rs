//! The database's share of a scenario: what the control plane made PostgreSQL do, read from
//! PostgreSQL's own counters rather than timed, so that the figures do not depend on what
//! else the machine is doing.
//!
//! - statements: `pg_stat_statements` calls made by the plane's role (`sensei_app`), with
//!   `track = all` so that statements inside functions count too;
//! - transactions: commits and rollbacks of the plane's database;
//! - WAL: bytes of write-ahead log written (`pg_current_wal_lsn`), what a replica or a backup
//!   has to ship;
//! - CPU: user + system time of every server process, including the backends that have
//!   already exited (the postmaster's reaped-children times).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::plane::proc_cpu;

/// The settings that make statements countable (`pg_stat_statements` must be preloaded).
pub fn cluster_settings() -> Vec<(String, String)> {
    vec![
        (
            "shared_preload_libraries".into(),
            "pg_stat_statements".into(),
        ),
        ("pg_stat_statements.track".into(), "all".into()),
        // The plane's statements are few distinct texts; the default 5000 is plenty, but
        // the load generator's own registration inserts are many: keep them from evicting.
        ("pg_stat_statements.max".into(), "10000".into()),
    ]
}

/// Makes the view available in the plane's database (as the superuser).
pub async fn install(superuser: &tokio_postgres::Client) -> anyhow::Result<()> {
    superuser
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .context("pg_stat_statements (is the cluster started with cluster_settings()?)")
}

/// One reading of the counters.
#[derive(Debug, Clone)]
pub struct DbReading {
    at: Instant,
    statements: i64,
    transactions: i64,
    wal_bytes: i64,
    cpu: Duration,
    /// Calls and execution time (ms) per statement text (normalised by
    /// pg_stat_statements), for the breakdown.
    by_statement: HashMap<String, (i64, f64)>,
}

/// Reads the counters. `superuser` is connected to the plane's database as a superuser (the
/// statistics of other roles are hidden from everyone else); `data_dir` is the cluster's.
pub async fn read(
    superuser: &tokio_postgres::Client,
    data_dir: &Path,
) -> anyhow::Result<DbReading> {
    // pg_stat_statements counts at the end of each statement; pg_stat_database's counters
    // reach shared memory when a backend flushes them (PostgreSQL 15: at most once a second,
    // within 10 s when idle), a lag that is small against the minute-long windows measured.
    // A cached snapshot from an earlier reading in this transaction-less session is dropped.
    superuser
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await?;
    let row = superuser
        .query_one(
            "SELECT \
               (SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s \
                  JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'sensei_app'), \
               (SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
                  WHERE datname = current_database()), \
               pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
            &[],
        )
        .await?;
    let by_statement = superuser
        .query(
            "SELECT s.query, sum(s.calls)::bigint, sum(s.total_exec_time)::float8 \
               FROM pg_stat_statements s \
               JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = 'sensei_app' \
             GROUP BY s.query",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, i64>(1), r.get::<_, f64>(2)),
            )
        })
        .collect();
    Ok(DbReading {
        at: Instant::now(),
        statements: row.get(0),
        transactions: row.get(1),
        wal_bytes: row.get(2),
        cpu: server_cpu(data_dir),
        by_statement,
    })
}

/// What happened between two readings, per second and per 1,000 agents.
pub fn share(before: &DbReading, after: &DbReading, agents: usize) -> (String, Value) {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let per_k = 1000.0 / agents.max(1) as f64;
    let statements = (after.statements - before.statements) as f64;
    let transactions = (after.transactions - before.transactions) as f64;
    let wal = (after.wal_bytes - before.wal_bytes) as f64;
    let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64();
    let text = format!(
        "{:.2} statements/s ({:.3} per 1k agents), {:.2} transactions/s, WAL {:.1} KiB/s, \
         PostgreSQL CPU {:.2} % of a core, over {secs:.0} s",
        statements / secs,
        statements / secs * per_k,
        transactions / secs,
        wal / secs / 1024.0,
        cpu / secs * 100.0
    );
    // The statements that took the most time in the window: where the database's share
    // goes. A trigger's statements count inside the statement that fired them as well.
    let mut top: Vec<(&String, i64, f64)> = after
        .by_statement
        .iter()
        .map(|(q, (n, ms))| {
            let (n0, ms0) = before.by_statement.get(q).copied().unwrap_or((0, 0.0));
            (q, n - n0, ms - ms0)
        })
        .filter(|(_, n, _)| *n > 0)
        .collect();
    top.sort_by(|a, b| b.2.total_cmp(&a.2));
    let top: Vec<Value> = top
        .iter()
        .take(12)
        .map(|(q, n, ms)| {
            let text: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(160).collect();
            json!({"calls": n, "per_sec": *n as f64 / secs, "exec_ms": ms, "statement": text})
        })
        .collect();
    let value = json!({
        "top_statements": top,
        "secs": secs,
        "statements": statements,
        "statements_per_sec": statements / secs,
        "statements_per_sec_per_1k_agents": statements / secs * per_k,
        "transactions": transactions,
        "transactions_per_sec": transactions / secs,
        "wal_bytes": wal,
        "wal_bytes_per_sec": wal / secs,
        "postgres_cpu_secs": cpu,
        "postgres_core_fraction": cpu / secs,
    });
    (text, value)
}

/// CPU time of the whole server: the postmaster, its live children, and (through the
/// postmaster's `cutime`/`cstime`) every child it has reaped.
fn server_cpu(data_dir: &Path) -> Duration {
    let Some(postmaster) = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return Duration::ZERO;
    };
    let mut total = proc_cpu(postmaster) + reaped_children_cpu(postmaster);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if parent_of(pid) == Some(postmaster) {
                total += proc_cpu(pid);
            }
        }
    }
    total
}

/// Fields of `/proc/<pid>/stat` after the command name (which may contain spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn parent_of(pid: u32) -> Option<u32> {
    // ppid is field 4 of the line: index 1 after the ')'.
    stat_fields(pid)?.get(1)?.parse().ok()
}

fn reaped_children_cpu(pid: u32) -> Duration {
    // cutime and cstime are fields 16 and 17 of the line: 13 and 14 after the ')'; USER_HZ.
    let Some(fields) = stat_fields(pid) else {
        return Duration::ZERO;
    };
    let ticks: u64 = [13, 14]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}
