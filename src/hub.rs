//! The local registry: which sessions live on this node, and which of them listen to which
//! broker channel. [`Hub::deliver`] fans one message out to them.
//!
//! The hub never awaits and does no I/O: delivery pushes into each session's bounded
//! [`Outbox`] and returns. It also records which channels gained their first or lost their last
//! local listener ("interest changes"), which a broker drains to SUBSCRIBE/UNSUBSCRIBE; the hub
//! itself knows nothing of Redis.
//!
//! Locking: every map is a `DashMap`; no guard is held across an await (there are none here)
//! or while touching the same map again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{Notify, watch};

use crate::metrics as m;
use crate::outbox::{Outbox, Outgoing, PushError};
use crate::protocol::{Delivery, Format, WireFrame};

pub type SessionId = u64;

/// What the hub knows of a session: enough to deliver to it, ping it and close it.
#[derive(Debug)]
pub struct Subscriber {
    pub id: SessionId,
    pub user: Arc<str>,
    pub format: Format,
    pub outbox: Outbox,
    /// When the client was last heard from ([`monotonic_ms`]); the heartbeat sweep reads it.
    pub last_heard: AtomicU64,
    /// A ping was queued since the client was last heard from. Only then may silence close it:
    /// a session that arrives just after a sweep listed the sessions waits up to two
    /// intervals for its first ping, which can be longer than the timeout.
    pinged: AtomicBool,
    /// The broker lost this session's user channel alone (a cluster slot moved): messages may
    /// be missing since. Set before the channel is subscribed again, taken by the session.
    interrupted: AtomicBool,
}

impl Subscriber {
    pub fn new(id: SessionId, user: Arc<str>, format: Format, outbox: Outbox) -> Self {
        Self {
            id,
            user,
            format,
            outbox,
            last_heard: AtomicU64::new(monotonic_ms()),
            pinged: AtomicBool::new(false),
            interrupted: AtomicBool::new(false),
        }
    }

    /// Whether the user channel was interrupted since the last call (see [`Hub::interrupt`]).
    pub fn take_interrupted(&self) -> bool {
        // A plain load first: this runs for every batch a session writes.
        self.interrupted.load(Ordering::Acquire) && self.interrupted.swap(false, Ordering::AcqRel)
    }

    /// Records that a frame (any frame) arrived from the client.
    pub fn heard(&self) {
        self.last_heard.store(monotonic_ms(), Ordering::Relaxed);
        if self.pinged.load(Ordering::Relaxed) {
            self.pinged.store(false, Ordering::Relaxed);
        }
    }
}

/// Milliseconds on a process-wide monotonic clock.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

#[derive(Debug, Default)]
struct Channel {
    /// Topic name for topic channels (goes into the notification's `channel` field).
    topic: Option<Arc<str>>,
    sessions: Vec<Arc<Subscriber>>,
    /// The broker confirmed its subscription (always true without interest tracking).
    live: bool,
}

/// Result of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: usize,
    pub dropped: usize,
}

/// The user already has the maximum number of sessions on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user has too many sessions on this node")]
pub struct TooManySessions;

#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channels: DashMap<Arc<str>, Channel>,
    sessions: DashMap<SessionId, Arc<Subscriber>>,
    users: DashMap<Arc<str>, usize>,
    /// Channels whose local interest changed since a broker last looked; `None` when no broker
    /// consumes them (the memory broker), so the set cannot grow unread.
    interest: Option<Interest>,
    /// Woken whenever channels become live.
    live_changed: Notify,
    /// Whether the broker is connected; sessions only wait for a subscription when it is.
    broker_up: AtomicBool,
    /// Subscription generation: the broker bumps it after every full (re)subscribe. A session
    /// that sees it change may have missed messages published in between, and replays them
    /// from the inbox.
    generation: watch::Sender<u64>,
    node_id: Arc<str>,
    next_session: AtomicU64,
    next_message: AtomicU64,
    /// Registered once: looking a counter up by name costs a hash per message.
    fanned_out: metrics::Counter,
    dropped_slow: metrics::Counter,
    dropped_closing: metrics::Counter,
    dropped_invalid: metrics::Counter,
}

#[derive(Debug, Default)]
struct Interest {
    changed: Mutex<HashSet<Arc<str>>>,
    notify: Notify,
}

