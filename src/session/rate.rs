//! The client frame rate limit.

use std::time::Instant;

/// Token bucket: `rate` tokens per second, burst of `rate`; one client frame costs one token.
#[derive(Debug)]
pub(super) struct TokenBucket {
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub(super) const fn new() -> Self {
        Self { tokens: 0.0, last: None }
    }

    /// Takes a token at `now`; false when the bucket is empty. The first take finds it full.
    pub(super) fn take(&mut self, rate: f64, now: Instant) -> bool {
        self.tokens = match self.last {
            Some(last) => (self.tokens + now.saturating_duration_since(last).as_secs_f64() * rate).min(rate),
            None => rate,
        };
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn allows_a_burst_then_refuses() {
        let mut bucket = TokenBucket::new();
        let now = Instant::now();
        let allowed = (0..30).filter(|_| bucket.take(20.0, now)).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn refills_at_the_rate() {
        let mut bucket = TokenBucket::new();
        let start = Instant::now();
        assert_eq!((0..20).filter(|_| bucket.take(20.0, start)).count(), 20);
        assert!(!bucket.take(20.0, start));
        // 250 ms later: five tokens back, not more.
        let later = start + Duration::from_millis(250);
        assert_eq!((0..10).filter(|_| bucket.take(20.0, later)).count(), 5);
    }
}
