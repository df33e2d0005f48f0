//! The in-memory inbox, for a node running alone: the same semantics and bounds as the Redis
//! store, kept in a `DashMap` of per-user inboxes. Append, count and live delivery happen under
//! the user's entry, so deliveries leave in id order and the count always matches the inbox.
//! Nothing survives a restart of the process.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::{Appended, InboxState, Limits, ReadScope, Stored};
use crate::channel::ChannelNames;
use crate::hub::Hub;
use crate::protocol::{Envelope, NoteId, PROTOCOL_VERSION, UnreadUpdate, now_micros};

/// How often expired inboxes and idempotency keys are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MemoryInbox {
    users: Arc<DashMap<Arc<str>, UserInbox>>,
    hub: Hub,
    names: ChannelNames,
    limits: Limits,
}

#[derive(Debug, Default)]
struct UserInbox {
    items: VecDeque<Item>,
    unread: BTreeSet<NoteId>,
    idempotency: HashMap<String, (NoteId, Instant)>,
    last: Option<NoteId>,
}

#[derive(Debug)]
struct Item {
    id: NoteId,
    ts_us: u64,
    event: Option<String>,
    data: Box<RawValue>,
}

impl UserInbox {
    fn next_id(&mut self, now_ms: u64) -> NoteId {
        let id = match self.last {
            Some(last) if last.ms >= now_ms => NoteId { ms: last.ms, seq: last.seq + 1 },
            _ => NoteId { ms: now_ms, seq: 0 },
        };
        self.last = Some(id);
        id
    }

    /// Drops what is past the TTL or beyond the size bound, keeping unread ⊆ items.
    fn trim(&mut self, limits: &Limits, now_us: u64) {
        let ttl_us = limits.ttl.as_micros() as u64;
        while let Some(front) = self.items.front() {
            let expired = ttl_us > 0 && front.ts_us + ttl_us < now_us;
            if !expired && self.items.len() <= limits.max_per_user {
                break;
            }
            let id = front.id;
            self.items.pop_front();
            self.unread.remove(&id);
        }
        let now = Instant::now();
        self.idempotency.retain(|_, (_, expires)| *expires > now);
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.idempotency.is_empty()
    }
}

impl MemoryInbox {
    pub(super) fn new(hub: Hub, names: ChannelNames, limits: Limits) -> Self {
        Self { users: Arc::new(DashMap::new()), hub, names, limits }
    }

