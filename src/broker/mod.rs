//! `Broker`: the cross-node transport. A node publishes a payload on a channel; every node with
//! a local listener on that channel hands it to its [`Hub`](crate::hub::Hub).
//!
//! Kinds: `memory` (one node, in process), `redis` (one server, SUBSCRIBE/PUBLISH) and
//! `redis-cluster` (sharded pub/sub). The broker knows channels and payloads, never sockets or
//! sessions. It sees the hub only as [`Subscriptions`]: it learns which channels to subscribe
//! from their interest changes, and hands them deliveries and confirmations.
//!
//! Guarantee: live delivery is at most once. A payload published while a node is not
//! subscribed (not yet, or during a reconnect) is not delivered live to that node's sessions.

mod memory;
mod redis;

use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::Subscriptions;
use crate::redis_link::{LinkError, RedisLink};
use crate::settings::{self, BrokerKind};

pub use self::memory::MemoryBroker;
pub use self::redis::RedisBroker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Redis cannot be reached (or did not answer in time): nothing more will get through
    /// until it is back.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Redis answered this publish with an error (a permission, say); others may still work.
    #[error("broker refused the publish: {0}")]
    Refused(String),
}

impl From<LinkError> for BrokerError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Command(e) => Self::Refused(e),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl BrokerError {
    /// Whether Redis itself is out of reach (not just refusing this one command).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// What readiness needs to know about the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerStatus {
    /// Connected, subscribed to every wanted channel, and its probe is fresh.
    pub ready: bool,
    /// How long ago the broker last proved it works; `None` if it never did (a node starting
    /// without Redis).
    pub healthy_ago: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum Broker {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// Builds the broker and starts its background task (if it has one) on `tracker`: over
    /// `link` when there is one, in process otherwise.
    pub fn start(
        settings: &settings::Broker,
        link: Option<RedisLink>,
        hub: Subscriptions,
        tracker: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        match link {
            None => Self::Memory(MemoryBroker::new(hub)),
            Some(link) => {
                let broker = RedisBroker::new(settings, link, hub);
                tracker.spawn(broker.clone().run(stop));
                Self::Redis(broker)
            }
        }
    }

    /// Whether the hub must record interest changes for this kind of broker.
    pub fn tracks_interest(kind: BrokerKind) -> bool {
        !matches!(kind, BrokerKind::Memory)
    }

    /// Publishes `payload` on `channel`, to every node (this one included).
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        match self {
            Self::Memory(b) => b.publish(channel, payload),
            Self::Redis(b) => b.publish(channel, payload).await,
        }
    }

    /// When the stalest subscriber connection's probe last came back, in seconds since the
    /// epoch (0: never), for `pushnode_broker_probe_last_success_timestamp_seconds`; `None`
    /// without Redis.
    pub fn probe_last_success(&self) -> Option<f64> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(b) => Some(b.oldest_probe_us() as f64 / 1e6),
        }
    }

    pub fn status(&self) -> BrokerStatus {
        match self {
            Self::Memory(_) => BrokerStatus { ready: true, healthy_ago: Some(Duration::ZERO) },
            Self::Redis(b) => BrokerStatus { ready: b.is_ready(), healthy_ago: b.healthy_ago() },
        }
    }
}
