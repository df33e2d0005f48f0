//! The local registry: which sessions live on this node, and which of them listen to which
//! broker channel. [`Hub::deliver`] fans one message out to them.
//!
//! - this file: the registry ([`Hub::register`] and the [`Registration`] guard that undoes
//!   it), channel membership and [`Hub::deliver`];
//! - [`members`]: one channel's sessions, removable by id in constant time;
//! - [`subscriptions`]: the subscription state the broker drives (interest changes, live
//!   flags, broker up, the generation) and [`Subscriptions`], the only view of the hub the
//!   broker gets;
//! - [`heartbeat`]: when each session was last heard from, and the node's ping sweep.
//!
//! The hub does no I/O. Delivery pushes into each session's bounded [`Outbox`] and returns;
//! the only await ([`Hub::wait_live`]) waits on the hub's own state. The hub records which
//! channels gained their first or lost their last local session, which a broker drains to
//! SUBSCRIBE/UNSUBSCRIBE; it knows nothing of Redis.
//!
//! Locking: every map is a `DashMap`; no guard is held across an await or while touching the
//! same map again.

mod burst;
pub mod heartbeat;
mod members;
mod subscriptions;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use self::burst::Burst;
pub use self::heartbeat::{Liveness, monotonic_ms};
use self::members::Members;
pub use self::subscriptions::{MAX_LANES, Subscriptions};
use crate::metrics as m;
use crate::outbox::{Handed, Outbox, Outgoing, PushError};
use crate::protocol::{CloseReason, Delivery, Format, now_micros};
use crate::wire::Wire;

pub type SessionId = u64;

/// What the hub knows of one WebSocket session on this node: enough to deliver to it, ping it
/// and close it. The session task owns the socket; this is its shared half.
#[derive(Debug)]
pub struct LocalSession {
    pub id: SessionId,
    pub user: Arc<str>,
    pub format: Format,
    pub outbox: Outbox,
    pub liveness: Liveness,
    /// The broker lost this session's user channel alone (a cluster slot moved): messages may
    /// be missing since. Set before the channel is subscribed again, taken by the session.
    interrupted: AtomicBool,
    /// The session's socket, for fan-out's direct writes ([`Outbox::offer`]).
    wire: Option<Arc<Wire>>,
}

impl LocalSession {
    pub fn new(id: SessionId, user: Arc<str>, format: Format, outbox: Outbox) -> Self {
        Self {
            id,
            user,
            format,
            outbox,
            liveness: Liveness::default(),
            interrupted: AtomicBool::new(false),
            wire: None,
        }
    }

    /// Lets fan-out write to `wire` itself while the session is parked.
    pub fn with_wire(mut self, wire: Arc<Wire>) -> Self {
        self.wire = Some(wire);
        self
    }

    /// The session's socket, if fan-out may write to it.
    pub fn wire(&self) -> Option<&Arc<Wire>> {
        self.wire.as_ref()
    }

    /// Hands `frame` over: written at once when `direct` and the session allows it, queued
    /// otherwise.
    fn hand(&self, frame: Outgoing, direct: bool) -> Result<Handed, PushError> {
        match &self.wire {
            Some(wire) if direct => self.outbox.offer(frame, wire),
            _ => self.outbox.push(frame).map(|()| Handed::Queued),
        }
    }

    /// Whether the user channel was interrupted since the last call (see
    /// [`Subscriptions::interrupt`]).
    pub fn take_interrupted(&self) -> bool {
        // A plain load first: this runs for every batch a session writes.
        self.interrupted.load(Ordering::Acquire) && self.interrupted.swap(false, Ordering::AcqRel)
    }
}

#[derive(Debug, Default)]
struct Channel {
    /// Topic name for topic channels (goes into the notification's `channel` field).
    topic: Option<Arc<str>>,
    members: Members,
    /// The broker confirmed its subscription (always true without interest tracking).
    live: bool,
    /// The format of the session that opened it: a channel is a Pusher channel or a native
    /// one, and its deliveries build that format's frame first.
    format: Format,
    /// Its subscriber lane (see [`subscriptions`]), kept so a delivery need not hash the name.
    lane: u16,
}

/// Result of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Handed to sessions: queued, or written by the fan-out itself.
    pub delivered: usize,
    /// Of those, written into their sockets by the fan-out itself.
    pub written: usize,
    pub dropped: usize,
}

