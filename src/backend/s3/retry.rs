//! Exponential backoff of spec 2.9: pauses double from `--initialRetryPause`, and their sum is
//! capped at `--maxRetryPause` (the last pause is cut so the sum hits the cap exactly).

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    budget_left: Duration,
    total: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max_total: Duration) -> Self {
        Backoff {
            next: initial.max(Duration::from_millis(1)),
            budget_left: max_total,
            total: Duration::ZERO,
        }
    }

    /// The pause before the next attempt, or `None` once the budget is spent.
    /// `jitter` in `[0, 1)` scales the nominal pause into `[0.75, 1.25)` of itself, so that
    /// threads failing together do not retry in lockstep.
    pub fn next_pause(&mut self, jitter: f64) -> Option<Duration> {
        if self.budget_left.is_zero() {
            return None;
        }
        let scaled = self.next.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0));
        let pause = scaled.min(self.budget_left);
        self.budget_left -= pause;
        self.total += pause;
        self.next = self.next.saturating_mul(2);
        Some(pause)
    }

    /// Sum of all pauses handed out so far.
    pub fn total(&self) -> Duration {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pauses(initial_ms: u64, max_ms: u64, jitter: f64) -> Vec<u64> {
        let mut b = Backoff::new(
            Duration::from_millis(initial_ms),
            Duration::from_millis(max_ms),
        );
        let mut out = Vec::new();
        let mut sum = Duration::ZERO;
        while let Some(p) = b.next_pause(jitter) {
            sum += p;
            out.push(p.as_millis() as u64);
            assert!(out.len() < 100, "backoff never ends");
        }
        assert_eq!(b.total(), sum);
        assert!(sum <= Duration::from_millis(max_ms));
        out
    }

    #[test]
    fn doubles_and_truncates_last_pause_to_the_cap() {
        // Nominal (jitter 0.5 = factor 1.0): 200, 400, 800, 1600, then 2000-... cut to the cap.
        assert_eq!(pauses(200, 5000, 0.5), vec![200, 400, 800, 1600, 2000]);
        assert_eq!(pauses(200, 30000, 0.5).iter().sum::<u64>(), 30000);
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        assert_eq!(pauses(200, 100_000, 0.0)[..3], [150, 300, 600]);
        assert_eq!(pauses(200, 100_000, 0.999)[..2], [249, 499]);
    }

    #[test]
    fn zero_budget_means_no_retry() {
        assert!(pauses(200, 0, 0.5).is_empty());
        assert_eq!(pauses(500, 100, 0.5), vec![100]);
    }
}
