//! `Broker`: the cross-node transport. A node publishes a payload on a channel; every node with
//! a local listener on that channel hands it to its [`Hub`](crate::hub::Hub).
//!
//! Kinds: `memory` (one node, in process). The broker knows channels and payloads, never
//! sockets or sessions.
//!
//! Guarantee: live delivery is at most once. A payload published while a node is not
//! subscribed (not yet, or during a reconnect) is not delivered live to that node's sessions.

mod memory;

use bytes::Bytes;

use crate::hub::Hub;
use crate::settings;

pub use memory::MemoryBroker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// What readiness needs to know about the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerStatus {
    /// Connected, subscribed to every wanted channel, and its probe is fresh.
    pub ready: bool,
}

#[derive(Debug, Clone)]
pub enum Broker {
    Memory(MemoryBroker),
}

impl Broker {
    pub fn new(settings: &settings::Broker, hub: Hub) -> Self {
        match settings.kind {
            settings::BrokerKind::Memory => Self::Memory(MemoryBroker::new(hub)),
        }
    }

    /// Whether the hub must record interest changes for this broker.
    pub fn tracks_interest(kind: settings::BrokerKind) -> bool {
        match kind {
            settings::BrokerKind::Memory => false,
        }
    }

    /// Publishes `payload` on `channel`, to every node (this one included).
    pub async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        match self {
            Self::Memory(b) => b.publish(channel, payload),
        }
    }

    pub fn status(&self) -> BrokerStatus {
        match self {
            Self::Memory(_) => BrokerStatus { ready: true },
        }
    }
}
