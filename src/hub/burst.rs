//! [`Burst`]: whether a lane's fan-out keeps up with what arrives, so that it may write frames
//! itself ([`crate::outbox::Outbox::offer`]) instead of waking the sessions' tasks.
//!
//! Writing a frame itself saves a session's task its wake-up, which at a paced rate is most of
//! a delivery's cost. But fan-out writes one frame after another on one thread, while woken
//! sessions write on every worker thread at once; a lane that only writes cannot keep up with
//! a Redis connection delivering as fast as Redis can send, and Redis drops a subscriber whose
//! output buffer overflows. So fan-out writes itself only at the start of a burst: deliveries
//! less than [`GAP`] apart belong to one burst, and after [`BUDGET`] of it the rest is queued
//! to the sessions until the lane catches its breath. At 20,000 or 50,000 small messages a
//! second in 1 ms pipelines every message starts or joins a short burst and is written
//! directly; at saturation almost all of them go through the sessions' tasks, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Deliveries closer together than this are one burst.
pub(super) const GAP: Duration = Duration::from_micros(100);
/// How long into a burst fan-out still writes frames itself.
pub(super) const BUDGET: Duration = Duration::from_millis(1);

/// One lane's current burst (times in microseconds since the hub started).
#[derive(Debug, Default)]
pub(super) struct Burst {
    started: AtomicU64,
    last: AtomicU64,
}

impl Burst {
    /// Records a delivery at `now`; whether fan-out may write its frames itself.
    pub(super) fn direct(&self, now: u64) -> bool {
        // One task delivers a lane's messages; other callers (API publishes without a broker)
        // only ever shorten or restart a burst, which is harmless.
        let last = self.last.swap(now, Ordering::Relaxed);
        if now.saturating_sub(last) > GAP.as_micros() as u64 {
            self.started.store(now, Ordering::Relaxed);
            return true;
        }
        now.saturating_sub(self.started.load(Ordering::Relaxed)) < BUDGET.as_micros() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaced_deliveries_are_written_directly_and_a_long_burst_is_handed_to_the_sessions() {
        let burst = Burst::default();
        let gap = GAP.as_micros() as u64;
        let budget = BUDGET.as_micros() as u64;
        // A pipeline every millisecond, 20 messages 10 µs apart: always the start of a burst.
        let mut t = 5_000;
        for _ in 0..10 {
            for k in 0..20 {
                assert!(burst.direct(t + k * 10));
            }
            t += 1_000;
        }
        // Continuous input: direct for the first `budget` µs only.
        let start = t + 10 * gap;
        let mut now = start;
        while now < start + 3 * budget {
            assert_eq!(burst.direct(now), now - start < budget, "at {} µs into the burst", now - start);
            now += gap / 2;
        }
        // A break longer than the gap starts a new burst.
        assert!(burst.direct(now + gap + 1));
    }
}