    pub(super) async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sweep(),
                () = stop.cancelled() => return,
            }
        }
    }

    /// Trims every inbox and forgets the empty ones.
    fn sweep(&self) {
        let now = now_micros();
        self.users.retain(|_, inbox| {
            inbox.trim(&self.limits, now);
            !inbox.is_empty()
        });
    }

    pub(super) fn append(&self, user: &str, event: Option<&str>, data: &RawValue, key: Option<&str>) -> Appended {
        let mut inbox = self.users.entry(user.into()).or_default();
        let now_us = now_micros();
        inbox.trim(&self.limits, now_us);
        if let Some(&(id, _)) = key.and_then(|k| inbox.idempotency.get(k)) {
            return Appended { id, unread: inbox.unread.len() as u64, duplicate: true };
        }
        let id = inbox.next_id(now_us / 1000);
        inbox.items.push_back(Item { id, ts_us: now_us, event: event.map(str::to_owned), data: data.to_owned() });
        inbox.unread.insert(id);
        inbox.trim(&self.limits, now_us);
        if let Some(key) = key {
            inbox.idempotency.insert(key.to_owned(), (id, Instant::now() + self.limits.idempotency_ttl));
        }
        let unread = inbox.unread.len() as u64;
        let id_text = id.to_string();
        let envelope = Envelope {
            pushnode: PROTOCOL_VERSION,
            id: id_text.as_str().into(),
            event: event.map(Into::into),
            ts: now_us,
            persisted: true,
            unread: Some(unread),
            socket: None,
            user_id: None,
            terminate: false,
            data,
        };
        // Delivered while the entry is held, so a user's notifications leave in id order.
        self.hub.deliver(&self.names.user(user), &envelope.encode());
        Appended { id, unread, duplicate: false }
    }

    pub(super) fn state(&self, user: &str) -> InboxState {
        match self.users.get_mut(user) {
            Some(mut inbox) => {
                inbox.trim(&self.limits, now_micros());
                InboxState { unread: inbox.unread.len() as u64, newest: inbox.items.back().map(|i| i.id) }
            }
            None => InboxState::default(),
        }
    }

    pub(super) fn list(&self, user: &str, after: Option<NoteId>, limit: usize, unread_only: bool) -> Vec<Stored> {
        let Some(mut inbox) = self.users.get_mut(user) else { return Vec::new() };
        inbox.trim(&self.limits, now_micros());
        inbox
            .items
            .iter()
            .filter(|i| after.is_none_or(|a| i.id > a))
            .filter(|i| !unread_only || inbox.unread.contains(&i.id))
            .take(limit)
            .map(|i| Stored {
                id: i.id,
                ts_us: i.ts_us,
                event: i.event.clone(),
                data: i.data.clone(),
                read: !inbox.unread.contains(&i.id),
            })
            .collect()
    }

    /// Marks read and publishes the new count, like the Redis store: a user without an inbox
    /// gets a count of 0 too.
    pub(super) fn mark_read(&self, user: &str, scope: &ReadScope) -> u64 {
        let Some(mut inbox) = self.users.get_mut(user) else {
            self.hub.deliver(&self.names.user(user), &UnreadUpdate::encode(0));
            return 0;
        };
        match scope {
            ReadScope::All => inbox.unread.clear(),
            ReadScope::UpTo(up_to) => inbox.unread.retain(|id| id > up_to),
            ReadScope::Ids(ids) => ids.iter().for_each(|id| {
                inbox.unread.remove(id);
            }),
        }
        let unread = inbox.unread.len() as u64;
        // Delivered while the entry is held, so counts leave in order.
        self.hub.deliver(&self.names.user(user), &UnreadUpdate::encode(unread));
        unread
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbox(max: usize) -> MemoryInbox {
        let limits =
            Limits { max_per_user: max, ttl: Duration::from_secs(3600), idempotency_ttl: Duration::from_secs(60) };
        MemoryInbox::new(Hub::new("t", false), ChannelNames::new("u:{user}", "t:{topic}", false), limits)
    }

    fn data(n: u32) -> Box<RawValue> {
        RawValue::from_string(n.to_string()).unwrap()
    }

    #[test]
    fn ids_are_ordered_and_the_count_follows_reads() {
        let inbox = inbox(10);
        let ids: Vec<NoteId> = (0..5).map(|n| inbox.append("u", None, &data(n), None).id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(inbox.state("u"), InboxState { unread: 5, newest: Some(ids[4]) });
        assert_eq!(inbox.mark_read("u", &ReadScope::Ids(vec![ids[0]])), 4);
        assert_eq!(inbox.mark_read("u", &ReadScope::UpTo(ids[2])), 2);
        let listed = inbox.list("u", Some(ids[1]), 10, false);
        assert_eq!(
            listed.iter().map(|s| (s.id, s.read)).collect::<Vec<_>>(),
            vec![(ids[2], true), (ids[3], false), (ids[4], false)]
        );
        assert_eq!(inbox.list("u", None, 10, true).len(), 2);
        assert_eq!(inbox.mark_read("u", &ReadScope::All), 0);
    }

    #[test]
    fn retention_keeps_the_newest_and_the_count_consistent() {
        let inbox = inbox(3);
        for n in 0..10 {
            inbox.append("u", None, &data(n), None);
        }
        let kept = inbox.list("u", None, 100, false);
        assert_eq!(kept.iter().map(|s| s.data.get()).collect::<Vec<_>>(), vec!["7", "8", "9"]);
        assert_eq!(inbox.state("u").unread, 3);
    }

    #[test]
    fn an_idempotency_key_notifies_once() {
        let inbox = inbox(10);
        let first = inbox.append("u", None, &data(1), Some("order-7"));
        let again = inbox.append("u", None, &data(1), Some("order-7"));
        assert!(!first.duplicate && again.duplicate);
        assert_eq!(first.id, again.id);
        assert_eq!(inbox.state("u").unread, 1);
    }
}
