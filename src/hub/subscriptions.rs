//! The subscription state the broker drives: which channels gained their first or lost their
//! last local session ("interest changes"), which of them the broker has confirmed ("live"),
//! whether the broker is up, and the subscription generation. Sessions wait on it
//! ([`Hub::wait_live`]) and follow its generation; the broker sees only [`Subscriptions`].
//!
//! The state is split into **lanes**, one per broker subscriber connection
//! (`broker.subscriber_connections`): every channel belongs to one lane, chosen from a hash
//! of its name, and each lane has its own interest changes, "broker up" flag and generation.
//! A lane's connection loss marks only its own channels down and opens a gap only for the
//! sessions whose user channel is in it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Fanout, Hub};

/// The most subscriber lanes a hub takes (a channel's lane is kept in a `u16`).
pub const MAX_LANES: usize = 256;

/// The hub's subscription state (one per hub).
#[derive(Debug)]
pub(super) struct State {
    /// One per broker subscriber connection; empty when no broker subscribes channels on
    /// demand (the memory broker), so nothing records interest changes nobody reads.
    lanes: Box<[Lane]>,
    /// Woken whenever channels become live or a lane's connection comes up.
    live_changed: Notify,
}

#[derive(Debug, Default)]
struct Lane {
    /// Channels whose local interest changed since the broker last looked. Bounded by the
    /// lane's channels with local sessions plus those that just lost their last one.
    changed: Mutex<HashSet<Arc<str>>>,
    notify: Notify,
    /// Whether this lane's connection is up; sessions only wait for a subscription when it is.
    broker_up: AtomicBool,
    /// The broker bumps it when this lane's subscription is lost and after every full
    /// (re)subscribe. A session whose user channel is in this lane and that sees it change may
    /// have missed messages published in between, and replays them from the inbox.
    generation: AtomicU64,
}

impl State {
    /// `lanes` is the number of broker subscriber connections, 0 when no broker subscribes
    /// channels on demand.
    pub(super) fn new(lanes: usize) -> Self {
        assert!(lanes <= MAX_LANES, "at most {MAX_LANES} subscriber lanes");
        Self { lanes: (0..lanes).map(|_| Lane::default()).collect(), live_changed: Notify::new() }
    }

    /// Whether a new channel is live at once (nothing to subscribe without a broker).
    pub(super) fn live_on_join(&self) -> bool {
        self.lanes.is_empty()
    }

    /// The lane `channel` belongs to (FNV-1a of its name; 0 with fewer than two lanes).
    pub(super) fn lane_of(&self, channel: &str) -> u16 {
        if self.lanes.len() < 2 {
            return 0;
        }
        let hash =
            channel.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
        (hash % self.lanes.len() as u64) as u16
    }

    pub(super) fn interest_changed(&self, channel: &Arc<str>, lane: u16) {
        if let Some(lane) = self.lanes.get(usize::from(lane)) {
            lane.changed.lock().insert(channel.clone());
            lane.notify.notify_one();
        }
    }

    /// The generation of `lane` (0 without a broker).
    pub(super) fn generation(&self, lane: u16) -> u64 {
        self.lanes.get(usize::from(lane)).map_or(0, |l| l.generation.load(Ordering::Acquire))
    }

    /// Whether `lane`'s connection is up (always, without a broker).
    fn broker_up(&self, lane: u16) -> bool {
        self.lanes.get(usize::from(lane)).is_none_or(|l| l.broker_up.load(Ordering::Acquire))
    }
}

/// The hub as one broker subscriber connection sees it: its lane's interest changes in,
/// deliveries and confirmations out. A cheap-clone handle; the broker never gets the [`Hub`]
/// itself, so it cannot reach sessions.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    hub: Hub,
    lane: u16,
}

impl Subscriptions {
    pub(super) fn new(hub: Hub, lane: u16) -> Self {
        Self { hub, lane }
    }

    pub fn node_id(&self) -> &str {
        self.hub.node_id()
    }

    /// How many lanes (subscriber connections) the hub was built for.
    pub fn lanes(&self) -> usize {
        self.hub.inner.subscriptions.lanes.len()
    }

    /// The view of lane `lane` (`0..lanes()`).
    pub fn lane(&self, lane: usize) -> Self {
        assert!(lane < self.lanes().max(1), "lane {lane} of {}", self.lanes());
        Self { hub: self.hub.clone(), lane: lane as u16 }
    }

    /// This view's lane.
    pub fn index(&self) -> usize {
        usize::from(self.lane)
    }

    fn state(&self) -> Option<&Lane> {
        self.hub.inner.subscriptions.lanes.get(usize::from(self.lane))
    }

    /// Fans a broker payload out to the local sessions of `channel` ([`Hub::deliver`]).
    pub fn deliver(&self, channel: &str, payload: &Bytes) -> Fanout {
        self.hub.deliver(channel, payload)
    }

    /// Takes this lane's channels whose interest changed since the last call (empty without
    /// tracking). Whether each is still wanted is for [`Subscriptions::is_wanted`] to say.
    pub fn take_changes(&self) -> Vec<Arc<str>> {
        match self.state() {
            Some(lane) => lane.changed.lock().drain().collect(),
            None => Vec::new(),
        }
    }

