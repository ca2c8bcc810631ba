//! Prometheus metrics for the API, rendered in the text exposition format.

#![allow(unsafe_code)]
//!
//! Kept per control-plane instance rather than in a process-global recorder, so that several
//! control planes in one process (the test suite) each report their own figures.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<(String, String), Histogram>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    /// Counts one finished request. Methods outside the standard ones count as `OTHER`: a
    /// client may send any token as a method, and each new one would otherwise add series
    /// (and memory) for as long as the process runs.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let method = match method {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => method,
            _ => "OTHER",
        };
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        *inner
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        let h = inner
            .latency
            .entry((method.to_owned(), route.to_owned()))
            .or_default();
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Renders every metric: the API's own, the pool's, and the fleet's.
    pub fn render(&self, pool: &deadpool_postgres::Status, fleet: &FleetFigures) -> String {
        let mut out = String::new();
        let Ok(inner) = self.inner.lock() else {
            return out;
        };
        out.push_str(
            "# HELP sensei_http_requests_total HTTP requests served, by route and status.\n",
        );
        out.push_str("# TYPE sensei_http_requests_total counter\n");
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "sensei_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP sensei_http_request_duration_seconds Time to answer HTTP requests.\n");
        out.push_str("# TYPE sensei_http_request_duration_seconds histogram\n");
        for ((method, route), h) in &inner.latency {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
                let _ = writeln!(
                    out,
                    "sensei_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "sensei_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "sensei_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sensei_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out.push_str("# HELP sensei_db_pool_connections Database connections held by the pool.\n");
        out.push_str("# TYPE sensei_db_pool_connections gauge\n");
        let _ = writeln!(out, "sensei_db_pool_connections {}", pool.size);
        out.push_str("# HELP sensei_db_pool_available Idle connections ready in the pool.\n");
        out.push_str("# TYPE sensei_db_pool_available gauge\n");
        let _ = writeln!(out, "sensei_db_pool_available {}", pool.available);
        out.push_str("# HELP sensei_db_pool_max Largest size the pool may grow to.\n");
        out.push_str("# TYPE sensei_db_pool_max gauge\n");
        let _ = writeln!(out, "sensei_db_pool_max {}", pool.max_size);
        out.push_str("# HELP sensei_db_pool_waiting Requests waiting for a database connection.\n");
        out.push_str("# TYPE sensei_db_pool_waiting gauge\n");
        let _ = writeln!(out, "sensei_db_pool_waiting {}", pool.waiting);
        fleet.render(&mut out);
        out
    }
}

/// The figures an operator alerts on, gathered at each scrape.
#[derive(Debug, Default, Clone)]
pub struct FleetFigures {
    pub version: String,
    pub binary_sha256: String,
    /// Agents connected to this replica.
    pub connected_agents: usize,
    /// Agent handshakes this replica left unanswered because they came faster than admitted.
    pub agent_handshakes_deferred: u64,
    /// Agent handshakes asked to prove their address first (a stateless retry).
    pub agent_handshakes_retried: u64,
    /// Reconnects per second a restart of this replica spreads its agents over.
    pub agent_reconnect_rate: f64,
    /// SSH jobs this replica runs now.
    pub ssh_jobs_in_flight: usize,
    /// Password hashes waiting for a slot, running, and done since start.
    pub hash_queue: usize,
    pub hashes_running: usize,
    pub hashes_total: u64,
    /// Audit-sink batches this replica delivered or failed, by sink kind.
    pub audit_sink_deliveries: Vec<crate::audit::sinks::delivery::CounterLine>,
    /// From the database; `None` when it did not answer within the scrape's deadline.
    pub database: Option<DatabaseFigures>,
    pub process: ProcessFigures,
}

/// Figures that come from PostgreSQL (the same on every replica).
#[derive(Debug, Default, Clone)]
pub struct DatabaseFigures {
    /// Valid agent certificates that expire within 30 days.
    pub certificates_expiring_30d: i64,
    /// Valid agent certificates that expire within 7 days: with renewal at two thirds of the
    /// lifetime, one of these is an agent whose renewal keeps failing (or a lifetime under
    /// three weeks).
    pub certificates_expiring_7d: i64,
    /// Deployments by status (`queued`, `running`, `succeeded`, `failed`).
    pub deployments: BTreeMap<String, i64>,
    /// Unfinished rollouts by state.
    pub rollouts: BTreeMap<String, i64>,
    /// Every account's audit sinks together.
    pub audit_sinks: crate::audit::sinks::SinkFigures,
}

