//! The subscriber side of the Redis broker: one connected subscriber ([`Subscription`])
//! reconciling the channels Redis has with the ones the hub wants (batched SUBSCRIBE, delayed
//! UNSUBSCRIBE, retries, the probe), and the reconnect [`Backoff`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use redis::cluster_routing::Slot;
use tokio::time::{Instant, MissedTickBehavior, interval, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Lane, RedisBroker};
use crate::metrics as m;
use crate::protocol::now_micros;
use crate::redis_link::Conn;

/// In cluster mode the probes follow the slots every this many probe intervals.
const PROBE_REFRESH: u32 = 10;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Stopped,
    Lost,
}

/// One connected subscriber and the reconciliation of its channels with the hub's.
pub(super) struct Subscription<'a> {
    broker: &'a RedisBroker,
    /// The lane this connection serves.
    lane: &'a Lane,
    index: usize,
    conn: Conn,
    /// Confirmed by Redis.
    subscribed: HashSet<Arc<str>>,
    /// Wanted but not (yet) confirmed: retried with backoff.
    pending: HashSet<Arc<str>>,
    /// Unwanted but still subscribed, until the deadline (hysteresis).
    lingering: HashMap<Arc<str>, Instant>,
}

impl<'a> Subscription<'a> {
    pub(super) fn new(broker: &'a RedisBroker, index: usize, conn: Conn) -> Self {
        let lane = &broker.inner.lanes[index];
        Self {
            broker,
            lane,
            index,
            conn,
            subscribed: HashSet::new(),
            pending: HashSet::new(),
            lingering: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, stop: &CancellationToken, backoff: &mut Backoff) -> Outcome {
        let inner = &self.broker.inner;
        let settings = &inner.settings;
        let (hub, inbound) = (&self.lane.hub, self.lane.inbound.clone());

        // Full sync: every channel the hub wants, plus the probe channels (which also covers
        // any channel a slot move took from the previous connection).
        let started = Instant::now();
        inbound.take_moved();
        let Some(probes) = self.probe_channels().await else { return Outcome::Lost };
        inbound.probes.reset(&probes);
        hub.take_changes();
        self.pending.extend(hub.wanted());
        self.pending.extend(probes);
        if !self.flush_pending().await {
            return Outcome::Lost;
        }
        metrics::histogram!(m::BROKER_RESUBSCRIBE_DURATION).record(started.elapsed().as_secs_f64());
        // Sessions replay from the inbox what was published while we were not subscribed, and
        // whoever loaded something into Redis loads it again (it may have restarted).
        hub.resubscribed();
        inner.link.advance_epoch();
        debug!(channels = self.subscribed.len(), elapsed = ?started.elapsed(), "broker subscribed");
        backoff.reset();

        let connected_at = Instant::now();
        let mut probe = interval(settings.probe_interval);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut housekeeping = interval((settings.unsubscribe_delay / 2).max(Duration::from_millis(10)));
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry_at: Option<Instant> = None;
        let mut probes_sent = 0u32;

        loop {
            inbound.synced.store(self.pending.is_empty(), Ordering::Release);
            tokio::select! {
                () = stop.cancelled() => return Outcome::Stopped,
                () = inbound.disconnected.notified() => {
                    // In cluster mode this is one shard's connection. The client would redial
                    // it, but its subscriptions there are gone and slots may have moved:
                    // start over with a fresh connection and a full resubscribe.
                    warn!("broker subscriber connection lost");
                    return Outcome::Lost;
                }
                () = inbound.moved_notify.notified() => {
                    // Failures stay pending and are retried by the housekeeping tick.
                    self.on_moved();
                    self.flush_pending().await;
                }
                () = hub.changed() => {
                    self.on_interest_changes();
                    if !self.flush_pending().await && !self.is_cluster() {
                        return Outcome::Lost;
                    }
                }
                _ = housekeeping.tick() => {
                    if !self.unsubscribe_expired().await && !self.is_cluster() {
                        return Outcome::Lost;
                    }
                    if retry_at.is_some_and(|at| at <= Instant::now()) || (retry_at.is_none() && !self.pending.is_empty()) {
                        retry_at = if self.flush_pending().await { None } else { Some(Instant::now() + backoff.next()) };
                        if retry_at.is_none() {
                            backoff.reset();
                        }
                    }
                }
                _ = probe.tick() => {
                    probes_sent = probes_sent.wrapping_add(1);
                    if self.is_cluster() && probes_sent.is_multiple_of(PROBE_REFRESH) {
                        self.refresh_probes().await;
                    }
                    // Concurrently: a stalled shard must not hold up the others' probes.
                    let payload = Bytes::from(now_micros().to_string());
                    let channels = inbound.probes.channels();
                    let sent = join_all(channels.iter().map(|c| self.broker.publish(c, payload.clone()))).await;
                    if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
                        debug!(error = %e, "probe publish failed");
                    }
                    let silent_us = now_micros().saturating_sub(inbound.probes.oldest_us());
                    if connected_at.elapsed() > settings.probe_timeout
                        && silent_us > settings.probe_timeout.as_micros() as u64
                    {
                        warn!(silent = ?Duration::from_micros(silent_us), "broker subscriber receives nothing; reconnecting");
                        return Outcome::Lost;
                    }
                }
            }
        }
    }

