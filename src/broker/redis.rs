//! The Redis broker: one Redis server (SUBSCRIBE / PUBLISH) or a Redis Cluster with sharded
//! pub/sub (SSUBSCRIBE / SPUBLISH, grouped by slot).
//!
//! The node's channels are spread over `broker.subscriber_connections` **lanes** by a hash of
//! their name (see [`crate::hub::Subscriptions`]), so that parsing Redis pushes and fanning
//! them out run on as many connections, and tasks, as the node has worker threads. A channel
//! stays in its lane: its messages arrive over one connection, in order.
//!
//! One task per lane owns its subscriber connection (RESP3; in cluster mode one connection
//! per shard, managed by the `redis` crate) and reconciles what Redis has with what the hub
//! wants of that lane:
//! - the first local session of a channel makes it SUBSCRIBE (in batches of
//!   `broker.subscribe_batch`); the hub is told the channel is live once Redis confirmed;
//! - when the last session leaves, the channel stays subscribed for `broker.unsubscribe_delay`
//!   and is UNSUBSCRIBEd only if nobody came back (reconnect churn costs no commands);
//! - after a lost connection it reconnects with jittered exponential backoff and
//!   resubscribes every wanted channel in batches;
//! - in cluster mode, a slot that moves to another shard takes its sharded subscriptions with
//!   it (Redis sends SUNSUBSCRIBE on its own): those channels are subscribed again on the new
//!   shard, and their sessions replay the gap from the inbox;
//! - every `broker.probe_interval` it publishes a probe on each of its probe channels (one, or
//!   one per shard in cluster mode; see [`probe`]) through the publisher connection; a
//!   subscriber that has not seen every probe for `broker.probe_timeout` is treated as dead
//!   (connected but no longer receiving) and reconnected, and readiness fails meanwhile.
//!
//! Lanes fail and recover independently: a lost connection marks only its lane's channels
//! down, and only sessions whose user channel is in that lane replay a gap. The node is ready
//! when every lane is.
//!
//! Incoming messages are handed to [`Subscriptions::deliver`] inside the connection's push
//! callback: no channel and no task per message. Publishing goes through the link's shared
//! command connection ([`RedisLink::query`]) and fails fast (`broker.connect_timeout`,
//! `broker.command_timeout`) while Redis is unreachable.
//!
//! The broker sees the hub only as [`Subscriptions`]: interest changes in, deliveries and
//! confirmations out.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod probe;
mod subscription;

use self::probe::Probes;
use self::subscription::{Backoff, Outcome, Subscription};
use super::BrokerError;
use crate::hub::Subscriptions;
use crate::metrics as m;
use crate::protocol::now_micros;
use crate::redis_link::RedisLink;
use crate::settings;

#[derive(Debug, Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: RedisLink,
    settings: settings::Broker,
    /// One per subscriber connection.
    lanes: Box<[Lane]>,
    /// Channels subscribed, per lane; their sum is the `pushnode_broker_subscriptions` gauge.
    subscribed: Box<[AtomicUsize]>,
}

/// One subscriber connection's share of the node: its view of the hub and what its push
/// callback sees.
#[derive(Debug)]
struct Lane {
    hub: Subscriptions,
    inbound: Arc<Inbound>,
}

/// What a subscriber connection's push callback sees; it runs on the connection's reader.
#[derive(Debug)]
struct Inbound {
    hub: Subscriptions,
    probes: Probes,
    /// Subscriber connected and every wanted channel confirmed.
    synced: AtomicBool,
    /// The subscriber connection (or, in cluster mode, one of its shard connections) dropped.
    disconnected: Notify,
    /// Wanted channels Redis unsubscribed on its own (their cluster slot moved); the
    /// subscription takes them and subscribes them again. A set, so it never holds more than
    /// the wanted channels and the probes, however often slots move before it is drained.
    moved: Mutex<HashSet<Arc<str>>>,
    moved_notify: Notify,
}

impl RedisBroker {
    /// A broker with one subscriber connection per lane of `hub` (at least one).
    pub fn new(settings: &settings::Broker, link: RedisLink, hub: Subscriptions) -> Self {
        let lanes: Box<[Lane]> = (0..hub.lanes().max(1))
            .map(|k| {
                let hub = hub.lane(k);
                // Lane 0 keeps the node's own probe name; the others add their number.
                let probe_id = if k == 0 { hub.node_id().to_owned() } else { format!("{}#{k}", hub.node_id()) };
                let inbound = Arc::new(Inbound {
                    probes: Probes::new(&probe_id),
                    hub: hub.clone(),
                    synced: AtomicBool::new(false),
                    disconnected: Notify::new(),
                    moved: Mutex::new(HashSet::new()),
                    moved_notify: Notify::new(),
                });
                Lane { hub, inbound }
            })
            .collect();
        let subscribed = lanes.iter().map(|_| AtomicUsize::new(0)).collect();
        Self { inner: Arc::new(Inner { link, settings: settings.clone(), lanes, subscribed }) }
    }