/// This process, from /proc.
#[derive(Debug, Default, Clone)]
pub struct ProcessFigures {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<usize>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessFigures {
    /// Reads /proc/self (Linux); figures it cannot read are left out.
    pub fn read() -> Self {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name (which may hold spaces, so split after its ')').
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n).and_then(|v| v.parse::<f64>().ok());
        // utime and stime are fields 14 and 15 of stat (11 and 12 after the name), the start
        // time 22 (19 after), in clock ticks since boot.
        let cpu_seconds = field(11).zip(field(12)).map(|(u, s)| (u + s) / ticks);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = field(19)
            .zip(boot)
            .map(|(start, boot)| boot + start / ticks);
        let resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|t| {
                t.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .map(|pages| pages * page);
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
        Self {
            cpu_seconds,
            resident_bytes,
            open_fds,
            start_time_seconds,
        }
    }
}

/// The value of an unlabelled gauge or counter in a `/metrics` page as [`gauge`] writes it, for
/// the tools that read the page back (the load generator, the end-to-end tests).
pub fn unlabelled_value(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn gauge(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

fn labelled(out: &mut String, name: &str, help: &str, label: &str, values: &BTreeMap<String, i64>) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (key, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{key}\"}} {n}");
    }
}

impl FleetFigures {
    fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP sensei_build_info The running build (value always 1)."
        );
        let _ = writeln!(out, "# TYPE sensei_build_info gauge");
        let _ = writeln!(
            out,
            "sensei_build_info{{version=\"{}\",binary_sha256=\"{}\"}} 1",
            self.version, self.binary_sha256
        );
        gauge(
            out,
            "sensei_agents_connected",
            "Agents connected to this replica.",
            "gauge",
            self.connected_agents,
        );
        gauge(
            out,
            "sensei_agent_handshakes_deferred_total",
            "Agent handshakes left unanswered (to be retransmitted) because they came faster than \
             the admission rate.",
            "counter",
            self.agent_handshakes_deferred,
        );
        gauge(
            out,
            "sensei_agent_handshakes_retried_total",
            "Agent handshakes asked to prove their address with a stateless retry before \
             admission (the gateway was busy and the address unproven).",
            "counter",
            self.agent_handshakes_retried,
        );
        gauge(
            out,
            "sensei_agent_reconnect_rate",
            "Reconnects per second a restart of this replica spreads its agents over (from the \
             handshake cost measured at start).",
            "gauge",
            self.agent_reconnect_rate.round(),
        );
        gauge(
            out,
            "sensei_ssh_jobs_in_flight",
            "SSH jobs this replica is running.",
            "gauge",
            self.ssh_jobs_in_flight,
        );
        gauge(
            out,
            "sensei_password_hash_queue",
            "Password hashes waiting for a slot.",
            "gauge",
            self.hash_queue,
        );
        gauge(
            out,
            "sensei_password_hashes_running",
            "Password hashes running now.",
            "gauge",
            self.hashes_running,
        );
        gauge(
            out,
            "sensei_password_hashes_total",
            "Password hashes and verifications run.",
            "counter",
            self.hashes_total,
        );
        let _ = writeln!(
            out,
            "# HELP sensei_audit_sink_batches_total Audit-sink batches this replica sent, by sink kind and result."
        );
        let _ = writeln!(out, "# TYPE sensei_audit_sink_batches_total counter");
        for line in &self.audit_sink_deliveries {
            let kind = line.kind.as_str();
            let _ = writeln!(
                out,
                "sensei_audit_sink_batches_total{{kind=\"{kind}\",result=\"accepted\"}} {}",
                line.accepted_batches
            );
            let _ = writeln!(
                out,
                "sensei_audit_sink_batches_total{{kind=\"{kind}\",result=\"failed\"}} {}",
                line.failed_batches
            );
        }
        let _ = writeln!(
            out,
            "# HELP sensei_audit_sink_events_total Audit events receivers accepted from this replica, by sink kind."
        );
        let _ = writeln!(out, "# TYPE sensei_audit_sink_events_total counter");
        for line in &self.audit_sink_deliveries {
            let _ = writeln!(
                out,
                "sensei_audit_sink_events_total{{kind=\"{}\"}} {}",
                line.kind.as_str(),
                line.events
            );
        }
        gauge(
            out,
            "sensei_metrics_database_up",
            "1 when the database answered this scrape's queries.",
            "gauge",
            u8::from(self.database.is_some()),
        );
        if let Some(db) = &self.database {
            gauge(
                out,
                "sensei_agent_certificates_expiring_30d",
                "Valid agent certificates that expire within 30 days.",
                "gauge",
                db.certificates_expiring_30d,
            );
            gauge(
                out,
                "sensei_agent_certificates_expiring_7d",
                "Valid agent certificates that expire within 7 days.",
                "gauge",
                db.certificates_expiring_7d,
            );
            labelled(
                out,
                "sensei_deployments",
                "Deployments by status.",
                "status",
                &db.deployments,
            );
            labelled(
                out,
                "sensei_rollouts_active",
                "Unfinished rollouts by state.",
                "state",
                &db.rollouts,
            );
            let sinks = &db.audit_sinks;
            gauge(
                out,
                "sensei_audit_sinks",
                "Audit sinks configured, every account together.",
                "gauge",
                sinks.sinks,
            );
            gauge(
                out,
                "sensei_audit_sinks_failing",
                "Audit sinks whose last attempt failed.",
                "gauge",
                sinks.failing,
            );
            gauge(
                out,
                "sensei_audit_sink_lag_events_max",
                "Events not yet accepted by the sink furthest behind.",
                "gauge",
                sinks.max_lag_events,
            );
            gauge(
                out,
                "sensei_audit_sink_lag_events",
                "Events not yet accepted, every sink added up.",
                "gauge",
                sinks.total_lag_events,
            );
            gauge(
                out,
                "sensei_audit_sink_oldest_undelivered_seconds",
                "Seconds since the longest-waiting sink with events behind last had a batch accepted.",
                "gauge",
                sinks.oldest_undelivered_seconds,
            );
        }
        let p = &self.process;
        if let Some(v) = p.cpu_seconds {
            gauge(
                out,
                "process_cpu_seconds_total",
                "User and system CPU time spent.",
                "counter",
                v,
            );
        }
        if let Some(v) = p.resident_bytes {
            gauge(
                out,
                "process_resident_memory_bytes",
                "Resident memory size.",
                "gauge",
                v,
            );
        }
        if let Some(v) = p.open_fds {
            gauge(
                out,
                "process_open_fds",
                "Open file descriptors.",
                "gauge",
                v,
            );
        }
        if let Some(v) = p.start_time_seconds {
            gauge(
                out,
                "process_start_time_seconds",
                "Start time since the Unix epoch.",
                "gauge",
                v,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let m = Metrics::default();
        let render = |m: &Metrics| {
            m.render(
                &deadpool_postgres::Status {
                    max_size: 4,
                    size: 1,
                    available: 1,
                    waiting: 0,
                },
                &FleetFigures::default(),
            )
        };
        m.observe("GET", "/healthz", 200, Duration::from_millis(3));
        m.observe("GET", "/healthz", 200, Duration::from_millis(30));
        let text = render(&m);
        assert!(text.contains(
            "sensei_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 2"
        ));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("sensei_db_pool_max 4"));
        assert!(text.contains("sensei_metrics_database_up 0"));
        // Made-up methods share one series, however many a client invents.
        for i in 0..100 {
            m.observe(&format!("X{i}"), "unmatched", 405, Duration::from_millis(1));
        }
        let text = render(&m);
        assert!(text.contains(
            "sensei_http_requests_total{method=\"OTHER\",route=\"unmatched\",status=\"405\"} 100"
        ));
        assert!(!text.contains("X1"));
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let p = ProcessFigures::read();
        assert!(p.cpu_seconds.is_some_and(|s| s >= 0.0));
        assert!(p.resident_bytes.is_some_and(|b| b > 1024 * 1024));
        assert!(p.open_fds.is_some_and(|n| n >= 3));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(p
            .start_time_seconds
            .is_some_and(|t| t <= now + 1.0 && t > now - 86_400.0));
    }
}
