//! The Redis broker: one Redis server (SUBSCRIBE / PUBLISH) or a Redis Cluster with sharded
//! pub/sub (SSUBSCRIBE / SPUBLISH, grouped by slot).
//!
//! One task owns the subscriber connection (RESP3; in cluster mode one connection per shard,
//! managed by the `redis` crate) and reconciles what Redis has with what the hub wants:
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
//! Incoming messages are handed to [`Subscriptions::deliver`] inside the connection's push
//! callback: no channel and no task per message. Publishing goes through the link's shared
//! command connection ([`RedisLink::query`]) and fails fast (`broker.connect_timeout`,
//! `broker.command_timeout`) while Redis is unreachable.
//!
//! The broker sees the hub only as [`Subscriptions`]: interest changes in, deliveries and
//! confirmations out.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
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
    hub: Subscriptions,
    inbound: Arc<Inbound>,
}

/// What the subscriber connection's push callback sees; it runs on the connection's reader.
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
    pub fn new(settings: &settings::Broker, link: RedisLink, hub: Subscriptions) -> Self {
        let inbound = Arc::new(Inbound {
            probes: Probes::new(hub.node_id()),
            hub: hub.clone(),
            synced: AtomicBool::new(false),
            disconnected: Notify::new(),
            moved: Mutex::new(HashSet::new()),
            moved_notify: Notify::new(),
        });
        Self { inner: Arc::new(Inner { link, settings: settings.clone(), hub, inbound }) }
    }

    /// Connected, subscribed to every wanted channel, and every probe (one per shard in
    /// cluster mode) came back recently.
    pub fn is_ready(&self) -> bool {
        let inbound = &self.inner.inbound;
        let fresh = now_micros().saturating_sub(inbound.probes.oldest_us())
            < self.inner.settings.probe_timeout.as_micros() as u64;
        inbound.synced.load(Ordering::Acquire) && fresh
    }

    /// How long ago the subscriber last proved it works (one of its probes came back), across
    /// reconnects; `None` if it never did.
    pub fn healthy_ago(&self) -> Option<Duration> {
        let at = self.inner.inbound.probes.last_heard_us();
        (at > 0).then(|| Duration::from_micros(now_micros().saturating_sub(at)))
    }

    /// PUBLISH (or SPUBLISH in cluster mode), failing fast while Redis is unreachable.
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        let command = self.inner.link.publish_command();
        metrics::counter!(m::BROKER_COMMANDS, "command" => command).increment(1);
        let cmd = redis::cmd(command).arg(channel).arg(payload.as_ref()).clone();
        self.inner.link.query(&cmd).await.map(|_receivers| ()).map_err(BrokerError::from)
    }

    /// The subscriber task: runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.inner.settings.reconnect_min, self.inner.settings.reconnect_max);
        loop {
            let inbound = self.inner.inbound.clone();
            let conn = tokio::select! {
                conn = self.inner.link.connect_subscriber(move |info| inbound.on_push(info)) => conn,
                () = stop.cancelled() => return,
            };
            match conn {
                Ok(conn) => {
                    info!("broker subscriber connected");
                    self.inner.hub.set_broker_up(true);
                    let outcome = Subscription::new(&self, conn).run(&stop, &mut backoff).await;
                    self.inner.inbound.synced.store(false, Ordering::Release);
                    self.inner.hub.mark_all_down();
                    if outcome == Outcome::Stopped {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "broker subscriber cannot connect"),
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