    /// This subscription's probe channels: one, or one per shard from `CLUSTER SLOTS`.
    /// `None` if the cluster's slots cannot be read.
    async fn probe_channels(&self) -> Option<Vec<Arc<str>>> {
        let probes = &self.lane.inbound.probes;
        if !self.is_cluster() {
            return Some(vec![probes.single()]);
        }
        match self.broker.inner.link.query(redis::cmd("CLUSTER").arg("SLOTS")).await {
            Ok(slots) => Some(probes.per_shard(&slots)).filter(|channels| !channels.is_empty()),
            Err(e) => {
                warn!(error = %e, "cannot read the cluster's slots for the probes");
                None
            }
        }
    }

    /// Follows the cluster's slots: subscribes the probe of a new shard, drops a gone one's.
    async fn refresh_probes(&mut self) {
        let Some(channels) = self.probe_channels().await else { return };
        let (added, removed) = self.lane.inbound.probes.replace(&channels);
        if !added.is_empty() || !removed.is_empty() {
            debug!(added = added.len(), removed = removed.len(), "cluster slots moved; probes follow");
        }
        self.pending.extend(added);
        let now = Instant::now();
        self.lingering.extend(removed.into_iter().map(|c| (c, now)));
        self.flush_pending().await;
    }

    /// Channels Redis unsubscribed because their slot moved to another shard: their sessions
    /// learn of the gap first, then the channels are subscribed again (the cluster client
    /// routes them to the slot's new owner).
    fn on_moved(&mut self) {
        let moved = self.lane.inbound.take_moved();
        if moved.is_empty() {
            return;
        }
        info!(channels = moved.len(), "cluster slots moved; subscribing their channels on the new shards");
        metrics::counter!(m::BROKER_CHANNELS_MOVED).increment(moved.len() as u64);
        for channel in &moved {
            self.subscribed.remove(channel);
        }
        self.lane.hub.interrupt(&moved);
        self.pending.extend(moved);
    }

    fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Sorts the hub's interest changes into subscribe, keep, or linger.
    fn on_interest_changes(&mut self) {
        let hub = &self.lane.hub;
        let delay = self.broker.inner.settings.unsubscribe_delay;
        let mut live = Vec::new();
        for channel in hub.take_changes() {
            if hub.is_wanted(&channel) {
                self.lingering.remove(&channel);
                if self.subscribed.contains(&channel) {
                    live.push(channel);
                } else {
                    self.pending.insert(channel);
                }
            } else {
                self.pending.remove(&channel);
                if self.subscribed.contains(&channel) {
                    self.lingering.entry(channel).or_insert_with(|| Instant::now() + delay);
                }
            }
        }
        hub.mark_live(&live);
    }

