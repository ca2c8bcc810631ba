//! Admission of new agent handshakes at the gateway: a token bucket refilled at the rate the
//! machine was measured to sustain.
//!
//! A handshake past the rate is not answered (the gateway drops its first packet without
//! keeping any state or doing any cryptography), and the client sends it again after its
//! probe timeout, about a second later. The handshakes admitted finish at full speed. Without
//! admission every handshake slows down together once arrivals outrun the machine, clients
//! retransmit and then give up, and the work done for them is lost: the collapse a reconnect
//! storm falls into (docs/benchmarks.md). A bucket (and not a limit on handshakes in flight)
//! because a handshake's time in flight includes the client's and the network's, which say
//! nothing about this machine's capacity, and because nothing a stalled peer does can hold
//! admission for anyone else.
//!
//! First packets can be sent from forged addresses at no cost, so a flood of them could take
//! every admission from the real agents. Half the bucket is therefore kept for clients whose
//! address is proven: an unproven one is admitted only while the bucket is more than half full,
//! and otherwise asked for a stateless retry (QUIC's Retry packet, which costs this side one
//! MAC and no state); a real client answers it within a round trip and comes back proven, a
//! forged address never does. Whatever a forging attacker sends, proven clients keep the
//! whole refill rate.
//!
//! Pure: the caller passes the time, so the behaviour is testable with simulated time.

use std::time::{Duration, Instant};

/// Headroom of admission over the rate a restart spreads reconnects at: the schedule never
/// meets the bucket, only an unscheduled flood (a crash, a network coming back) does.
pub const HEADROOM: f64 = 1.5;

/// How much of a second's worth of handshakes may arrive at once.
pub const BURST: Duration = Duration::from_millis(100);

/// What to do with a new handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead (a token was taken).
    Admit,
    /// Ask the client to prove its address with a stateless retry; no token was taken.
    Retry,
    /// No answer: the client retransmits its first packet after its probe timeout.
    Defer,
}

#[derive(Debug, Clone)]
pub struct HandshakeAdmission {
    rate: f64,
    tokens: f64,
    last: Instant,
    admitted: u64,
    retried: u64,
    deferred: u64,
}

impl HandshakeAdmission {
    /// Admits `rate` handshakes per second (at least one), starting with a full burst.
    pub fn new(rate: f64, now: Instant) -> Self {
        let rate = rate.max(1.0);
        Self {
            rate,
            tokens: Self::capacity_for(rate),
            last: now,
            admitted: 0,
            retried: 0,
            deferred: 0,
        }
    }

    fn capacity_for(rate: f64) -> f64 {
        (rate * BURST.as_secs_f64()).max(1.0)
    }