/// A channel of at most this many local sessions (one user's tabs and devices, a small topic)
/// has its frames written by the fan-out itself when the sessions are parked and the lane
/// keeps up ([`burst`]): a few socket writes cost less than waking their tasks. A larger
/// fan-out is left to the sessions' tasks, which spread its writes over the node's worker
/// threads instead of one, and keep the channel's lock short.
const DIRECT_FANOUT_MAX: usize = 8;

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
    sessions: DashMap<SessionId, Arc<LocalSession>>,
    /// Sessions per user, for the per-user limit.
    users: DashMap<Arc<str>, usize>,
    subscriptions: subscriptions::State,
    node_id: Arc<str>,
    /// The node part of this node's Pusher socket ids (random per process, never 0).
    socket_node: u32,
    next_session: AtomicU64,
    next_message: AtomicU64,
    /// Held while the size gauges are read and set (see [`Hub::record_sizes`]).
    sizes: parking_lot::Mutex<()>,
    /// Registered once: looking a counter up by name costs a hash per message.
    queued: metrics::Counter,
    /// Frames fan-out wrote itself count as delivered here (the sessions count their own).
    delivered: metrics::Counter,
    latency: metrics::Histogram,
    /// Per lane (one without lanes): may fan-out write frames itself right now?
    bursts: Box<[Burst]>,
    /// What burst times count from.
    started: Instant,
    dropped_slow: metrics::Counter,
    dropped_closing: metrics::Counter,
    dropped_invalid: metrics::Counter,
}

impl Hub {
    /// `track_interest` is true when a broker subscribes channels on demand (over one
    /// subscriber connection; [`Hub::with_lanes`] for several).
    pub fn new(node_id: impl Into<Arc<str>>, track_interest: bool) -> Self {
        Self::with_lanes(node_id, usize::from(track_interest))
    }

