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
//! Incoming messages are handed to [`Hub::deliver`] inside the connection's push callback: no
//! channel and no task per message. Publishing uses a separate connection and fails fast
//! (`broker.connect_timeout`, `broker.command_timeout`) while Redis is unreachable.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio::time::{sleep, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod probe;
mod subscription;

use self::probe::Probes;
use self::subscription::{Backoff, Outcome, Subscription};
use super::BrokerError;
use crate::hub::Hub;
use crate::metrics as m;
use crate::protocol::now_micros;
use crate::settings::{self, BrokerKind};

/// Where to connect.
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    Cluster(Vec<String>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry passwords; say only which mode.
        f.write_str(match self {
            Self::Single(_) => "Single",
            Self::Cluster(_) => "Cluster",
        })
    }
}

/// One connection, to a server or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

#[derive(Debug, Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    settings: settings::Broker,
    hub: Hub,
    shared: Arc<Shared>,
    publisher: Mutex<Option<PublisherConn>>,
    /// Serialises publisher (re)connects so an outage does not open one connection per request.
    connecting: tokio::sync::Mutex<()>,
}

/// State shared with the push callback, which runs on the connection's reader.
#[derive(Debug)]
struct Shared {
    hub: Hub,
    probes: Probes,
    /// Subscriber connected and every wanted channel confirmed.
    synced: AtomicBool,
    /// The subscriber connection (or, in cluster mode, one of its shard connections) dropped.
    disconnected: Notify,
    /// Wanted channels Redis unsubscribed on its own (their cluster slot moved); the
    /// subscription takes them and subscribes them again. Bounded by the wanted channels.
    moved: Mutex<Vec<Arc<str>>>,
    moved_notify: Notify,
}

struct PublisherConn(Conn);

impl std::fmt::Debug for PublisherConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublisherConn")
    }
}

impl RedisBroker {
    pub fn new(settings: &settings::Broker, hub: Hub) -> Result<Self, BrokerError> {
        let target = match settings.kind {
            BrokerKind::RedisCluster => Target::Cluster(settings.cluster_nodes.clone()),
            _ => {
                let info = settings
                    .redis_url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| BrokerError::Config(format!("broker.redis_url: {e}")))?;
                let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let client = redis::Client::open(info.set_redis_settings(resp3))
                    .map_err(|e| BrokerError::Config(format!("broker.redis_url: {e}")))?;
                Target::Single(client)
            }
        };
        let shared = Arc::new(Shared {
            hub: hub.clone(),
            probes: Probes::new(hub.node_id()),
            synced: AtomicBool::new(false),
            disconnected: Notify::new(),
            moved: Mutex::new(Vec::new()),
            moved_notify: Notify::new(),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                target,
                settings: settings.clone(),
                hub,
                shared,
                publisher: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Connected, subscribed to every wanted channel, and every probe (one per shard in
    /// cluster mode) came back recently.
    pub fn is_ready(&self) -> bool {
        let shared = &self.inner.shared;
        let fresh = now_micros().saturating_sub(shared.probes.oldest_us())
            < self.inner.settings.probe_timeout.as_micros() as u64;
        shared.synced.load(Ordering::Acquire) && fresh
    }

    fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster(_))
    }

    /// PUBLISH (or SPUBLISH in cluster mode), failing fast while Redis is unreachable.
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        let command = if self.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let mut conn = self.publisher().await?;
        let cmd = redis::cmd(command).arg(channel).arg(payload.as_ref()).clone();
        let result = match &mut conn {
            Conn::Single(c) => timeout(self.inner.settings.command_timeout, cmd.query_async::<i64>(c)).await,
            Conn::Cluster(c) => timeout(self.inner.settings.command_timeout, cmd.query_async::<i64>(c)).await,
        };
        metrics::counter!(m::BROKER_COMMANDS, "command" => command).increment(1);
        match result {
            Ok(Ok(_receivers)) => Ok(()),
            Ok(Err(e)) => {
                self.drop_publisher();
                Err(BrokerError::Unavailable(format!("{command} failed: {e}")))
            }
            Err(_) => {
                self.drop_publisher();
                Err(BrokerError::Unavailable(format!("{command} timed out")))
            }
        }
    }

    fn drop_publisher(&self) {
        *self.inner.publisher.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn cached_publisher(&self) -> Option<Conn> {
        self.inner.publisher.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|p| p.0.clone())
    }

