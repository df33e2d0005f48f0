//! The client frame rate limit.

use std::time::Instant;

/// Token bucket: `rate` tokens per second, burst of `rate`; one client frame costs one token.
#[derive(Debug)]
pub(super) struct TokenBucket {
    tokens: f64,
    last: Instant,
    started: bool,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self { tokens: 0.0, last: Instant::now(), started: false }
    }
}

impl TokenBucket {
    /// Takes a token; false when the bucket is empty.
    pub(super) fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        if self.started {
            let refill = now.duration_since(self.last).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(rate);
        } else {
            self.tokens = rate;
            self.started = true;
        }
        self.last = now;
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
    use super::*;

    #[test]
    fn allows_a_burst_then_refuses() {
        let mut bucket = TokenBucket::default();
        let allowed = (0..30).filter(|_| bucket.take(20.0)).count();
        assert_eq!(allowed, 20);
    }
}