    /// Every lane connected, subscribed to every wanted channel, and every probe (one per
    /// shard in cluster mode) came back recently.
    pub fn is_ready(&self) -> bool {
        let limit = self.inner.settings.probe_timeout.as_micros() as u64;
        self.inner.lanes.iter().all(|lane| {
            let inbound = &lane.inbound;
            let fresh = now_micros().saturating_sub(inbound.probes.oldest_us()) < limit;
            inbound.synced.load(Ordering::Acquire) && fresh
        })
    }

    /// How long ago every subscriber connection last proved it works (one of its probes came
    /// back), across reconnects: the stalest lane's; `None` if one never did.
    pub fn healthy_ago(&self) -> Option<Duration> {
        let oldest = self.inner.lanes.iter().map(|lane| lane.inbound.probes.last_heard_us()).min().unwrap_or(0);
        (oldest > 0).then(|| Duration::from_micros(now_micros().saturating_sub(oldest)))
    }

    /// When the stalest probe of any lane last came back, in microseconds since the epoch (0:
    /// one never did).
    pub fn oldest_probe_us(&self) -> u64 {
        self.inner.lanes.iter().map(|lane| lane.inbound.probes.oldest_us()).min().unwrap_or(0)
    }

    /// Records lane `lane`'s subscription count and sets the node's gauge to the sum.
    fn count_subscribed(&self, lane: usize, channels: usize) {
        self.inner.subscribed[lane].store(channels, Ordering::Relaxed);
        let total: usize = self.inner.subscribed.iter().map(|n| n.load(Ordering::Relaxed)).sum();
        metrics::gauge!(m::BROKER_SUBSCRIPTIONS).set(total as f64);
    }

    /// PUBLISH (or SPUBLISH in cluster mode), failing fast while Redis is unreachable.
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        let command = self.inner.link.publish_command();
        metrics::counter!(m::BROKER_COMMANDS, "command" => command).increment(1);
        let cmd = redis::cmd(command).arg(channel).arg(payload.as_ref()).clone();
        self.inner.link.query(&cmd).await.map(|_receivers| ()).map_err(BrokerError::from)
    }

    /// The subscriber tasks, one per lane: run until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        join_all((0..self.inner.lanes.len()).map(|k| self.clone().run_lane(k, stop.clone()))).await;
    }

    /// One lane's subscriber connection, reconnected whenever it is lost.
    async fn run_lane(self, k: usize, stop: CancellationToken) {
        let lane = &self.inner.lanes[k];
        let mut backoff = Backoff::new(self.inner.settings.reconnect_min, self.inner.settings.reconnect_max);
        loop {
            let inbound = lane.inbound.clone();
            let conn = tokio::select! {
                conn = self.inner.link.connect_subscriber(move |info| inbound.on_push(info)) => conn,
                () = stop.cancelled() => return,
            };
            match conn {
                Ok(conn) => {
                    info!(lane = k, "broker subscriber connected");
                    lane.hub.set_broker_up(true);
                    let outcome = Subscription::new(&self, k, conn).run(&stop, &mut backoff).await;
                    lane.inbound.synced.store(false, Ordering::Release);
                    lane.hub.mark_all_down();
                    if outcome == Outcome::Stopped {
                        return;
                    }
                }
                Err(e) => warn!(lane = k, error = %e, "broker subscriber cannot connect"),
            }
            metrics::counter!(m::BROKER_RECONNECTS).increment(1);
            tokio::select! {
                () = sleep(backoff.next()) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

impl Inbound {
    /// Runs on the connection's reader for every push: hand messages to the hub, note probes
    /// and disconnections. Must not block.
    fn on_push(&self, info: PushInfo) {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = info.data.into_iter();
                if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next())
                {
                    let Ok(channel) = std::str::from_utf8(&channel) else { return };
                    if !self.probes.came_back(channel) {
                        self.hub.deliver(channel, &Bytes::from(payload));
                    }
                }
            }
            // Redis Cluster unsubscribes a slot's sharded channels when the slot moves to
            // another shard. Our own SUNSUBSCRIBEs only confirm channels nobody wants.
            PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(channel)) = info.data.first()
                    && let Ok(channel) = std::str::from_utf8(channel)
                    && (self.hub.is_wanted(channel) || self.probes.contains(channel))
                {
                    self.moved.lock().insert(channel.into());
                    self.moved_notify.notify_one();
                }
            }
            PushKind::Disconnection => self.disconnected.notify_one(),
            _ => {}
        }
    }

    /// Takes the channels Redis unsubscribed on its own since the last call.
    fn take_moved(&self) -> Vec<Arc<str>> {
        self.moved.lock().drain().collect()
    }
}