    async fn publisher(&self) -> Result<Conn, BrokerError> {
        if let Some(conn) = self.cached_publisher() {
            return Ok(conn);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(conn) = self.cached_publisher() {
            return Ok(conn);
        }
        let conn = self.connect(None).await?;
        *self.inner.publisher.lock().unwrap_or_else(|p| p.into_inner()) = Some(PublisherConn(conn.clone()));
        Ok(conn)
    }

    /// Runs one command on the publisher connection (routed by key in cluster mode), failing
    /// fast while Redis is unreachable. The inbox runs its functions through this.
    pub async fn query(&self, cmd: &redis::Cmd) -> Result<Value, BrokerError> {
        let mut conn = self.publisher().await?;
        let limit = self.inner.settings.command_timeout;
        let result = match &mut conn {
            Conn::Single(c) => timeout(limit, cmd.query_async::<Value>(c)).await,
            Conn::Cluster(c) => timeout(limit, cmd.query_async::<Value>(c)).await,
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            // Redis answered with an error: the connection is fine.
            Ok(Err(e)) if e.code().is_some() => Err(BrokerError::Command(e.to_string())),
            Ok(Err(e)) => {
                self.drop_publisher();
                Err(BrokerError::Unavailable(e.to_string()))
            }
            Err(_) => {
                self.drop_publisher();
                Err(BrokerError::Unavailable("Redis command timed out".into()))
            }
        }
    }

    /// Whether this broker publishes with SPUBLISH (cluster mode).
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Opens a connection; with `push` it is a subscriber whose messages go to the hub.
    async fn connect(&self, push: Option<Arc<Shared>>) -> Result<Conn, BrokerError> {
        let s = &self.inner.settings;
        let attempt = async {
            match &self.inner.target {
                Target::Single(client) => {
                    let mut config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(s.connect_timeout))
                        .set_response_timeout(Some(s.command_timeout));
                    if let Some(shared) = push {
                        config = config.set_push_sender(move |info| shared.on_push(info));
                    }
                    client.get_multiplexed_async_connection_with_config(&config).await.map(Conn::Single)
                }
                Target::Cluster(nodes) => {
                    let mut builder = ClusterClientBuilder::new(nodes.clone())
                        .use_protocol(ProtocolVersion::RESP3)
                        .connection_timeout(s.connect_timeout)
                        .response_timeout(s.command_timeout)
                        .retries(2);
                    if let Some(shared) = push {
                        builder = builder.push_sender(move |info| shared.on_push(info));
                    }
                    let client = builder.build()?;
                    client.get_async_connection().await.map(Conn::Cluster)
                }
            }
        };
        match timeout(s.connect_timeout + s.command_timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(BrokerError::Unavailable(format!("cannot connect to Redis: {e}"))),
            Err(_) => Err(BrokerError::Unavailable("connecting to Redis timed out".into())),
        }
    }

    /// The subscriber task: runs until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.inner.settings.reconnect_min, self.inner.settings.reconnect_max);
        loop {
            let conn = tokio::select! {
                conn = self.connect(Some(self.inner.shared.clone())) => conn,
                () = stop.cancelled() => return,
            };
            match conn {
                Ok(conn) => {
                    info!("broker subscriber connected");
                    self.inner.hub.set_broker_up(true);
                    let outcome = Subscription::new(&self, conn).run(&stop, &mut backoff).await;
                    self.inner.shared.synced.store(false, Ordering::Release);
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

impl Shared {
    /// Runs on the connection's reader for every push: hand messages to the hub, note probes
    /// and disconnections. Must not block.
    fn on_push(&self, info: PushInfo) -> Result<(), Infallible> {
        match info.kind {
            PushKind::Message | PushKind::SMessage => {
                let mut data = info.data.into_iter();
                if let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) = (data.next(), data.next())
                {
                    let Ok(channel) = std::str::from_utf8(&channel) else { return Ok(()) };
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
                    self.moved.lock().unwrap_or_else(|p| p.into_inner()).push(channel.into());
                    self.moved_notify.notify_one();
                }
            }
            PushKind::Disconnection => self.disconnected.notify_one(),
            _ => {}
        }
        Ok(())
    }

    /// Takes the channels Redis unsubscribed on its own since the last call.
    fn take_moved(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut *self.moved.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
