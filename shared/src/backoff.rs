//! Reconnect timing for agents: capped exponential backoff with full jitter, so that
//! thousands of agents cut off together do not come back together.
//!
//! Pure: the caller supplies the random numbers, so the schedule is testable.

use std::time::Duration;

/// Backoff state for one agent.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The defaults agents use: 500 ms doubling up to 60 s.
    pub fn agent_default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(60))
    }

    /// The delay before the next attempt. `random` is uniform in [0, 1): the delay is
    /// uniform between zero and the current ceiling ("full jitter").
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(random.clamp(0.0, 1.0))
    }

    /// The ceiling for the next attempt: base × 2^attempt, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay the control plane asked for, spread by up to a quarter so that agents it
    /// closed at once do not return at once.
    pub fn suggested(delay: Duration, random: f64) -> Duration {
        delay + delay.mul_f64(0.25 * random.clamp(0.0, 1.0))
    }

    /// A session was established: start again from the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How long a stopping control plane lets its close frames leave before it exits: an agent
/// that misses its close only notices after its idle timeout.
pub fn restart_drain(connected: usize) -> Duration {
    Duration::from_millis(300 + connected as u64 / 5).min(Duration::from_secs(3))
}

/// Reconnects per second a gateway with `cores` cores takes without queueing, when one full
/// TLS handshake costs its server side `tls_server_cost` of CPU (measured at start:
/// `sensei_certs::handshake_cost`). A whole reconnect costs the control plane about four
/// times the TLS work: QUIC packet protection, the session's hello, its presence write and its
/// first job poll (measured: 0.80 ms of CPU per reconnect against 0.23 ms of TLS,
/// docs/benchmarks.md), and the rest of the plane (API, PostgreSQL on the same machine) keeps
/// its share. A slower or smaller machine gets a proportionally lower rate.
pub fn reconnect_rate(tls_server_cost: Duration, cores: usize) -> f64 {
    /// CPU of a whole reconnect per CPU of its TLS handshake, with the margin above.
    const RECONNECT_PER_TLS: f64 = 5.0;
    let per_reconnect = tls_server_cost.as_secs_f64().max(1e-6) * RECONNECT_PER_TLS;
    (cores.max(1) as f64 / per_reconnect).clamp(MIN_RECONNECT_RATE, MAX_RECONNECT_RATE)
}

/// However slow the measurement says the machine is, a restart never spreads a fleet slower
/// than this (a fleet of 10,000 is back within 100 s); the gateway's admission of handshakes
/// holds the rest.
pub const MIN_RECONNECT_RATE: f64 = 100.0;
/// And never faster than this, whatever the measurement says.
pub const MAX_RECONNECT_RATE: f64 = 50_000.0;

/// What a control plane that is restarting tells each connected agent to wait before coming
/// back: until the new process is listening (the drain, then a start), then spread so that
/// the fleet returns at `rate` reconnects per second ([`reconnect_rate`]). An agent that
/// comes back to an overloaded gateway loses its first packets and waits out QUIC's
/// retransmission timer (a second, then two, then four…).
pub fn restart_delay(connected: usize, rate: f64, random: f64) -> Duration {
    /// Starting a new process and listening takes well under this.
    const START: Duration = Duration::from_millis(1000);
    let rate = rate.clamp(MIN_RECONNECT_RATE, MAX_RECONNECT_RATE);
    let window = (connected as f64 / rate).clamp(0.5, 300.0);
    restart_drain(connected) + START + Duration::from_secs_f64(window * random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delays_leave_time_to_restart_and_grow_with_the_fleet() {
        assert_eq!(restart_drain(10), Duration::from_millis(302));
        assert_eq!(restart_drain(1_000_000), Duration::from_secs(3));
        assert_eq!(restart_delay(10, 1500.0, 0.0), Duration::from_millis(1302));
        assert_eq!(restart_delay(10, 1500.0, 1.0), Duration::from_millis(1802));
        assert_eq!(
            restart_delay(15_000, 1500.0, 1.0),
            Duration::from_millis(3000 + 1000 + 10_000)
        );
        assert_eq!(
            restart_delay(10_000_000, 1500.0, 1.0),
            Duration::from_secs(304)
        );
        assert_eq!(
            restart_delay(10_000, 1500.0, 7.0),
            restart_delay(10_000, 1500.0, 1.0)
        );
    }

    #[test]
    fn a_slower_machine_spreads_a_restart_over_a_proportionally_longer_window() {
        // The same handshake cost on half the cores: half the rate, twice the window.
        let cost = Duration::from_micros(230);
        let two = reconnect_rate(cost, 2);
        let one = reconnect_rate(cost, 1);
        assert!((two / one - 2.0).abs() < 1e-9, "{two} {one}");
        assert!((one - 1.0 / (0.000_230 * 5.0)).abs() < 1e-6, "{one}");
        // A machine half as fast per core: half the rate.
        assert!((reconnect_rate(cost * 2, 2) - one).abs() < 1e-9);
        let fleet = 10_000;
        let base = restart_delay(fleet, two, 0.0);
        let window_two = restart_delay(fleet, two, 1.0) - base;
        let window_one = restart_delay(fleet, one, 1.0) - base;
        let ratio = window_one.as_secs_f64() / window_two.as_secs_f64();
        assert!((ratio - 2.0).abs() < 1e-6, "{ratio}");
        // Bounds: an absurd measurement neither stops a restart nor floods the gateway.
        assert_eq!(
            reconnect_rate(Duration::from_secs(10), 1),
            MIN_RECONNECT_RATE
        );
        assert_eq!(reconnect_rate(Duration::ZERO, 64), MAX_RECONNECT_RATE);
        assert_eq!(
            restart_delay(1000, 1.0, 1.0),
            restart_delay(1000, MIN_RECONNECT_RATE, 1.0)
        );
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..10)
            .map(|_| {
                let c = b.ceiling().as_millis() as u64;
                b.next_delay(0.5);
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            vec![500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut b = Backoff::agent_default();
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
        let mut b2 = Backoff::agent_default();
        assert_eq!(b2.next_delay(0.999_999).as_millis(), 499);
    }

    #[test]
    fn reset_starts_over_and_huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::agent_default();
        for _ in 0..1000 {
            b.next_delay(1.0);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn suggested_delay_is_spread_by_a_quarter_at_most() {
        let d = Duration::from_secs(4);
        assert_eq!(Backoff::suggested(d, 0.0), d);
        assert_eq!(Backoff::suggested(d, 1.0), Duration::from_secs(5));
    }
}
