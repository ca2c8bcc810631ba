//! Percentiles and the report: one row per figure, printed as a table and kept as JSON.

use std::time::Duration;

use serde_json::{json, Value};

/// p50, p99 and max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value with at least p of the sample at or below it.
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(Self {
            count: ms.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms[ms.len() - 1],
        })
    }

    pub fn text(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n={})",
            self.p50_ms, self.p99_ms, self.max_ms, self.count
        )
    }

    pub fn json(&self) -> Value {
        json!({"count": self.count, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms})
    }
}

/// The figures of a run, in the order they were measured.
#[derive(Default)]
pub struct Report {
    rows: Vec<(String, String, String, Value)>,
}

impl Report {
    /// Records a figure: its scenario, its name, a human rendering and the raw value.
    pub fn add(&mut self, scenario: &str, name: &str, text: String, value: Value) {
        println!("  {scenario:<10} {name:<34} {text}");
        self.rows
            .push((scenario.to_owned(), name.to_owned(), text, value));
    }

    pub fn json(&self, meta: Value) -> Value {
        json!({
            "meta": meta,
            "figures": self.rows.iter().map(|(s, n, t, v)| json!({"scenario": s, "name": n, "text": t, "value": v})).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Spread::of(&samples).expect("spread");
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
        let one = Spread::of(&[Duration::from_millis(7)]).expect("spread");
        assert_eq!((one.p50_ms, one.p99_ms), (7.0, 7.0));
        assert!(Spread::of(&[]).is_none());
    }
}
