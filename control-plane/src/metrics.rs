//! Prometheus metrics for the API, rendered in the text exposition format.
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
    /// Counts one finished request.
    pub fn observe(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
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

    /// Renders every metric, with the database pool's figures appended.
    pub fn render(&self, pool: &deadpool_postgres::Status) -> String {
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets() {
        let m = Metrics::default();
        m.observe("GET", "/healthz", 200, Duration::from_millis(3));
        m.observe("GET", "/healthz", 200, Duration::from_millis(30));
        let text = m.render(&deadpool_postgres::Status {
            max_size: 4,
            size: 1,
            available: 1,
            waiting: 0,
        });
        assert!(text.contains(
            "sensei_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 2"
        ));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("sensei_db_pool_max 4"));
    }
}