    /// Subscribes every pending channel in batches and marks the confirmed ones live. False if
    /// a command failed (the failed channels stay pending, and not live).
    async fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let hub = &self.lane.hub;
        let probes = &self.lane.inbound.probes;
        let channels: Vec<Arc<str>> = self.pending.drain().filter(|c| probes.contains(c) || hub.is_wanted(c)).collect();
        let mut ok = true;
        for batch in channels.chunks(self.broker.inner.settings.subscribe_batch) {
            let failed = self.command(Command::Subscribe, batch).await;
            ok &= failed.is_empty();
            let confirmed: Vec<Arc<str>> = batch.iter().filter(|c| !failed.contains(c)).cloned().collect();
            self.subscribed.extend(confirmed.iter().cloned());
            hub.mark_live(&confirmed);
            self.pending.extend(failed);
        }
        self.broker.count_subscribed(self.index, self.subscribed.len());
        ok
    }

    /// Unsubscribes channels whose linger ran out and that nobody wants again.
    async fn unsubscribe_expired(&mut self) -> bool {
        let now = Instant::now();
        let hub = &self.lane.hub;
        let due: Vec<Arc<str>> = self.lingering.iter().filter(|(_, at)| **at <= now).map(|(c, _)| c.clone()).collect();
        let mut expired = Vec::with_capacity(due.len());
        for channel in due {
            self.lingering.remove(&channel);
            if !hub.is_wanted(&channel) && !self.lane.inbound.probes.contains(&channel) {
                expired.push(channel);
            }
        }
        let mut ok = true;
        for batch in expired.chunks(self.broker.inner.settings.subscribe_batch) {
            let failed = self.command(Command::Unsubscribe, batch).await;
            ok &= failed.is_empty();
            for channel in batch {
                if !failed.contains(channel) {
                    self.subscribed.remove(channel);
                }
            }
            // A failed unsubscribe is retried at the next linger check.
            for channel in failed {
                self.lingering.insert(channel, now);
            }
        }
        self.broker.count_subscribed(self.index, self.subscribed.len());
        ok
    }

    /// Runs one (S)SUBSCRIBE / (S)UNSUBSCRIBE batch and returns the channels that failed. In
    /// cluster mode channels are grouped by slot (a sharded command must stay in one slot) and
    /// the groups run concurrently.
    async fn command(&mut self, command: Command, batch: &[Arc<str>]) -> Vec<Arc<str>> {
        let limit = self.broker.inner.settings.command_timeout;
        match &mut self.conn {
            Conn::Single(conn) => {
                let name = command.name(false);
                metrics::counter!(m::BROKER_COMMANDS, "command" => name).increment(1);
                let names: Vec<&str> = batch.iter().map(|c| &**c).collect();
                let result = match command {
                    Command::Subscribe => timeout(limit, conn.subscribe(&names)).await,
                    Command::Unsubscribe => timeout(limit, conn.unsubscribe(&names)).await,
                };
                match result {
                    Ok(Ok(())) => Vec::new(),
                    Ok(Err(e)) => {
                        warn!(error = %e, command = name, "broker command failed");
                        batch.to_vec()
                    }
                    Err(_) => {
                        warn!(command = name, "broker command timed out");
                        batch.to_vec()
                    }
                }
            }
            Conn::Cluster(conn) => {
                let name = command.name(true);
                let mut groups: HashMap<Slot, Vec<Arc<str>>> = HashMap::new();
                for channel in batch {
                    groups.entry(Slot::for_key(channel.as_bytes())).or_default().push(channel.clone());
                }
                metrics::counter!(m::BROKER_COMMANDS, "command" => name).increment(groups.len() as u64);
                let runs = groups.into_values().map(|group| {
                    let mut conn = conn.clone();
                    async move {
                        let names: Vec<&str> = group.iter().map(|c| &**c).collect();
                        let result = match command {
                            Command::Subscribe => timeout(limit, conn.ssubscribe(&names)).await,
                            Command::Unsubscribe => timeout(limit, conn.sunsubscribe(&names)).await,
                        };
                        match result {
                            Ok(Ok(())) => Vec::new(),
                            Ok(Err(e)) => {
                                debug!(error = %e, command = name, "broker command failed");
                                group
                            }
                            Err(_) => group,
                        }
                    }
                });
                join_all(runs).await.into_iter().flatten().collect()
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Command {
    Subscribe,
    Unsubscribe,
}

impl Command {
    const fn name(self, sharded: bool) -> &'static str {
        match (self, sharded) {
            (Self::Subscribe, false) => "SUBSCRIBE",
            (Self::Unsubscribe, false) => "UNSUBSCRIBE",
            (Self::Subscribe, true) => "SSUBSCRIBE",
            (Self::Unsubscribe, true) => "SUNSUBSCRIBE",
        }
    }
}

/// Jittered exponential backoff: a random delay between half and all of `min * 2^attempt`,
/// capped at `max`. The jitter spreads many nodes' reconnects after a shared Redis restart.
#[derive(Debug)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, attempt: 0 }
    }

    pub(super) fn next(&mut self) -> Duration {
        let cap = self.min.saturating_mul(1 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let cap_ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(fastrand::u64(cap_ms / 2..=cap_ms))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        assert!(b.next() <= Duration::from_millis(50));
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_secs(2));
        }
        assert!(b.next() >= Duration::from_secs(1), "capped delays keep at least half the cap");
        b.reset();
        assert!(b.next() <= Duration::from_millis(50));
    }
}
