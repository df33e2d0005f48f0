//! Cluster-wide subscription counts of Pusher channels, for the HTTP API's channel queries
//! (`occupied`, `subscription_count`, the channel list).
//!
//! Each node knows its own counts (the hub's channels). Every [`INTERVAL`] it writes them to
//! Redis, per app, when they changed since its last write, and refreshes its deadline either
//! way (`pushnode_counts_put` in `presence.lua`); a query sums the live nodes' counts
//! (`pushnode_counts_get`). Counts are so at most about one interval old, and a killed node's
//! stop counting [`TTL`] after its last write. With the in-process broker the node's own
//! counts are the answer, exact.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Apps;
use crate::hub::Hub;
use crate::metrics as m;
use crate::presence::LIBRARY;
use crate::protocol::pusher::{ChannelClass, USER_CHANNEL_PREFIX};
use crate::redis_link::{LinkError, RedisLink};

/// How often a node writes its counts (when they changed) and refreshes its deadline.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// A node's counts stop counting this long after its last write.
pub const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ChannelCounts {
    hub: Hub,
    apps: Apps,
    node: Arc<str>,
    link: Option<RedisLink>,
}

impl ChannelCounts {
    pub fn new(hub: Hub, apps: Apps, node: Arc<str>, link: Option<RedisLink>) -> Self {
        Self { hub, apps, node, link }
    }

    fn key(app_id: &str) -> String {
        format!("pushnode:counts:{{{app_id}}}")
    }

    /// This node's sockets per channel of `app_id` (users' own channels left out: they are
    /// not channels an application lists).
    fn local(&self, app_id: &str) -> HashMap<Arc<str>, usize> {
        self.hub
            .topic_sizes(&self.apps.broker_prefix(app_id), |name| !name.starts_with(USER_CHANNEL_PREFIX))
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Sockets subscribed to `channel` across the cluster.
    pub async fn subscription_count(&self, app_id: &str, channel: &str) -> Result<u64, LinkError> {
        match &self.link {
            None => Ok(self.local(app_id).get(channel).map_or(0, |n| *n as u64)),
            Some(link) => {
                let value = link.fcall(LIBRARY, "pushnode_counts_get", &Self::key(app_id), &[channel]).await?;
                Ok(match value {
                    Value::Int(n) => n.max(0) as u64,
                    _ => 0,
                })
            }
        }
    }

    /// Every occupied channel of the app with its subscription count, across the cluster.
    pub async fn all(&self, app_id: &str) -> Result<Vec<(String, u64)>, LinkError> {
        match &self.link {
            None => Ok(self.local(app_id).into_iter().map(|(name, n)| (name.to_string(), n as u64)).collect()),
            Some(link) => {
                let value = link.fcall(LIBRARY, "pushnode_counts_get", &Self::key(app_id), &[]).await?;
                let Value::Array(flat) = value else { return Ok(Vec::new()) };
                let mut out = Vec::with_capacity(flat.len() / 2);
                let mut items = flat.into_iter();
                while let (Some(name), Some(count)) = (items.next(), items.next()) {
                    let name: String = redis::from_redis_value(name).unwrap_or_default();
                    let count: i64 = redis::from_redis_value(count).unwrap_or(0);
                    if count > 0 {
                        out.push((name, count as u64));
                    }
                }
                Ok(out)
            }
        }
    }

    /// Writes this node's counts every [`INTERVAL`] (Redis only), until `stop`; on stop, it
    /// withdraws them.
    pub async fn run(self, stop: CancellationToken) {
        let Some(link) = self.link.clone() else { return };
        let mut written: HashMap<String, HashMap<Arc<str>, usize>> = HashMap::new();
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => {
                    for app in self.apps.all() {
                        let _ = self.put(&link, &app.settings.id, &HashMap::new(), true).await;
                    }
                    return;
                }
            }
            for app in self.apps.all() {
                let id = &app.settings.id;
                let counts = self.local(id);
                let changed = written.get(id) != Some(&counts);
                match self.put(&link, id, &counts, changed).await {
                    Ok(()) => {
                        written.insert(id.clone(), counts);
                    }
                    Err(e) => {
                        // Written again in full next time.
                        written.remove(id);
                        metrics::counter!(m::PRESENCE_ERRORS).increment(1);
                        debug!(error = %e, app = %id, "channel counts not written");
                    }
                }
            }
        }
    }

    async fn put(
        &self,
        link: &RedisLink,
        app_id: &str,
        counts: &HashMap<Arc<str>, usize>,
        replace: bool,
    ) -> Result<(), LinkError> {
        let ttl = TTL.as_millis().to_string();
        let numbers: Vec<String> = counts.values().map(ToString::to_string).collect();
        let mut args: Vec<&str> = vec![&self.node, &ttl, if replace { "1" } else { "0" }];
        if replace {
            for ((name, _), n) in counts.iter().zip(&numbers) {
                args.push(name);
                args.push(n);
            }
        }
        link.fcall(LIBRARY, "pushnode_counts_put", &Self::key(app_id), &args).await.map(|_| ())
    }
}

/// Whether `info` asks for `attribute` (`info=user_count,subscription_count`).
pub fn wants(info: Option<&str>, attribute: &str) -> bool {
    info.is_some_and(|info| info.split(',').any(|a| a.trim() == attribute))
}

/// Whether `user_count` applies to the channel (presence channels only).
pub fn has_users(channel: &str) -> bool {
    ChannelClass::of(channel) == ChannelClass::Presence
}