impl Hub {
    /// `track_interest` is true when a broker subscribes channels on demand.
    pub fn new(node_id: impl Into<Arc<str>>, track_interest: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                channels: DashMap::new(),
                sessions: DashMap::new(),
                users: DashMap::new(),
                interest: track_interest.then(Interest::default),
                live_changed: Notify::new(),
                broker_up: AtomicBool::new(!track_interest),
                generation: watch::Sender::new(0),
                node_id: node_id.into(),
                next_session: AtomicU64::new(1),
                next_message: AtomicU64::new(1),
                fanned_out: metrics::counter!(m::MESSAGES_FANNED_OUT),
                dropped_slow: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer"),
                dropped_closing: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "closing"),
                dropped_invalid: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "invalid_payload"),
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn next_session_id(&self) -> SessionId {
        self.inner.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// A node-unique message id, for messages that arrive without one.
    pub fn next_message_id(&self) -> String {
        let seq = self.inner.next_message.fetch_add(1, Ordering::Relaxed);
        format!("{}-{seq}", self.inner.node_id)
    }

    /// Adds a session, unless its user already has `max_per_user` sessions here.
    pub fn register(&self, subscriber: Arc<Subscriber>, max_per_user: usize) -> Result<(), TooManySessions> {
        match self.inner.users.entry(subscriber.user.clone()) {
            Entry::Occupied(mut e) => {
                if *e.get() >= max_per_user {
                    return Err(TooManySessions);
                }
                *e.get_mut() += 1;
            }
            Entry::Vacant(e) => {
                e.insert(1);
            }
        }
        self.inner.sessions.insert(subscriber.id, subscriber);
        self.record_sizes();
        Ok(())
    }

    /// Removes a session. Its channels must have been left first ([`Hub::leave`]).
    pub fn unregister(&self, subscriber: &Subscriber) {
        // Whoever still holds it (a heartbeat step, say) can no longer queue into it.
        subscriber.outbox.close(crate::protocol::CloseReason::Gone);
        self.inner.sessions.remove(&subscriber.id);
        if let Entry::Occupied(mut e) = self.inner.users.entry(subscriber.user.clone()) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.record_sizes();
    }

    fn record_sizes(&self) {
        metrics::gauge!(m::CONNECTIONS).set(self.inner.sessions.len() as f64);
        metrics::gauge!(m::USERS).set(self.inner.users.len() as f64);
    }

    pub fn session_count(&self) -> usize {
        self.inner.sessions.len()
    }

    pub fn user_count(&self) -> usize {
        self.inner.users.len()
    }

    pub fn sessions_of(&self, user: &str) -> usize {
        self.inner.users.get(user).map_or(0, |n| *n)
    }

    /// Every live session, for a paced drain.
    pub fn sessions(&self) -> Vec<Arc<Subscriber>> {
        self.inner.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Adds `subscriber` to `channel`.
    pub fn join(&self, channel: &Arc<str>, topic: Option<&Arc<str>>, subscriber: &Arc<Subscriber>) {
        // Without a broker to subscribe, a channel is live at once.
        let live = self.inner.interest.is_none();
        let first = {
            let mut entry = self.inner.channels.entry(channel.clone()).or_insert_with(|| Channel {
                topic: topic.cloned(),
                sessions: Vec::new(),
                live,
            });
            entry.sessions.push(subscriber.clone());
            entry.sessions.len() == 1
        };
        if first {
            self.interest_changed(channel);
        }
    }

    /// Removes session `id` from `channel`; drops the channel when it was the last listener.
    pub fn leave(&self, channel: &Arc<str>, id: SessionId) {
        let emptied = match self.inner.channels.get_mut(channel) {
            Some(mut entry) => {
                if let Some(i) = entry.sessions.iter().position(|s| s.id == id) {
                    entry.sessions.swap_remove(i);
                }
                entry.sessions.is_empty()
            }
            None => false,
        };
        // The guard above is dropped before touching the map again.
        if emptied && self.inner.channels.remove_if(channel, |_, c| c.sessions.is_empty()).is_some() {
            self.interest_changed(channel);
        }
    }

    /// Marks channels whose broker subscription is confirmed, and wakes sessions waiting on them.
    pub fn mark_live(&self, channels: &[Arc<str>]) {
        for channel in channels {
            if let Some(mut entry) = self.inner.channels.get_mut(channel) {
                entry.live = true;
            }
        }
        self.inner.live_changed.notify_waiters();
    }

    /// Marks every channel as not subscribed (the broker connection was lost) and starts a new
    /// generation: messages of the old one may be missing until the next full subscribe.
    pub fn mark_all_down(&self) {
        self.inner.broker_up.store(false, Ordering::Release);
        self.bump_generation();
        for mut entry in self.inner.channels.iter_mut() {
            entry.live = false;
        }
    }

    /// The broker lost the subscription of these channels only (a Redis Cluster slot moved to
    /// another shard) and is about to subscribe them again. They are no longer live, and the
    /// sessions of a user channel among them are told a gap may have opened, before any frame
    /// of the new subscription can reach their outbox. Unlike [`Hub::mark_all_down`] this
    /// starts no new generation: only these sessions replay from the inbox.
    pub fn interrupt(&self, channels: &[Arc<str>]) {
        for channel in channels {
            let Some(mut entry) = self.inner.channels.get_mut(channel) else { continue };
            entry.live = false;
            if entry.topic.is_none() {
                for session in &entry.sessions {
                    session.interrupted.store(true, Ordering::Release);
                    session.outbox.wake();
                }
            }
        }
    }

    pub fn generation(&self) -> u64 {
        *self.inner.generation.borrow()
    }

    /// Watches the subscription generation.
    pub fn watch_generation(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Called by the broker when its subscription is lost and after every full (re)subscribe.
    /// Wakes every session, so those with an inbox check for a gap.
    pub fn bump_generation(&self) {
        self.inner.generation.send_modify(|g| *g += 1);
        for session in self.inner.sessions.iter() {
            session.outbox.wake();
        }
    }

    /// Every live session, weakly: a snapshot that does not keep departed sessions alive.
    pub fn session_refs(&self) -> Vec<Weak<Subscriber>> {
        self.inner.sessions.iter().map(|e| Arc::downgrade(e.value())).collect()
    }

    /// One heartbeat step over `sessions` (a slice of [`Hub::session_refs`]): pings each that
    /// is still there, and closes those not heard from within `timeout` although pinged since
    /// they were last heard. One node-wide sweep,
    /// spread over the interval in steps, instead of a timer per connection (and instead of
    /// one burst of pings).
    pub fn heartbeat(&self, sessions: &[Weak<Subscriber>], timeout: Duration) -> usize {
        let now = monotonic_ms();
        let timeout = timeout.as_millis() as u64;
        let mut closed = 0;
        for session in sessions.iter().filter_map(Weak::upgrade) {
            let silent = now.saturating_sub(session.last_heard.load(Ordering::Relaxed)) >= timeout;
            if silent && session.pinged.load(Ordering::Relaxed) {
                session.outbox.close(crate::protocol::CloseReason::HeartbeatTimeout);
                closed += 1;
            } else {
                // A full outbox here means a slow consumer: the push closes it, as fan-out would.
                // A session unregistering meanwhile refuses the push (its outbox is closed).
                let ping = Outgoing { frame: WireFrame::Ping, published_us: 0, persisted: None, generation: 0 };
                if session.outbox.push(ping).is_ok() {
                    session.pinged.store(true, Ordering::Relaxed);
                }
            }
        }
        closed
    }

    pub fn is_broker_up(&self) -> bool {
        self.inner.broker_up.load(Ordering::Acquire)
    }

    pub fn set_broker_up(&self, up: bool) {
        self.inner.broker_up.store(up, Ordering::Release);
        self.inner.live_changed.notify_waiters();
    }

    pub fn is_live(&self, channel: &str) -> bool {
        self.inner.channels.get(channel).is_some_and(|c| c.live)
    }

    /// Waits, at most `limit`, until the broker has subscribed `channel`, so that a session's
    /// welcome means "messages published from now on reach you". Returns at once while the
    /// broker is down (the session then gets what arrives after the reconnect).
    pub async fn wait_live(&self, channel: &str, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.live_changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_live(channel) {
                    return true;
                }
                if !self.inner.broker_up.load(Ordering::Acquire) {
                    return false;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }

    /// Whether any local session listens to `channel`.
    pub fn is_wanted(&self, channel: &str) -> bool {
        self.inner.channels.contains_key(channel)
    }

    /// Every channel with at least one local listener.
    pub fn wanted_channels(&self) -> Vec<Arc<str>> {
        self.inner.channels.iter().map(|e| e.key().clone()).collect()
    }

    pub fn channel_count(&self) -> usize {
        self.inner.channels.len()
    }

    fn interest_changed(&self, channel: &Arc<str>) {
        if let Some(interest) = &self.inner.interest {
            interest.changed.lock().unwrap_or_else(|p| p.into_inner()).insert(channel.clone());
            interest.notify.notify_one();
        }
    }

    /// Takes the channels whose interest changed since the last call (empty without tracking).
    pub fn take_interest_changes(&self) -> Vec<Arc<str>> {
        match &self.inner.interest {
            Some(interest) => interest.changed.lock().unwrap_or_else(|p| p.into_inner()).drain().collect(),
            None => Vec::new(),
        }
    }

    /// Waits until the interest changes (never returns without tracking).
    pub async fn interest_notified(&self) {
        match &self.inner.interest {
            Some(interest) => interest.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Fans a broker payload out to every local session of `channel`. The payload is decoded
    /// and encoded once; every session gets a reference-counted copy of the same bytes.
    pub fn deliver(&self, channel: &str, payload: &Bytes) -> Fanout {
        let Some(entry) = self.inner.channels.get(channel) else {
            return Fanout::default();
        };
        let delivery = Delivery::decode(payload, entry.topic.as_ref());
        if delivery.is_invalid() {
            // A pushnode envelope whose data no client could parse: JSON sessions skip it.
            self.inner.dropped_invalid.increment(1);
        }
        let generation = self.generation();
        let fallback_id = || self.next_message_id();
        let mut fanout = Fanout::default();
        for session in &entry.sessions {
            let Some(frame) = delivery.frame(session.format, &fallback_id) else { continue };
            let frame =
                Outgoing { frame: frame.clone(), published_us: delivery.ts, persisted: delivery.persisted, generation };
            match session.outbox.push(frame) {
                Ok(()) => fanout.delivered += 1,
                // Too slow to keep up: its outbox is now closing (it resumes from its last id
                // on reconnect) rather than stalling this fan-out.
                Err(PushError::Full) => {
                    fanout.dropped += 1;
                    self.inner.dropped_slow.increment(1);
                }
                // Already leaving; it unregisters itself.
                Err(PushError::Closed) => {
                    fanout.dropped += 1;
                    self.inner.dropped_closing.increment(1);
                }
            }
        }
        drop(entry);
        self.inner.fanned_out.increment(fanout.delivered as u64);
        fanout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CloseReason;

    fn subscriber(hub: &Hub, user: &str, capacity: usize) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(hub.next_session_id(), user.into(), Format::Raw, Outbox::new(capacity)))
    }

    #[test]
    fn delivers_to_every_session_of_the_channel_and_nobody_else() {
        let hub = Hub::new("n1", false);
        let (a1, a2, b) = (subscriber(&hub, "a", 8), subscriber(&hub, "a", 8), subscriber(&hub, "b", 8));
        let (ca, cb): (Arc<str>, Arc<str>) = ("u:a".into(), "u:b".into());
        for s in [&a1, &a2] {
            hub.register(s.clone(), 10).unwrap();
            hub.join(&ca, None, s);
        }
        hub.register(b.clone(), 10).unwrap();
        hub.join(&cb, None, &b);

        let fanout = hub.deliver("u:a", &Bytes::from_static(b"{\"cnt\":1}"));
        assert_eq!(fanout, Fanout { delivered: 2, dropped: 0 });
        assert_eq!((a1.outbox.len(), a2.outbox.len(), b.outbox.len()), (1, 1, 0));
        let mut batch = Vec::new();
        a1.outbox.drain_into(&mut batch);
        assert_eq!(batch[0].frame, WireFrame::text(r#"{"cnt":1}"#.to_owned()));
    }

    #[test]
    fn a_full_outbox_is_closed_while_others_still_receive() {
        let hub = Hub::new("n1", false);
        let (slow, fast) = (subscriber(&hub, "a", 1), subscriber(&hub, "a", 8));
        let channel: Arc<str> = "u:a".into();
        for s in [&slow, &fast] {
            hub.register(s.clone(), 10).unwrap();
            hub.join(&channel, None, s);
        }
        hub.deliver("u:a", &Bytes::from_static(b"1"));
        let fanout = hub.deliver("u:a", &Bytes::from_static(b"2"));
        assert_eq!(fanout, Fanout { delivered: 1, dropped: 1 });
        assert_eq!(slow.outbox.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast.outbox.len(), 2);
    }

    #[test]
    fn per_user_limit_and_counts() {
        let hub = Hub::new("n1", false);
        let (s1, s2) = (subscriber(&hub, "a", 1), subscriber(&hub, "a", 1));
        hub.register(s1.clone(), 1).unwrap();
        assert_eq!(hub.register(s2, 1), Err(TooManySessions));
        assert_eq!((hub.session_count(), hub.user_count(), hub.sessions_of("a")), (1, 1, 1));
        hub.unregister(&s1);
        assert_eq!((hub.session_count(), hub.user_count(), hub.sessions_of("a")), (0, 0, 0));
    }

    #[test]
    fn interest_changes_only_on_first_join_and_last_leave() {
        let hub = Hub::new("n1", true);
        let (s1, s2) = (subscriber(&hub, "a", 1), subscriber(&hub, "a", 1));
        let channel: Arc<str> = "u:a".into();
        hub.join(&channel, None, &s1);
        hub.join(&channel, None, &s2);
        assert_eq!(hub.take_interest_changes(), vec![channel.clone()]);
        hub.leave(&channel, s1.id);
        assert!(hub.take_interest_changes().is_empty());
        assert!(hub.is_wanted("u:a"));
        hub.leave(&channel, s2.id);
        assert_eq!(hub.take_interest_changes(), vec![channel.clone()]);
        assert!(!hub.is_wanted("u:a"));
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn heartbeat_pings_the_heard_closes_the_silent_and_skips_the_departed() {
        let hub = Hub::new("n1", false);
        let (alive, silent, gone) = (subscriber(&hub, "a", 8), subscriber(&hub, "b", 8), subscriber(&hub, "c", 8));
        let dropped = subscriber(&hub, "d", 8);
        for s in [&alive, &silent, &gone, &dropped] {
            hub.register(s.clone(), 10).unwrap();
        }
        let sessions = hub.session_refs();
        assert_eq!(sessions.len(), 4);
        std::thread::sleep(Duration::from_millis(5));
        alive.heard();
        gone.heard();
        // Unregistered but still referenced elsewhere: its outbox refuses the ping.
        hub.unregister(&gone);
        // Unregistered and gone (silent too): the snapshot did not keep it alive.
        hub.unregister(&dropped);
        drop(dropped);

        // Silent beyond the timeout but never pinged (it arrived after the last sweep): pinged
        // first, not closed.
        assert_eq!(hub.heartbeat(&sessions, Duration::from_millis(2)), 0, "nobody was pinged yet");
        assert_eq!(silent.outbox.closing(), None);
        let mut batch = Vec::new();
        assert_eq!(alive.outbox.drain_into(&mut batch), None);
        assert_eq!(batch.iter().map(|o| &o.frame).collect::<Vec<_>>(), vec![&WireFrame::Ping]);
        assert_eq!(gone.outbox.len(), 0);

        // The answering session is heard again; the silent one stayed silent after its ping.
        std::thread::sleep(Duration::from_millis(1));
        alive.heard();
        assert_eq!(hub.heartbeat(&sessions, Duration::from_millis(2)), 1, "only the pinged silent session closes");
        assert_eq!(silent.outbox.closing(), Some(CloseReason::HeartbeatTimeout));
        assert_eq!(alive.outbox.closing(), None);
    }

    #[test]
    fn an_interrupted_user_channel_flags_its_sessions_but_not_topic_listeners() {
        let hub = Hub::new("n1", true);
        let (user, other, listener) = (subscriber(&hub, "a", 8), subscriber(&hub, "b", 8), subscriber(&hub, "c", 8));
        let (ua, ub, topic): (Arc<str>, Arc<str>, Arc<str>) = ("u:a".into(), "u:b".into(), "t:news".into());
        hub.join(&ua, None, &user);
        hub.join(&ub, None, &other);
        hub.join(&topic, Some(&"news".into()), &listener);
        hub.mark_live(&[ua.clone(), ub.clone(), topic.clone()]);
        let generation = hub.generation();

        hub.interrupt(&[ua.clone(), topic.clone()]);
        assert!(!hub.is_live("u:a") && !hub.is_live("t:news") && hub.is_live("u:b"));
        assert!(user.take_interrupted(), "the user's session must replay its gap");
        assert!(!user.take_interrupted(), "taken once");
        assert!(!other.take_interrupted() && !listener.take_interrupted());
        assert_eq!(hub.generation(), generation, "no node-wide replay");
    }
}
