//! When an agent renews its certificate, and what it does when renewal keeps failing.
//!
//! Pure: times are [`Duration`]s since the Unix epoch (the certificate's validity is wall-clock
//! time) and the caller supplies the random numbers, so the schedule is tested on simulated
//! time.
//!
//! - The first attempt is at two thirds of the certificate's lifetime, moved by up to a twelfth
//!   of the lifetime either way (between 7/12 and 9/12: days 52½ to 67½ of a 90-day
//!   certificate), so that a fleet enrolled on one day does not renew in one second.
//! - After a failure the agent tries again after a delay drawn between half and all of a
//!   ceiling that starts at a hundredth of the lifetime (at most 30 s) and doubles up to a
//!   twentieth (at most an hour). Never past the expiry.
//! - In the last tenth of the lifetime (9 days of 90) every failure is an alert: the agent
//!   logs it as an error, loudly, because the server goes dark when the certificate expires.
//! - Once expired there is nothing to renew: the agent must be enrolled again.

use std::time::Duration;

/// Where in the lifetime the first attempt is aimed, as a fraction.
const AIM: f64 = 2.0 / 3.0;
/// How far (as a fraction of the lifetime) the first attempt moves either way.
const JITTER: f64 = 1.0 / 12.0;
/// The fraction of the lifetime left below which a failed renewal is an alert.
const ALERT_LEFT: f64 = 0.1;
/// The first retry ceiling and its largest value, before scaling down to short lifetimes.
const RETRY_BASE: Duration = Duration::from_secs(30);
const RETRY_CAP: Duration = Duration::from_secs(3600);

/// How urgent renewing has become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Time enough: a failure is a warning.
    OnTime,
    /// Less than a tenth of the lifetime is left and the certificate is not renewed: every
    /// failure is logged as an error, with the time left.
    Alert { left: Duration },
    /// The certificate has expired: renewal is pointless, enroll again.
    Expired,
}

/// The renewal schedule of one certificate.
#[derive(Debug, Clone)]
pub struct RenewalSchedule {
    not_before: Duration,
    not_after: Duration,
    next: Duration,
    failures: u32,
}

impl RenewalSchedule {
    /// The schedule of a certificate valid from `not_before` to `not_after`; `random` is
    /// uniform in [0, 1) and places the first attempt.
    pub fn new(not_before: Duration, not_after: Duration, random: f64) -> Self {
        let lifetime = not_after.saturating_sub(not_before);
        let fraction = AIM + JITTER * (2.0 * random.clamp(0.0, 1.0) - 1.0);
        Self {
            not_before,
            not_after,
            next: not_before + whole_millis(lifetime.mul_f64(fraction)),
            failures: 0,
        }
    }

    /// The certificate's whole lifetime.
    pub fn lifetime(&self) -> Duration {
        self.not_after.saturating_sub(self.not_before)
    }

    /// When the next attempt is due.
    pub fn next_attempt(&self) -> Duration {
        self.next
    }

    /// Failed attempts so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How urgent renewing is at `now`.
    pub fn urgency(&self, now: Duration) -> Urgency {
        if now >= self.not_after {
            return Urgency::Expired;
        }
        let left = self.not_after - now;
        if left < self.lifetime().mul_f64(ALERT_LEFT) {
            Urgency::Alert { left }
        } else {
            Urgency::OnTime
        }
    }

    /// An attempt at `now` failed: the next one is scheduled (see [`Self::next_attempt`]),
    /// and the answer says how loudly to report the failure.
    pub fn failed(&mut self, now: Duration, random: f64) -> Urgency {
        let ceiling = self.retry_ceiling();
        self.failures = self.failures.saturating_add(1);
        let delay = whole_millis(ceiling.mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0)));
        // Never later than the expiry: by then there is nothing left to renew.
        self.next = (now + delay).min(self.not_after.max(now));
        self.urgency(now)
    }

    /// The current retry ceiling: the base doubled per failure up to the cap, both scaled
    /// down for short lifetimes (a 90-day certificate: 30 s up to an hour).
    fn retry_ceiling(&self) -> Duration {
        let lifetime = self.lifetime();
        let base = RETRY_BASE.min(lifetime / 100);
        let cap = RETRY_CAP.min(lifetime / 20);
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        base.saturating_mul(factor).min(cap)
    }
}

