//! The subscriber's liveness probes: channels this node subscribes and publishes to itself, to
//! prove that its subscriber connection still receives.
//!
//! With one Redis server there is one probe channel. In a Redis Cluster a node holds one
//! subscriber connection per shard, and any of them can stall on its own; so there is one probe
//! channel per shard, named so that its hash slot falls on that shard
//! (`pushnode:probe:{<node>.<k>}`), chosen from `CLUSTER SLOTS` at every (re)subscribe and
//! refreshed as the slots move. The subscriber counts as fresh only while every probe came back
//! within `broker.probe_timeout`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use redis::Value;

use crate::protocol::now_micros;

/// Hash slots in a Redis Cluster.
const SLOTS: u16 = 16384;

/// The node's probe channels and when each last came back.
#[derive(Debug)]
pub(super) struct Probes {
    /// Every probe channel of this node starts with it.
    prefix: Arc<str>,
    node_id: Arc<str>,
    /// (channel, microseconds since the epoch it last came back; 0: not yet).
    heard: Mutex<Vec<(Arc<str>, u64)>>,
    /// When any probe last came back (0: never); unlike `heard`, not reset on reconnect: the
    /// last moment the subscriber was known to work.
    last_heard_us: AtomicU64,
}

impl Probes {
    pub(super) fn new(node_id: &str) -> Self {
        Self {
            prefix: format!("pushnode:probe:{{{node_id}").into(),
            node_id: node_id.into(),
            heard: Mutex::new(Vec::new()),
            last_heard_us: AtomicU64::new(0),
        }
    }

    fn heard(&self) -> MutexGuard<'_, Vec<(Arc<str>, u64)>> {
        self.heard.lock()
    }

    /// The one probe channel with a single Redis server (the braces make it a hash tag).
    pub(super) fn single(&self) -> Arc<str> {
        format!("pushnode:probe:{{{}}}", self.node_id).into()
    }

    /// One probe channel per shard of `slots` (a `CLUSTER SLOTS` reply).
    pub(super) fn per_shard(&self, slots: &Value) -> Vec<Arc<str>> {
        shard_ranges(slots).iter().filter_map(|ranges| self.channel_within(ranges)).collect()
    }

    /// The first `pushnode:probe:{<node>.<k>}` whose slot lies in `ranges`.
    fn channel_within(&self, ranges: &[(u16, u16)]) -> Option<Arc<str>> {
        // A shard owning one slot in 16,384 is found within a few ten thousand tries.
        (0..1_000_000u32).find_map(|k| {
            let tag = format!("{}.{k}", self.node_id);
            let slot = key_slot(tag.as_bytes());
            ranges.iter().any(|&(from, to)| (from..=to).contains(&slot)).then(|| {
                let channel: Arc<str> = format!("pushnode:probe:{{{tag}}}").into();
                channel
            })
        })
    }

    /// Starts over with `channels`, none of them heard yet.
    pub(super) fn reset(&self, channels: &[Arc<str>]) {
        *self.heard() = channels.iter().map(|c| (c.clone(), 0)).collect();
    }

    /// Replaces the set after the slots moved. Channels kept keep their time; new ones count as
    /// heard now, so a topology change does not fail readiness. Returns (added, removed).
    pub(super) fn replace(&self, channels: &[Arc<str>]) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let mut heard = self.heard();
        let removed = heard.iter().filter(|(c, _)| !channels.contains(c)).map(|(c, _)| c.clone()).collect();
        let added: Vec<Arc<str>> = channels.iter().filter(|c| !heard.iter().any(|(h, _)| h == *c)).cloned().collect();
        heard.retain(|(c, _)| channels.contains(c));
        let now = now_micros();
        heard.extend(added.iter().map(|c| (c.clone(), now)));
        (added, removed)
    }

    pub(super) fn channels(&self) -> Vec<Arc<str>> {
        self.heard().iter().map(|(c, _)| c.clone()).collect()
    }

    pub(super) fn contains(&self, channel: &str) -> bool {
        channel.starts_with(&*self.prefix) && self.heard().iter().any(|(c, _)| &**c == channel)
    }

    /// Notes that `channel` came back, if it is one of the probes (the push callback calls this
    /// for every message, so the common case is one prefix comparison).
    pub(super) fn came_back(&self, channel: &str) -> bool {
        if !channel.starts_with(&*self.prefix) {
            return false;
        }
        let mut heard = self.heard();
        let Some(entry) = heard.iter_mut().find(|(c, _)| &**c == channel) else { return false };
        entry.1 = now_micros();
        self.last_heard_us.store(entry.1, Ordering::Release);
        true
    }

    /// When any probe last came back, across reconnects (0: never).
    pub(super) fn last_heard_us(&self) -> u64 {
        self.last_heard_us.load(Ordering::Acquire)
    }

    /// When the probe heard least recently came back (0: one never did, or there are none).
    pub(super) fn oldest_us(&self) -> u64 {
        self.heard().iter().map(|(_, at)| *at).min().unwrap_or(0)
    }
}