    /// A hub whose channels a broker subscribes on demand over `lanes` subscriber connections
    /// (0: no broker subscribes anything, every channel is live at once). At most
    /// [`MAX_LANES`].
    pub fn with_lanes(node_id: impl Into<Arc<str>>, lanes: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                channels: DashMap::new(),
                sessions: DashMap::new(),
                users: DashMap::new(),
                subscriptions: subscriptions::State::new(lanes),
                node_id: node_id.into(),
                socket_node: fastrand::u32(1..),
                next_session: AtomicU64::new(1),
                next_message: AtomicU64::new(1),
                sizes: parking_lot::Mutex::new(()),
                queued: metrics::counter!(m::MESSAGES_QUEUED),
                delivered: metrics::counter!(m::MESSAGES_DELIVERED),
                latency: metrics::histogram!(m::DELIVERY_LATENCY),
                bursts: (0..lanes.max(1)).map(|_| Burst::default()).collect(),
                started: Instant::now(),
                dropped_slow: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "slow_consumer"),
                dropped_closing: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "closing"),
                dropped_invalid: metrics::counter!(m::MESSAGES_DROPPED, "reason" => "invalid_payload"),
            }),
        }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The node part of Pusher socket ids made here (`<socket_node>.<session id>`).
    pub fn socket_node(&self) -> u32 {
        self.inner.socket_node
    }

    pub fn next_session_id(&self) -> SessionId {
        self.inner.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// A node-unique message id, for messages that arrive without one.
    pub fn next_message_id(&self) -> String {
        let seq = self.inner.next_message.fetch_add(1, Ordering::Relaxed);
        format!("{}-{seq}", self.inner.node_id)
    }

    /// Adds a session, unless its user already has `max_per_user` sessions here. The returned
    /// guard joins channels for it, and on drop leaves them all and removes the session: a
    /// session task that returns early or panics cannot stay in the hub.
    pub fn register(&self, session: Arc<LocalSession>, max_per_user: usize) -> Result<Registration, TooManySessions> {
        match self.inner.users.entry(session.user.clone()) {
            // A socket without a user (a Pusher socket before it signs in) is no user's.
            _ if session.user.is_empty() => {}
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
        self.inner.sessions.insert(session.id, session.clone());
        self.record_sizes();
        Ok(Registration { hub: self.clone(), session, user_channel: None, topics: Vec::new() })
    }

    /// Removes a session whose channels were all left (by its [`Registration`]).
    fn unregister(&self, session: &LocalSession) {
        // Whoever still holds it (a heartbeat step, say) can no longer queue into it.
        session.outbox.close(CloseReason::Gone);
        self.inner.sessions.remove(&session.id);
        if let Entry::Occupied(mut e) = self.inner.users.entry(session.user.clone()) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        self.record_sizes();
    }

    /// Sets the session and user gauges to the maps' sizes. Read and set under one lock: two
    /// sessions leaving at once on two threads could otherwise set them out of order and leave
    /// a count that is already gone (seen: `pushnode_connections` stuck above 0 after every
    /// session of a 300-session test had left), which the autoscaler would go on reading.
    fn record_sizes(&self) {
        let _in_order = self.inner.sizes.lock();
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

    /// Every registered session, for a paced drain.
    pub fn all_sessions(&self) -> Vec<Arc<LocalSession>> {
        self.inner.sessions.iter().map(|e| e.value().clone()).collect()
    }

    /// Every registered session, weakly: a snapshot that does not keep departed sessions alive
    /// (the heartbeat sweep walks it over a whole interval).
    pub fn session_refs(&self) -> Vec<Weak<LocalSession>> {
        self.inner.sessions.iter().map(|e| Arc::downgrade(e.value())).collect()
    }

    pub fn channel_count(&self) -> usize {
        self.inner.channels.len()
    }

    /// The topic name and local session count of every channel whose broker channel starts
    /// with `prefix` (a Pusher app's channels) and whose topic name is `wanted`.
    pub fn topic_sizes(&self, prefix: &str, wanted: impl Fn(&str) -> bool) -> Vec<(Arc<str>, usize)> {
        self.inner
            .channels
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .filter_map(|e| e.topic.clone().filter(|t| wanted(t)).map(|topic| (topic, e.members.len())))
            .collect()
    }

    /// Adds `session` to `channel`; the first local session makes it an interest change.
    fn join(&self, channel: &Arc<str>, topic: Option<&Arc<str>>, session: &Arc<LocalSession>) {
        let state = &self.inner.subscriptions;
        let first = {
            let mut entry = self.inner.channels.entry(channel.clone()).or_insert_with(|| Channel {
                topic: topic.cloned(),
                members: Members::default(),
                live: state.live_on_join(),
                format: session.format,
                lane: state.lane_of(channel),
            });
            entry.members.insert(session.clone());
            (entry.members.len() == 1).then_some(entry.lane)
        };
        if let Some(lane) = first {
            state.interest_changed(channel, lane);
        }
    }

    /// Removes session `id` from `channel`; drops the channel when it was the last session.
    fn leave(&self, channel: &Arc<str>, id: SessionId) {
        let emptied = match self.inner.channels.get_mut(channel) {
            Some(mut entry) => {
                entry.members.remove(id);
                entry.members.is_empty()
            }
            None => false,
        };
        // The guard above is dropped before touching the map again.
        if emptied && let Some((_, removed)) = self.inner.channels.remove_if(channel, |_, c| c.members.is_empty()) {
            self.inner.subscriptions.interest_changed(channel, removed.lane);
        }
    }

    /// Fans a broker payload out to every local session of `channel`. The payload is decoded
    /// and encoded once; every session gets a reference-counted copy of the same bytes.
    pub fn deliver(&self, channel: &str, payload: &Bytes) -> Fanout {
        let Some(entry) = self.inner.channels.get(channel) else {
            return Fanout::default();
        };
        let delivery = Delivery::decode_for(payload, entry.topic.as_ref(), entry.format);
        if delivery.terminate {
            // The application ended these connections (a signed-in Pusher user's).
            for session in entry.members.iter() {
                session.outbox.close(CloseReason::Unauthorized);
            }
            return Fanout::default();
        }
        if delivery.is_invalid() {
            // A pushnode envelope whose data no client could parse: JSON sessions skip it.
            self.inner.dropped_invalid.increment(1);
        }
        // Only a user channel's frames tell its sessions about their lane's generation (a
        // topic may be in another lane, whose generation means nothing to them): 0 is never new.
        let generation = if entry.topic.is_none() { self.inner.subscriptions.generation(entry.lane) } else { 0 };
        let fallback_id = || self.next_message_id();
        // The sender of a client event (or an API publish's `socket_id`), if it is here.
        let except = delivery.except.and_then(|(node, id)| (node == self.inner.socket_node).then_some(id));
        let burst = &self.inner.bursts[usize::from(entry.lane) % self.inner.bursts.len()];
        let direct =
            burst.direct(self.inner.started.elapsed().as_micros() as u64) && entry.members.len() <= DIRECT_FANOUT_MAX;
        let mut fanout = Fanout::default();
        for session in entry.members.iter() {
            if except == Some(session.id) {
                continue;
            }
            let Some(frame) = delivery.frame(session.format, &fallback_id) else { continue };
            let frame =
                Outgoing { frame: frame.clone(), published_us: delivery.ts, persisted: delivery.persisted, generation };
            match session.hand(frame, direct) {
                Ok(Handed::Queued) => fanout.delivered += 1,
                Ok(Handed::Written) => {
                    fanout.delivered += 1;
                    fanout.written += 1;
                }
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
        self.inner.queued.increment(fanout.delivered as u64);
        if fanout.written > 0 {
            self.inner.delivered.increment(fanout.written as u64);
            if delivery.ts > 0 {
                let now = now_micros();
                self.inner.latency.record(now.saturating_sub(delivery.ts) as f64 / 1e6);
            }
        }
        fanout
    }
}

/// A registered session's place in the hub, held by its task: the channels it joined through
/// it, left again (and the session removed) when it is dropped, however the task ends.
#[derive(Debug)]
pub struct Registration {
    hub: Hub,
    session: Arc<LocalSession>,
    /// The user's own channel, once joined. Kept apart from the topics so that a session
    /// without topics allocates nothing here (a vector's first push reserves four entries).
    user_channel: Option<Arc<str>>,
    /// Joined topic channels: (broker channel, topic name), each at most once.
    topics: Vec<(Arc<str>, Arc<str>)>,
}

impl Registration {
    pub fn session(&self) -> &Arc<LocalSession> {
        &self.session
    }

    /// Joins the user's own channel (once; joining it again is a no-op).
    pub fn join_user(&mut self, channel: Arc<str>) {
        if self.user_channel.is_none() {
            self.hub.join(&channel, None, &self.session);
            self.user_channel = Some(channel);
        }
    }

    /// Joins topic `topic` on broker channel `channel`; joining twice is a no-op.
    pub fn join_topic(&mut self, channel: Arc<str>, topic: Arc<str>) {
        if !self.has_topic(&topic) {
            self.hub.join(&channel, Some(&topic), &self.session);
            // One topic is the common case (a Pusher socket's user channel): a first push
            // would reserve four entries. Later ones grow as usual.
            if self.topics.capacity() == 0 {
                self.topics.reserve_exact(1);
            }
            self.topics.push((channel, topic));
        }
    }

    /// Leaves topic `topic` if joined.
    pub fn leave_topic(&mut self, topic: &str) {
        if let Some(i) = self.topics.iter().position(|(_, t)| &**t == topic) {
            let (channel, _) = self.topics.swap_remove(i);
            self.hub.leave(&channel, self.session.id);
        }
    }

    pub fn has_topic(&self, topic: &str) -> bool {
        self.topics.iter().any(|(_, t)| &**t == topic)
    }

    /// How many topics are joined.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }
}

impl std::ops::Deref for Registration {
    type Target = LocalSession;

    fn deref(&self) -> &LocalSession {
        &self.session
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        for (channel, _) in self.topics.drain(..) {
            self.hub.leave(&channel, self.session.id);
        }
        if let Some(channel) = self.user_channel.take() {
            self.hub.leave(&channel, self.session.id);
        }
        self.hub.unregister(&self.session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::WireFrame;

    fn session(hub: &Hub, user: &str, capacity: usize) -> Arc<LocalSession> {
        Arc::new(LocalSession::new(hub.next_session_id(), user.into(), Format::Raw, Outbox::new(capacity)))
    }

    /// A parked session over a real loopback socket (the peer's end is returned to keep it open).
    async fn parked(hub: &Hub, user: &str) -> (Arc<LocalSession>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (peer, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let wire = Wire::new(accepted.unwrap().0);
        let local = LocalSession::new(hub.next_session_id(), user.into(), Format::Raw, Outbox::new(8)).with_wire(wire);
        assert!(local.outbox.open_direct(crate::outbox::Direct::ANY));
        (Arc::new(local), peer.unwrap())
    }

    #[tokio::test]
    async fn fan_out_writes_for_a_users_few_sessions_and_queues_for_a_crowd() {
        let hub = Hub::new("n1", false);
        let mut registrations = Vec::new();
        let mut peers = Vec::new();
        for k in 0..=DIRECT_FANOUT_MAX {
            let (session, peer) = parked(&hub, &format!("u{k}")).await;
            let mut registration = hub.register(session, 10).unwrap();
            registration.join_topic("t:crowd".into(), "crowd".into());
            if k == 0 {
                registration.join_user("u:u0".into());
            }
            registrations.push(registration);
            peers.push(peer);
        }
        let payload = Bytes::from_static(b"{\"cnt\":1}");
        // One session in its user channel: written at once, nothing queued.
        assert_eq!(hub.deliver("u:u0", &payload), Fanout { delivered: 1, written: 1, dropped: 0 });
        assert_eq!(registrations[0].outbox.len(), 0);
        // More sessions than a direct fan-out takes: every frame is queued for its session.
        let crowd = hub.deliver("t:crowd", &payload);
        assert_eq!(crowd, Fanout { delivered: DIRECT_FANOUT_MAX + 1, written: 0, dropped: 0 });
        assert!(registrations.iter().all(|r| r.outbox.len() == 1));
    }

    #[test]
    fn delivers_to_every_session_of_the_channel_and_nobody_else() {
        let hub = Hub::new("n1", false);
        let (a1, a2, b) = (session(&hub, "a", 8), session(&hub, "a", 8), session(&hub, "b", 8));
        let mut registrations = Vec::new();
        for (s, channel) in [(&a1, "u:a"), (&a2, "u:a"), (&b, "u:b")] {
            let mut registration = hub.register(s.clone(), 10).unwrap();
            registration.join_user(channel.into());
            registrations.push(registration);
        }

        let fanout = hub.deliver("u:a", &Bytes::from_static(b"{\"cnt\":1}"));
        assert_eq!(fanout, Fanout { delivered: 2, written: 0, dropped: 0 });
        assert_eq!((a1.outbox.len(), a2.outbox.len(), b.outbox.len()), (1, 1, 0));
        let mut batch = Vec::new();
        a1.outbox.drain_into(&mut batch);
        assert_eq!(batch[0].frame, WireFrame::text(r#"{"cnt":1}"#.to_owned()));
    }

    #[test]
    fn a_full_outbox_is_closed_while_others_still_receive() {
        let hub = Hub::new("n1", false);
        let (slow, fast) = (session(&hub, "a", 1), session(&hub, "a", 8));
        let mut registrations = Vec::new();
        for s in [&slow, &fast] {
            let mut registration = hub.register(s.clone(), 10).unwrap();
            registration.join_user("u:a".into());
            registrations.push(registration);
        }
        hub.deliver("u:a", &Bytes::from_static(b"1"));
        let fanout = hub.deliver("u:a", &Bytes::from_static(b"2"));
        assert_eq!(fanout, Fanout { delivered: 1, written: 0, dropped: 1 });
        assert_eq!(slow.outbox.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(fast.outbox.len(), 2);
    }

    #[test]
    fn per_user_limit_and_counts() {
        let hub = Hub::new("n1", false);
        let (s1, s2) = (session(&hub, "a", 1), session(&hub, "a", 1));
        let registration = hub.register(s1.clone(), 1).unwrap();
        assert_eq!(hub.register(s2, 1).err(), Some(TooManySessions));
        assert_eq!((hub.session_count(), hub.user_count(), hub.sessions_of("a")), (1, 1, 1));
        drop(registration);
        assert_eq!((hub.session_count(), hub.user_count(), hub.sessions_of("a")), (0, 0, 0));
    }

    #[test]
    fn a_dropped_registration_leaves_every_channel_even_when_its_task_panics() {
        let hub = Hub::new("n1", true);
        let subscriptions = hub.subscriptions();
        let s = session(&hub, "a", 8);
        let task = {
            let (hub, s) = (hub.clone(), s.clone());
            std::thread::spawn(move || {
                let mut registration = hub.register(s, 1).unwrap();
                registration.join_user("u:a".into());
                registration.join_topic("t:news".into(), "news".into());
                registration.join_topic("t:news".into(), "news".into());
                assert_eq!(registration.topic_count(), 1);
                panic!("a session task failing on purpose");
            })
        };
        assert!(task.join().is_err(), "the thread panicked");
        let mut changes = subscriptions.take_changes();
        changes.sort();
        assert_eq!(changes, vec![Arc::<str>::from("t:news"), "u:a".into()], "joined, then left");
        assert_eq!((hub.session_count(), hub.channel_count(), hub.sessions_of("a")), (0, 0, 0));
        assert_eq!(s.outbox.closing(), Some(CloseReason::Gone), "nothing can queue into it any more");
        assert!(hub.register(s, 1).is_ok(), "the per-user limit was given back");
    }
}
