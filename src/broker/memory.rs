//! The in-process broker: one node alone, no Redis. Publishing is a direct fan-out into the
//! hub; there is nothing to subscribe, reconnect or probe.

use bytes::Bytes;

use super::BrokerError;
use crate::hub::Subscriptions;

#[derive(Debug, Clone)]
pub struct MemoryBroker {
    hub: Subscriptions,
}

impl MemoryBroker {
    pub fn new(hub: Subscriptions) -> Self {
        Self { hub }
    }

    pub fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        self.hub.deliver(channel, &payload);
        Ok(())
    }
}