    /// Waits until this lane's interest changes (never returns without tracking).
    pub async fn changed(&self) {
        match self.state() {
            Some(lane) => lane.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Whether any local session listens to `channel`.
    pub fn is_wanted(&self, channel: &str) -> bool {
        self.hub.inner.channels.contains_key(channel)
    }

    /// Every channel of this lane with at least one local session.
    pub fn wanted(&self) -> Vec<Arc<str>> {
        self.hub.inner.channels.iter().filter(|e| e.lane == self.lane).map(|e| e.key().clone()).collect()
    }

    /// Marks channels whose subscription the broker confirmed, and wakes sessions waiting on
    /// them.
    pub fn mark_live(&self, channels: &[Arc<str>]) {
        for channel in channels {
            if let Some(mut entry) = self.hub.inner.channels.get_mut(channel) {
                entry.live = true;
            }
        }
        self.hub.inner.subscriptions.live_changed.notify_waiters();
    }

    /// Marks every channel of this lane as not subscribed (its connection was lost) and
    /// starts a new generation: messages of the old one may be missing until the next full
    /// subscribe.
    pub fn mark_all_down(&self) {
        if let Some(lane) = self.state() {
            lane.broker_up.store(false, Ordering::Release);
        }
        self.resubscribed();
        for mut entry in self.hub.inner.channels.iter_mut() {
            if entry.lane == self.lane {
                entry.live = false;
            }
        }
    }

    pub fn set_broker_up(&self, up: bool) {
        if let Some(lane) = self.state() {
            lane.broker_up.store(up, Ordering::Release);
        }
        self.hub.inner.subscriptions.live_changed.notify_waiters();
    }

    /// The broker lost the subscription of these channels only (a Redis Cluster slot moved to
    /// another shard) and is about to subscribe them again. They are no longer live, and the
    /// sessions of a user channel among them are told a gap may have opened, before any frame
    /// of the new subscription can reach their outbox. Unlike [`Subscriptions::mark_all_down`]
    /// this starts no new generation: only these sessions replay from the inbox.
    pub fn interrupt(&self, channels: &[Arc<str>]) {
        for channel in channels {
            let Some(mut entry) = self.hub.inner.channels.get_mut(channel) else { continue };
            entry.live = false;
            if entry.topic.is_none() {
                for session in entry.members.iter() {
                    session.interrupted.store(true, Ordering::Release);
                    session.outbox.wake();
                }
            }
        }
    }

    /// Starts a new generation of this lane: called when its subscription is lost and after
    /// every full (re)subscribe. Wakes every session, so those with an inbox check for a gap
    /// (only those whose user channel is in this lane find one).
    pub fn resubscribed(&self) {
        if let Some(lane) = self.state() {
            lane.generation.fetch_add(1, Ordering::AcqRel);
        }
        for session in self.hub.inner.sessions.iter() {
            session.outbox.wake();
        }
    }
}

impl Hub {
    /// The hub as the broker's first (or only) subscriber connection sees it; the others'
    /// views come from [`Subscriptions::lane`].
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions::new(self.clone(), 0)
    }

    /// The subscription generation of the lane `channel` belongs to (see
    /// [`Subscriptions::resubscribed`]); 0 without a broker.
    pub fn generation_of(&self, channel: &str) -> u64 {
        let state = &self.inner.subscriptions;
        state.generation(state.lane_of(channel))
    }

    /// Whether the broker confirmed its subscription of `channel`.
    pub fn is_live(&self, channel: &str) -> bool {
        self.inner.channels.get(channel).is_some_and(|c| c.live)
    }

    /// Waits, at most `limit`, until the broker has subscribed `channel`, so that a session's
    /// welcome means "messages published from now on reach you". Returns at once while the
    /// broker is down (the session then gets what arrives after the reconnect).
    ///
    /// The one await in the hub: it waits on local state only (the broker's confirmation
    /// arrives through [`Subscriptions::mark_live`]), never on I/O.
    pub async fn wait_live(&self, channel: &str, limit: Duration) -> bool {
        let state = &self.inner.subscriptions;
        let wait = async {
            loop {
                let notified = state.live_changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_live(channel) {
                    return true;
                }
                if !state.broker_up(state.lane_of(channel)) {
                    return false;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::LocalSession;
    use crate::outbox::Outbox;
    use crate::protocol::Format;

    fn register(hub: &Hub, user: &str) -> (Arc<LocalSession>, crate::hub::Registration) {
        let session = Arc::new(LocalSession::new(hub.next_session_id(), user.into(), Format::Raw, Outbox::new(8)));
        let registration = hub.register(session.clone(), 10).expect("registered");
        (session, registration)
    }

    #[test]
    fn interest_changes_only_on_first_join_and_last_leave() {
        let hub = Hub::new("n1", true);
        let subscriptions = hub.subscriptions();
        let ((_, mut r1), (_, mut r2)) = (register(&hub, "a"), register(&hub, "a"));
        let channel: Arc<str> = "u:a".into();
        r1.join_user(channel.clone());
        r2.join_user(channel.clone());
        assert_eq!(subscriptions.take_changes(), vec![channel.clone()]);
        drop(r1);
        assert!(subscriptions.take_changes().is_empty());
        assert!(subscriptions.is_wanted("u:a"));
        drop(r2);
        assert_eq!(subscriptions.take_changes(), vec![channel.clone()]);
        assert!(!subscriptions.is_wanted("u:a"));
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn an_interrupted_user_channel_flags_its_sessions_but_not_topic_listeners() {
        let hub = Hub::new("n1", true);
        let subscriptions = hub.subscriptions();
        let ((user, mut ru), (other, mut ro), (listener, mut rl)) =
            (register(&hub, "a"), register(&hub, "b"), register(&hub, "c"));
        let (ua, ub, topic): (Arc<str>, Arc<str>, Arc<str>) = ("u:a".into(), "u:b".into(), "t:news".into());
        ru.join_user(ua.clone());
        ro.join_user(ub.clone());
        rl.join_topic(topic.clone(), "news".into());
        subscriptions.mark_live(&[ua.clone(), ub.clone(), topic.clone()]);
        let generation = hub.generation_of("u:a");

        subscriptions.interrupt(&[ua.clone(), topic.clone()]);
        assert!(!hub.is_live("u:a") && !hub.is_live("t:news") && hub.is_live("u:b"));
        assert!(user.take_interrupted(), "the user's session must replay its gap");
        assert!(!user.take_interrupted(), "taken once");
        assert!(!other.take_interrupted() && !listener.take_interrupted());
        assert_eq!(hub.generation_of("u:a"), generation, "no node-wide replay");
    }

    #[test]
    fn lanes_split_interest_liveness_and_generations() {
        let hub = Hub::with_lanes("n1", 2);
        let (lane0, lane1) = (hub.subscriptions().lane(0), hub.subscriptions().lane(1));
        let state = &hub.inner.subscriptions;
        // Users until each lane has one.
        let mut by_lane: [Option<String>; 2] = [None, None];
        for n in 0.. {
            let user = format!("u{n}");
            let lane = usize::from(state.lane_of(&format!("u:{user}")));
            by_lane[lane].get_or_insert(user);
            if by_lane.iter().all(Option::is_some) {
                break;
            }
        }
        let [Some(a), Some(b)] = by_lane else { unreachable!() };
        let ((sa, mut ra), (sb, mut rb)) = (register(&hub, &a), register(&hub, &b));
        let (ca, cb): (Arc<str>, Arc<str>) = (format!("u:{a}").into(), format!("u:{b}").into());
        ra.join_user(ca.clone());
        rb.join_user(cb.clone());
        assert_eq!((lane0.take_changes(), lane1.take_changes()), (vec![ca.clone()], vec![cb.clone()]));
        assert_eq!((lane0.wanted(), lane1.wanted()), (vec![ca.clone()], vec![cb.clone()]));

        lane0.set_broker_up(true);
        lane1.set_broker_up(true);
        lane0.mark_live(std::slice::from_ref(&ca));
        lane1.mark_live(std::slice::from_ref(&cb));
        let (ga, gb) = (hub.generation_of(&ca), hub.generation_of(&cb));
        lane1.mark_all_down();
        assert!(hub.is_live(&ca) && !hub.is_live(&cb), "only lane 1's channels went down");
        assert_eq!((hub.generation_of(&ca), hub.generation_of(&cb)), (ga, gb + 1));

        // A user channel's frames carry its lane's generation.
        hub.deliver(&cb, &Bytes::from_static(b"x"));
        let mut batch = Vec::new();
        sb.outbox.drain_into(&mut batch);
        assert_eq!(batch[0].generation, gb + 1);
        assert!(sa.outbox.is_empty());
    }

    #[test]
    fn topic_frames_carry_no_generation() {
        let hub = Hub::with_lanes("n1", 4);
        let (session, mut registration) = register(&hub, "a");
        let topic: Arc<str> = "t:news".into();
        registration.join_topic(topic.clone(), "news".into());
        let lane = hub.subscriptions().lane(usize::from(hub.inner.subscriptions.lane_of(&topic)));
        lane.mark_all_down();
        assert!(hub.generation_of(&topic) > 0);
        hub.deliver(&topic, &Bytes::from_static(b"x"));
        let mut batch = Vec::new();
        session.outbox.drain_into(&mut batch);
        assert_eq!(batch[0].generation, 0, "a topic's lane says nothing about the user's channel");
    }

    #[test]
    fn without_a_broker_every_channel_is_live_and_up() {
        let hub = Hub::with_lanes("n1", 0);
        let (_, mut registration) = register(&hub, "a");
        registration.join_user("u:a".into());
        assert!(hub.is_live("u:a"));
        assert!(hub.subscriptions().take_changes().is_empty());
        assert_eq!(hub.generation_of("u:a"), 0);
    }
}
