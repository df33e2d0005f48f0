//! The subscription state the broker drives: which channels gained their first or lost their
//! last local session ("interest changes"), which of them the broker has confirmed ("live"),
//! whether the broker is up, and the subscription generation. Sessions wait on it
//! ([`Hub::wait_live`]) and follow its generation; the broker sees only [`Subscriptions`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use super::{Fanout, Hub};

/// The hub's subscription state (one per hub).
#[derive(Debug)]
pub(super) struct State {
    /// Channels whose local interest changed since the broker last looked; `None` when no
    /// broker consumes them (the memory broker), so the set cannot grow unread. Bounded by
    /// the channels with local sessions plus those that just lost their last one.
    interest: Option<Interest>,
    /// Woken whenever channels become live or the broker comes up.
    live_changed: Notify,
    /// Whether the broker is connected; sessions only wait for a subscription when it is.
    broker_up: AtomicBool,
    /// The broker bumps it when its subscription is lost and after every full (re)subscribe.
    /// A session that sees it change may have missed messages published in between, and
    /// replays them from the inbox.
    generation: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Interest {
    changed: Mutex<HashSet<Arc<str>>>,
    notify: Notify,
}

impl State {
    /// `track_interest` is true when a broker subscribes channels on demand.
    pub(super) fn new(track_interest: bool) -> Self {
        Self {
            interest: track_interest.then(Interest::default),
            live_changed: Notify::new(),
            broker_up: AtomicBool::new(!track_interest),
            generation: watch::Sender::new(0),
        }
    }

    /// Whether a new channel is live at once (nothing to subscribe without a broker).
    pub(super) fn live_on_join(&self) -> bool {
        self.interest.is_none()
    }

    pub(super) fn interest_changed(&self, channel: &Arc<str>) {
        if let Some(interest) = &self.interest {
            interest.changed.lock().insert(channel.clone());
            interest.notify.notify_one();
        }
    }
}

/// The hub as the broker sees it: interest changes in, deliveries and confirmations out. A
/// cheap-clone handle; the broker never gets the [`Hub`] itself, so it cannot reach sessions.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    hub: Hub,
}

impl Subscriptions {
    pub(super) fn new(hub: Hub) -> Self {
        Self { hub }
    }

    pub fn node_id(&self) -> &str {
        self.hub.node_id()
    }

    /// Fans a broker payload out to the local sessions of `channel` ([`Hub::deliver`]).
    pub fn deliver(&self, channel: &str, payload: &Bytes) -> Fanout {
        self.hub.deliver(channel, payload)
    }

    /// Takes the channels whose interest changed since the last call (empty without tracking).
    /// Whether each is still wanted is for [`Subscriptions::is_wanted`] to say.
    pub fn take_changes(&self) -> Vec<Arc<str>> {
        match &self.hub.inner.subscriptions.interest {
            Some(interest) => interest.changed.lock().drain().collect(),
            None => Vec::new(),
        }
    }

    /// Waits until the interest changes (never returns without tracking).
    pub async fn changed(&self) {
        match &self.hub.inner.subscriptions.interest {
            Some(interest) => interest.notify.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Whether any local session listens to `channel`.
    pub fn is_wanted(&self, channel: &str) -> bool {
        self.hub.inner.channels.contains_key(channel)
    }

    /// Every channel with at least one local session.
    pub fn wanted(&self) -> Vec<Arc<str>> {
        self.hub.inner.channels.iter().map(|e| e.key().clone()).collect()
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

    /// Marks every channel as not subscribed (the broker connection was lost) and starts a
    /// new generation: messages of the old one may be missing until the next full subscribe.
    pub fn mark_all_down(&self) {
        self.hub.inner.subscriptions.broker_up.store(false, Ordering::Release);
        self.resubscribed();
        for mut entry in self.hub.inner.channels.iter_mut() {
            entry.live = false;
        }
    }

    pub fn set_broker_up(&self, up: bool) {
        let state = &self.hub.inner.subscriptions;
        state.broker_up.store(up, Ordering::Release);
        state.live_changed.notify_waiters();
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

    /// Starts a new subscription generation: called when the subscription is lost and after
    /// every full (re)subscribe. Wakes every session, so those with an inbox check for a gap.
    pub fn resubscribed(&self) {
        self.hub.inner.subscriptions.generation.send_modify(|g| *g += 1);
        for session in self.hub.inner.sessions.iter() {
            session.outbox.wake();
        }
    }
}

impl Hub {
    /// The hub as the broker sees it.
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions::new(self.clone())
    }

    /// The current subscription generation (see [`Subscriptions::resubscribed`]).
    pub fn generation(&self) -> u64 {
        *self.inner.subscriptions.generation.borrow()
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
                if !state.broker_up.load(Ordering::Acquire) {
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
        let generation = hub.generation();

        subscriptions.interrupt(&[ua.clone(), topic.clone()]);
        assert!(!hub.is_live("u:a") && !hub.is_live("t:news") && hub.is_live("u:b"));
        assert!(user.take_interrupted(), "the user's session must replay its gap");
        assert!(!user.take_interrupted(), "taken once");
        assert!(!other.take_interrupted() && !listener.take_interrupted());
        assert_eq!(hub.generation(), generation, "no node-wide replay");
    }
}