/// The hash slot of `key` (CRC16/XMODEM of the hash tag, or of the key without one). The
/// `redis` crate computes the same in `cluster_routing::Slot::for_key` but does not expose the
/// number, which the probes compare with slot ranges.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS
}

/// The slot ranges of each shard in a `CLUSTER SLOTS` reply: entries of
/// `[start, end, [ip, port, id, ...], replicas...]`, grouped by the master's address.
fn shard_ranges(slots: &Value) -> Vec<Vec<(u16, u16)>> {
    let Value::Array(entries) = slots else { return Vec::new() };
    let mut shards: BTreeMap<String, Vec<(u16, u16)>> = BTreeMap::new();
    for entry in entries {
        let Value::Array(fields) = entry else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let address = master
            .iter()
            .take(2)
            .map(|v| match v {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => String::new(),
            })
            .collect::<Vec<_>>()
            .join(":");
        if let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) {
            shards.entry(address).or_default().push((start, end));
        }
    }
    shards.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: i64, end: i64, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    #[test]
    fn slots_follow_the_cluster_spec() {
        // Reference values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    }

    #[test]
    fn one_probe_channel_lands_on_each_shard() {
        let probes = Probes::new("n1");
        // Three shards, the third owning two ranges.
        let slots = Value::Array(vec![
            range(0, 5460, 7001),
            range(5461, 10922, 7002),
            range(10923, 16000, 7003),
            range(16001, 16383, 7003),
        ]);
        let channels = probes.per_shard(&slots);
        assert_eq!(channels.len(), 3);
        let mut shards: Vec<u16> = channels
            .iter()
            .map(|c| match key_slot(c.as_bytes()) {
                0..=5460 => 1,
                5461..=10922 => 2,
                _ => 3,
            })
            .collect();
        shards.sort_unstable();
        assert_eq!(shards, vec![1, 2, 3]);
        assert!(channels.iter().all(|c| c.starts_with("pushnode:probe:{n1.")));
    }

    #[test]
    fn fresh_only_when_every_probe_came_back() {
        let probes = Probes::new("n1");
        let (a, b): (Arc<str>, Arc<str>) = ("pushnode:probe:{n1.0}".into(), "pushnode:probe:{n1.7}".into());
        probes.reset(&[a.clone(), b.clone()]);
        assert!(probes.came_back(&a));
        assert_eq!(probes.oldest_us(), 0, "b has not come back yet");
        assert!(probes.came_back(&b));
        assert!(probes.oldest_us() > 0);
        assert!(!probes.came_back("pushnode:user:{42}"));
        assert!(!probes.came_back("pushnode:probe:{n1.99}"), "not one of ours");

        let c: Arc<str> = "pushnode:probe:{n1.3}".into();
        let (added, removed) = probes.replace(&[a.clone(), c.clone()]);
        assert_eq!((added, removed), (vec![c.clone()], vec![b]));
        assert!(probes.oldest_us() > 0, "a new probe after a topology change counts as heard");
        assert!(probes.contains(&c) && !probes.contains("pushnode:probe:{n1.7}"));
    }
}
