//! Exponential backoff between attempts, shared by every component that
//! retries: the client's reconnections, the synchronizer's broker and
//! server link, the operator's failed reconciles.

use std::time::Duration;

/// Delays that double from `min` up to `max`.
///
/// Short at first because a failover usually completes within seconds (the
/// coordinator promotes the slave after two missed heartbeats); capped so a
/// longer outage is still noticed within a second of its end.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `min`, never exceeding `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { next: min, min, max: max.max(min) }
    }

    /// The delay to wait now; the following one is twice as long.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay before attempt `n + 1` after `n` consecutive failures
    /// (n ≥ 1), for callers that keep a failure count rather than a
    /// `Backoff`.
    pub fn after_failures(min: Duration, max: Duration, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        min.saturating_mul(1u32 << doublings).min(max.max(min))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(1000));
        let delays: Vec<_> = (0..7).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000), ms(1000)]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(100));
    }

    #[test]
    fn a_failure_count_gives_the_same_delays() {
        let ms = Duration::from_millis;
        let delays: Vec<_> = (1..=7).map(|n| Backoff::after_failures(ms(100), ms(1000), n)).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000), ms(1000)]);
        assert_eq!(Backoff::after_failures(ms(100), ms(1000), u32::MAX), ms(1000), "no overflow");
    }
}