/// Rounded to the millisecond: floating-point products land a nanosecond off otherwise.
fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn days(d: f64) -> Duration {
        DAY.mul_f64(d)
    }

    #[test]
    fn the_first_attempt_is_at_two_thirds_within_the_jitter_bounds() {
        let start = days(20_000.0);
        let end = start + days(90.0);
        assert_eq!(
            RenewalSchedule::new(start, end, 0.5).next_attempt(),
            start + days(60.0)
        );
        assert_eq!(
            RenewalSchedule::new(start, end, 0.0).next_attempt(),
            start + days(52.5)
        );
        // Out-of-range randomness is clamped, never a renewal outside the window.
        assert_eq!(
            RenewalSchedule::new(start, end, 7.0).next_attempt(),
            start + days(67.5)
        );
        // A fleet enrolled in one second spreads over the whole window.
        let mut attempts: Vec<Duration> = (0..1000)
            .map(|i| RenewalSchedule::new(start, end, f64::from(i) / 1000.0).next_attempt())
            .collect();
        attempts.sort();
        attempts.dedup();
        assert_eq!(attempts.len(), 1000);
        assert!(attempts
            .iter()
            .all(|a| *a >= start + days(52.5) && *a <= start + days(67.5)));
    }

    #[test]
    fn a_certificate_of_seconds_renews_in_seconds() {
        let start = Duration::from_secs(1_000);
        let s = RenewalSchedule::new(start, start + Duration::from_secs(6), 0.5);
        assert_eq!(s.next_attempt(), start + Duration::from_secs(4));
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap_and_stay_before_the_expiry() {
        let start = days(20_000.0);
        let end = start + days(90.0);
        let mut s = RenewalSchedule::new(start, end, 0.5);
        let mut now = s.next_attempt();
        let mut delays = Vec::new();
        for _ in 0..12 {
            assert_eq!(s.failed(now, 1.0), Urgency::OnTime);
            delays.push(s.next_attempt() - now);
            now = s.next_attempt();
        }
        assert_eq!(delays[0], Duration::from_secs(30));
        assert_eq!(delays[1], Duration::from_secs(60));
        assert_eq!(delays[2], Duration::from_secs(120));
        assert_eq!(*delays.last().expect("delays"), Duration::from_secs(3600));
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        // The jitter draws between half and all of the ceiling.
        let mut low = RenewalSchedule::new(start, end, 0.5);
        let at = low.next_attempt();
        low.failed(at, 0.0);
        assert_eq!(low.next_attempt() - at, Duration::from_secs(15));
        assert_eq!(low.failures(), 1);
    }

    #[test]
    fn renewal_failing_near_the_expiry_is_an_alert_then_expired() {
        let start = days(20_000.0);
        let end = start + days(90.0);
        let mut s = RenewalSchedule::new(start, end, 0.5);
        assert_eq!(s.failed(start + days(80.0), 0.5), Urgency::OnTime);
        assert_eq!(
            s.failed(start + days(82.0), 0.5),
            Urgency::Alert { left: days(8.0) }
        );
        // Retrying keeps going up to the end, never past it.
        let just_before = end - Duration::from_secs(10);
        assert!(matches!(s.failed(just_before, 1.0), Urgency::Alert { .. }));
        assert_eq!(s.next_attempt(), end);
        assert_eq!(s.failed(end, 0.5), Urgency::Expired);
        assert_eq!(s.urgency(end + DAY), Urgency::Expired);
    }

    #[test]
    fn short_lifetimes_retry_quickly() {
        let start = Duration::from_secs(1_000);
        let mut s = RenewalSchedule::new(start, start + Duration::from_secs(6), 0.5);
        let at = s.next_attempt();
        s.failed(at, 1.0);
        assert_eq!(s.next_attempt() - at, Duration::from_millis(60));
        for _ in 0..10 {
            let now = s.next_attempt();
            s.failed(now, 1.0);
        }
        // Capped at a twentieth of the lifetime.
        let now = s.next_attempt();
        s.failed(now, 1.0);
        assert!(s.next_attempt() - now <= Duration::from_millis(300));
    }
}
