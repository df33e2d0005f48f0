//! The heartbeat: when each session was last heard from, and the node-wide sweep that pings
//! every session once per interval and closes those that stayed silent after a ping. One sweep
//! for the node, walked in small steps, instead of a timer per connection (and instead of one
//! burst of pings).

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Hub, LocalSession};
use crate::metrics as m;
use crate::outbox::{Outgoing, PushError};
use crate::protocol::{CloseReason, WireFrame};

/// The sweep runs this often and visits one step's share of the sessions each time, so that
/// pings (one write per session) never leave as a burst that holds up notifications: at 19,000
/// sessions and a 25 s interval, 76 pings every 100 ms rather than 19,000 at once.
const TICK: Duration = Duration::from_millis(100);

/// Milliseconds on a process-wide monotonic clock.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One session's heartbeat bookkeeping.
#[derive(Debug)]
pub struct Liveness {
    /// When the client was last heard from ([`monotonic_ms`]).
    last_heard: AtomicU64,
    /// A ping was queued since the client was last heard from. Only then may silence close it:
    /// a session that arrives just after a sweep listed the sessions waits up to two
    /// intervals for its first ping, which can be longer than the timeout.
    pinged: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self { last_heard: AtomicU64::new(monotonic_ms()), pinged: AtomicBool::new(false) }
    }
}

impl Liveness {
    /// Records that a frame (any frame) arrived from the client.
    pub fn heard(&self) {
        self.last_heard.store(monotonic_ms(), Ordering::Relaxed);
        if self.pinged.load(Ordering::Relaxed) {
            self.pinged.store(false, Ordering::Relaxed);
        }
    }
}

/// One sweep step over `sessions` (a slice of [`Hub::session_refs`]): pings each session that
/// is still there, and closes those not heard from within `timeout` although pinged since they
/// were last heard. Returns how many it closed.
pub fn step(sessions: &[Weak<LocalSession>], timeout: Duration) -> usize {
    let now = monotonic_ms();
    let timeout = timeout.as_millis() as u64;
    let mut closed = 0;
    for session in sessions.iter().filter_map(Weak::upgrade) {
        let liveness = &session.liveness;
        let silent = now.saturating_sub(liveness.last_heard.load(Ordering::Relaxed)) >= timeout;
        if silent && liveness.pinged.load(Ordering::Relaxed) {
            session.outbox.close(CloseReason::HeartbeatTimeout);
            closed += 1;
        } else {
            // A full outbox here means a slow consumer: the push closes it, as fan-out would.
            // A session unregistering meanwhile refuses the push (its outbox is closed).
            match session.outbox.push(Outgoing::control(WireFrame::Ping)) {
                Ok(()) => liveness.pinged.store(true, Ordering::Relaxed),
                // Counted like fan-out's drops, so every slow-consumer close has its drop.
                Err(PushError::Full) => {
                    metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer").increment(1);
                }
                Err(PushError::Closed) => {}
            }
        }
    }
    closed
}

/// The node-wide sweep, until `stop`: every `interval`, ping every session and close the
/// silent ones. The sessions are listed (weakly) once per interval and walked through in
/// steps, each costing only its own sessions; a session that arrives meanwhile is first
/// visited in the next interval, and is pinged before its silence can close it.
pub async fn sweep(hub: Hub, interval: Duration, timeout: Duration, stop: CancellationToken) {
    let steps = (interval.as_millis() / TICK.as_millis()).max(1) as usize;
    let mut tick = tokio::time::interval(interval / steps as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; sessions were just heard
    let mut sessions = Vec::new();
    let mut at = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if at == 0 {
                    sessions = hub.session_refs();
                }
                let chunk = sessions.len().div_ceil(steps);
                let from = (at * chunk).min(sessions.len());
                let to = (from + chunk).min(sessions.len());
                let closed = step(&sessions[from..to], timeout);
                if closed > 0 {
                    tracing::debug!(closed, "closed silent sessions");
                }
                at = (at + 1) % steps;
            }
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::outbox::Outbox;
    use crate::protocol::Format;

    #[test]
    fn a_ping_that_finds_the_outbox_full_closes_a_slow_consumer_and_counts_its_drop() {
        let hub = Hub::new("n1", false);
        let session = Arc::new(LocalSession::new(hub.next_session_id(), "a".into(), Format::Raw, Outbox::new(1)));
        let _registration = hub.register(session.clone(), 10).expect("registered");
        session.outbox.push(Outgoing::control(WireFrame::Ping)).expect("room for one");
        session.liveness.heard();
        // A recorder of this test's own (the process-wide one is shared by every test).
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || step(&hub.session_refs(), Duration::from_secs(60)));
        assert_eq!(session.outbox.closing(), Some(CloseReason::SlowConsumer));
        let text = handle.render();
        assert!(text.contains("pushnode_messages_dropped_total{reason=\"slow_consumer\"} 1"), "{text}");
    }

    #[test]
    fn a_sweep_step_pings_the_heard_closes_the_silent_and_skips_the_departed() {
        let hub = Hub::new("n1", false);
        let session =
            |user: &str| Arc::new(LocalSession::new(hub.next_session_id(), user.into(), Format::Raw, Outbox::new(8)));
        let (alive, silent, gone, dropped) = (session("a"), session("b"), session("c"), session("d"));
        let mut registrations: Vec<_> =
            [&alive, &silent, &gone, &dropped].map(|s| hub.register(s.clone(), 10).expect("registered")).into();
        let sessions = hub.session_refs();
        assert_eq!(sessions.len(), 4);
        std::thread::sleep(Duration::from_millis(5));
        alive.liveness.heard();
        gone.liveness.heard();
        // Unregistered and gone (silent too): the snapshot did not keep it alive.
        drop(registrations.pop());
        drop(dropped);
        // Unregistered but still referenced elsewhere: its outbox refuses the ping.
        drop(registrations.pop());

        // Silent beyond the timeout but never pinged (it arrived after the last sweep): pinged
        // first, not closed.
        assert_eq!(step(&sessions, Duration::from_millis(2)), 0, "nobody was pinged yet");
        assert_eq!(silent.outbox.closing(), None);
        let mut batch = Vec::new();
        assert_eq!(alive.outbox.drain_into(&mut batch), None);
        assert_eq!(batch.iter().map(|o| &o.frame).collect::<Vec<_>>(), vec![&WireFrame::Ping]);
        assert_eq!(gone.outbox.len(), 0);

        // The answering session is heard again; the silent one stayed silent after its ping.
        std::thread::sleep(Duration::from_millis(1));
        alive.liveness.heard();
        assert_eq!(step(&sessions, Duration::from_millis(2)), 1, "only the pinged silent session closes");
        assert_eq!(silent.outbox.closing(), Some(CloseReason::HeartbeatTimeout));
        assert_eq!(alive.outbox.closing(), None);
    }
}