    /// Changes the rate from now on (a new measurement, an operator's setting).
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1.0);
        self.tokens = self.tokens.min(Self::capacity_for(self.rate));
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(Self::capacity_for(self.rate));
    }

    /// A new handshake arrived at `now`. `address_validated`: the client already answered a
    /// retry (its address is real); `may_retry`: a retry can still be asked of it.
    pub fn decide(&mut self, now: Instant, address_validated: bool, may_retry: bool) -> Decision {
        self.refill(now);
        // Proven clients may take any token; unproven ones only those above the reserve.
        let reserve = if address_validated {
            0.0
        } else {
            Self::capacity_for(self.rate) / 2.0
        };
        if self.tokens >= 1.0 + reserve {
            self.tokens -= 1.0;
            self.admitted += 1;
            Decision::Admit
        } else if !address_validated && may_retry {
            self.retried += 1;
            Decision::Retry
        } else {
            self.deferred += 1;
            Decision::Defer
        }
    }

    /// Retries asked so far.
    pub fn retried(&self) -> u64 {
        self.retried
    }

    pub fn admitted(&self) -> u64 {
        self.admitted
    }

    /// Handshakes left unanswered so far.
    pub fn deferred(&self) -> u64 {
        self.deferred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offers `per_sec` handshakes a second, evenly, for `secs` seconds of simulated time.
    fn offer(admission: &mut HandshakeAdmission, start: Instant, per_sec: u32, secs: u32) -> u64 {
        let before = admission.admitted();
        for i in 0..per_sec * secs {
            let at = start + Duration::from_secs_f64(f64::from(i) / f64::from(per_sec));
            admission.decide(at, true, false);
        }
        admission.admitted() - before
    }

    #[test]
    fn arrivals_under_the_rate_are_all_admitted() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(1000.0, start);
        assert_eq!(offer(&mut admission, start, 900, 10), 9000);
        assert_eq!(admission.deferred(), 0);
    }

    #[test]
    fn a_flood_is_admitted_at_the_rate_and_the_rest_deferred() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(1000.0, start);
        // Five times the rate for 4 s: the burst plus 1,000 a second, no more.
        let admitted = offer(&mut admission, start, 5000, 4);
        assert!((4000..=4101).contains(&admitted), "{admitted}");
        assert_eq!(admission.deferred(), 20_000 - admitted);
        // All at one instant: one burst's worth.
        let later = start + Duration::from_secs(60);
        let mut at_once = 0;
        for _ in 0..10_000 {
            if admission.decide(later, true, false) == Decision::Admit {
                at_once += 1;
            }
        }
        assert_eq!(at_once, 100);
    }

    #[test]
    fn a_quiet_gateway_saves_no_more_than_one_burst() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(500.0, start);
        let later = start + Duration::from_secs(3600);
        let admitted = (0..10_000)
            .filter(|_| admission.decide(later, true, false) == Decision::Admit)
            .count();
        assert_eq!(admitted, 50);
    }

    #[test]
    fn a_new_rate_applies_from_then_on_and_time_going_backwards_changes_nothing() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(100.0, start);
        let t1 = start + Duration::from_secs(10);
        admission.set_rate(2000.0, t1);
        assert_eq!(admission.rate(), 2000.0);
        // The burst was 10 at 100/s; the refill at the new rate starts at t1.
        assert_eq!(offer(&mut admission, t1, 4000, 1), 10 + 2000 - 1);
        // An earlier instant than the last one neither refills nor panics.
        let before = admission.admitted();
        assert_eq!(admission.decide(start, true, false), Decision::Defer);
        assert_eq!(admission.admitted(), before);
        // A rate of zero is one a second, never a gateway that admits nobody.
        admission.set_rate(0.0, t1 + Duration::from_secs(5));
        assert_eq!(
            admission.decide(t1 + Duration::from_secs(6), true, false),
            Decision::Admit
        );
    }

    #[test]
    fn a_flood_from_forged_addresses_leaves_proven_clients_the_whole_rate() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(1000.0, start);
        // 20,000 forged first packets a second (never validated; each may be retried once)
        // and 500 real clients a second, each coming back validated after its retry.
        let mut real_admitted = 0;
        let mut forged_admitted = 0;
        for i in 0..20_000u32 * 4 {
            let at = start + Duration::from_secs_f64(f64::from(i) / 20_000.0);
            if admission.decide(at, false, true) == Decision::Admit {
                forged_admitted += 1;
            }
            if i % 40 == 0 {
                let real = match admission.decide(at, false, true) {
                    Decision::Retry => admission.decide(at, true, false),
                    other => other,
                };
                if real == Decision::Admit {
                    real_admitted += 1;
                }
            }
        }
        // Four seconds of 500 real clients a second: every one of them got in.
        assert_eq!(real_admitted, 2000);
        // The forged ones got at most what was left: the rate, minus the real clients'
        // share, plus the unreserved half of the first burst.
        assert!(forged_admitted <= 4000 - 2000 + 100, "{forged_admitted}");
        assert!(admission.retried() > 70_000);
    }

    #[test]
    fn an_unproven_client_is_admitted_while_the_bucket_is_over_half_full_and_retried_after() {
        let start = Instant::now();
        let mut admission = HandshakeAdmission::new(100.0, start);
        // A burst of 10: five unproven clients go straight in, the rest are asked to retry.
        let decisions: Vec<Decision> = (0..10)
            .map(|_| admission.decide(start, false, true))
            .collect();
        assert_eq!(
            decisions.iter().filter(|d| **d == Decision::Admit).count(),
            5
        );
        assert_eq!(
            decisions.iter().filter(|d| **d == Decision::Retry).count(),
            5
        );
        // Proven, they take the reserved half.
        let proven: Vec<Decision> = (0..6)
            .map(|_| admission.decide(start, true, false))
            .collect();
        assert_eq!(proven.iter().filter(|d| **d == Decision::Admit).count(), 5);
        assert_eq!(proven[5], Decision::Defer);
        // A client that was retried already and is still unproven is not retried again.
        assert_eq!(admission.decide(start, false, false), Decision::Defer);
    }
}
