//! `Presence`: who is in each Pusher presence channel, across every node.
//!
//! A node keeps its own truth in memory: per presence channel, its users and how many of its
//! sockets each has there. A user's first socket on the node makes the node hold the user
//! (in Redis, per channel and node); its last one makes it let go. A user is a member while
//! any node holds it, so `member_added` and `member_removed` fire once per user, not per tab
//! or node, and every node reads the same member list. Nodes refresh their deadline in a node
//! registry every third of `pusher.presence_ttl` and keep the set of channels they hold; a
//! node that dies without letting go (SIGKILL) passes its deadline, and the next live node's
//! round evicts it from every channel it held and announces what that changed. The Redis side
//! is `presence.lua`; with the in-process broker, this node's truth is the whole truth.
//!
//! Changes reach Redis through one worker task, in order, as "look at this user now": the
//! worker applies the node's current truth, so a join and a leave racing each other cannot
//! leave Redis wrong, and a change that failed (Redis down) is repaired by the next repair
//! round (every `REPAIR_EVERY` rounds), which writes the node's whole truth. Member events
//! are published on the channel's broker channel like any event; the socket that joined does
//! not get its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use redis::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::Broker;
use crate::metrics as m;
use crate::protocol::Envelope;
use crate::redis_link::{LinkError, RedisLink};
use crate::webhooks::Webhooks;

/// The Redis Functions library (`#!lua name=pushnode_presence`).
pub const LIBRARY: &str = include_str!("presence.lua");

/// Every this many rounds (a round is a third of the TTL) a node rewrites its whole truth for
/// every channel it holds, repairing joins and leaves that did not reach Redis. The other rounds
/// only refresh its deadline in the node registry, which is what finds it dead.
const REPAIR_EVERY: u32 = 12;
/// A node's hold on one channel lasts this many TTLs past its last join or repair: a backstop
/// (a dead node is evicted through the registry within a TTL and a third). Repairs come every
/// REPAIR_EVERY thirds of a TTL, so this is three repair periods.
const HOLD_TTLS: u32 = REPAIR_EVERY;

/// Changes waiting for the worker. A join waits for room (its subscriber is waiting anyway);
/// a leave that finds the queue full hands its change to a task that waits, since a change
/// only says which user to look at and its order does not matter.
const QUEUE: usize = 4096;

/// One presence channel of an app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelRef {
    pub app_id: Arc<str>,
    pub name: Arc<str>,
    /// Where its events travel.
    pub broker_channel: Arc<str>,
}

/// A member: the user id and user info as the JSON texts the application signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    pub user_info: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence store unavailable: {0}")]
    Unavailable(String),
    #[error("presence channel is full ({0} members)")]
    Full(usize),
}

impl From<LinkError> for PresenceError {
    fn from(e: LinkError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// What a [`Presence`] keeps: presence members, or channel occupancy (a node holds the one
/// pseudo-member `"_"` of a channel while it has sockets there, so "a member joined" is "the
/// channel became occupied" and "the last member left" is "it was vacated").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Presence,
    Occupancy,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Presence => "pushnode:presence",
            Self::Occupancy => "pushnode:occupancy",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Presence {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    kind: Kind,
    node: Arc<str>,
    webhooks: Webhooks,
    /// `None`: the in-process broker; this node is the cluster.
    link: Option<RedisLink>,
    broker: Broker,
    ttl: Duration,
    max_members: usize,
    /// This node's truth: per broker channel, its users.
    channels: DashMap<Arc<str>, LocalChannel>,
    /// The in-process store (no Redis): per broker channel, the members and their info.
    held: parking_lot::Mutex<HashMap<Arc<str>, HashMap<String, String>>>,
    queue: mpsc::Sender<Change>,
    /// The worker's end, taken by [`Presence::run`].
    receiver: parking_lot::Mutex<Option<mpsc::Receiver<Change>>>,
}

#[derive(Debug)]
struct LocalChannel {
    channel: ChannelRef,
    /// user id -> (sockets here, user info)
    users: HashMap<Arc<str>, (usize, Arc<str>)>,
}

/// "Look at `user` in `channel` now", with who to answer and whom not to tell.
#[derive(Debug)]
struct Change {
    channel: ChannelRef,
    user: Arc<str>,
    /// The joining socket: it gets the member list, not its own `member_added`.
    socket: Option<Arc<str>>,
    reply: Option<oneshot::Sender<Result<Vec<Member>, PresenceError>>>,
}

/// One socket's place in a presence channel; dropping it (unsubscribe, disconnect, a panicking
/// session) lets go of the user once its last socket on this node has.
#[derive(Debug)]
pub struct Seat {
    presence: Presence,
    channel: ChannelRef,
    user: Arc<str>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if self.presence.release(&self.channel, &self.user) {
            self.presence.notify(Change {
                channel: self.channel.clone(),
                user: self.user.clone(),
                socket: None,
                reply: None,
            });
        }
    }
}

impl Seat {
    pub fn channel(&self) -> &ChannelRef {
        &self.channel
    }
}

impl Presence {
    pub fn new(
        kind: Kind,
        node: Arc<str>,
        link: Option<RedisLink>,
        broker: Broker,
        webhooks: Webhooks,
        ttl: Duration,
        max_members: usize,
    ) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        Self {
            inner: Arc::new(Inner {
                kind,
                webhooks,
                node,
                link,
                broker,
                ttl,
                max_members,
                channels: DashMap::new(),
                held: parking_lot::Mutex::new(HashMap::new()),
                queue,
                receiver: parking_lot::Mutex::new(Some(receiver)),
            }),
        }
    }

    /// Adds a socket of `user` (whose info is `user_info`) to `channel` and returns its seat
    /// and the channel's members, itself included. `socket` is the socket's id, so it does not
    /// get its own `member_added`.
    pub async fn join(
        &self,
        channel: ChannelRef,
        user: Arc<str>,
        user_info: Arc<str>,
        socket: Arc<str>,
    ) -> Result<(Seat, Vec<Member>), PresenceError> {
        {
            let mut local = self
                .inner
                .channels
                .entry(channel.broker_channel.clone())
                .or_insert_with(|| LocalChannel { channel: channel.clone(), users: HashMap::new() });
            let entry = local.users.entry(user.clone()).or_insert((0, user_info));
            entry.0 += 1;
        }
        let seat = Seat { presence: self.clone(), channel: channel.clone(), user: user.clone() };
        let (reply, answer) = oneshot::channel();
        let change = Change { channel, user, socket: Some(socket), reply: Some(reply) };
        if self.inner.queue.send(change).await.is_err() {
            return Err(PresenceError::Unavailable("node is stopping".into()));
        }
        match answer.await {
            Ok(Ok(members)) => Ok((seat, members)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(PresenceError::Unavailable("node is stopping".into())),
        }
    }

    /// Adds a socket to `channel`'s occupancy ([`Kind::Occupancy`]) without waiting for Redis.
    pub fn occupy(&self, channel: ChannelRef) -> Seat {
        let user: Arc<str> = "\"_\"".into();
        {
            let mut local = self
                .inner
                .channels
                .entry(channel.broker_channel.clone())
                .or_insert_with(|| LocalChannel { channel: channel.clone(), users: HashMap::new() });
            local.users.entry(user.clone()).or_insert((0, "null".into())).0 += 1;
        }
        self.notify(Change { channel: channel.clone(), user: user.clone(), socket: None, reply: None });
        Seat { presence: self.clone(), channel, user }
    }

    /// The channel's members, from every node.
    pub async fn members(&self, channel: &ChannelRef) -> Result<Vec<Member>, PresenceError> {
        match &self.inner.link {
            None => Ok(self.inner.held.lock().get(&channel.broker_channel).map_or_else(Vec::new, |members| {
                members.iter().map(|(u, i)| Member { user_id: u.clone(), user_info: i.clone() }).collect()
            })),
            Some(link) => {
                let value = link.fcall(LIBRARY, "pushnode_presence_members", &self.key(channel), &[]).await?;
                let [members, gone] = parts(value);
                self.announce_gone(channel, &strings(gone)).await;
                Ok(pairs(members))
            }
        }
    }

    /// One socket fewer for `user` here; true when it was the user's last.
    fn release(&self, channel: &ChannelRef, user: &str) -> bool {
        let Some(mut local) = self.inner.channels.get_mut(&channel.broker_channel) else { return false };
        let last = match local.users.get_mut(user) {
            Some((count, _)) => {
                *count -= 1;
                *count == 0
            }
            None => false,
        };
        if last {
            local.users.remove(user);
        }
        last
    }

    fn notify(&self, change: Change) {
        match self.inner.queue.try_send(change) {
            Ok(()) => {}
            // Full: hand it to a task that waits (a change's order does not matter, see above).
            Err(mpsc::error::TrySendError::Full(change)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let queue = self.inner.queue.clone();
                    runtime.spawn(async move { queue.send(change).await });
                }
            }
            // The worker stopped with the node; its Redis hold expires with its deadline.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn key(&self, channel: &ChannelRef) -> String {
        format!("{}:{{{}:{}}}", self.inner.kind.prefix(), channel.app_id, channel.name)
    }

    /// This node's users in `channel` now, with their info.
    fn truth(&self, channel: &ChannelRef, user: &str) -> Option<Arc<str>> {
        self.inner
            .channels
            .get(&channel.broker_channel)
            .and_then(|local| local.users.get(user).map(|(_, info)| info.clone()))
    }

    /// The worker: applies changes in order, and syncs every channel this node holds every
    /// third of the TTL, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let Some(mut receiver) = self.inner.receiver.lock().take() else { return };
        let mut tick = tokio::time::interval(self.inner.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reclaimed = self.inner.link.is_none();
        let mut round = 0u32;
        loop {
            tokio::select! {
                change = receiver.recv() => match change {
                    Some(change) => self.apply(change).await,
                    None => return,
                },
                _ = tick.tick() => {
                    if !reclaimed {
                        reclaimed = self.reclaim().await;
                    }
                    self.sync_all(round.is_multiple_of(REPAIR_EVERY)).await;
                    round = round.wrapping_add(1);
                }
                () = stop.cancelled() => {
                    self.leave_all().await;
                    return;
                }
            }
        }
    }

    async fn apply(&self, change: Change) {
        let Change { channel, user, socket, reply } = change;
        let result = self.apply_truth(&channel, &user, socket.as_deref()).await;
        let result = match result {
            Ok(()) if reply.is_some() => self.members(&channel).await,
            Ok(()) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            debug!(error = %e, channel = %channel.name, "presence change not applied; the next sync repairs it");
            metrics::counter!(m::PRESENCE_ERRORS).increment(1);
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }

    /// Makes Redis agree with this node about `user` in `channel`, announcing a change.
    async fn apply_truth(&self, channel: &ChannelRef, user: &str, socket: Option<&str>) -> Result<(), PresenceError> {
        let info = self.truth(channel, user);
        let Some(link) = &self.inner.link else {
            // In process: `held` is the store, this node the only one.
            let event = {
                let mut held = self.inner.held.lock();
                let members = held.entry(channel.broker_channel.clone()).or_default();
                let event = match info {
                    Some(info) if !members.contains_key(user) => {
                        if members.len() >= self.inner.max_members {
                            return Err(PresenceError::Full(self.inner.max_members));
                        }
                        members.insert(user.to_owned(), info.to_string());
                        Some(Some(info))
                    }
                    None if members.remove(user).is_some() => Some(None),
                    _ => None,
                };
                if members.is_empty() {
                    held.remove(&channel.broker_channel);
                }
                event
            };
            match event {
                Some(Some(info)) => self.announce_added(channel, user, &info, socket).await,
                Some(None) => self.announce_gone(channel, &[user.to_owned()]).await,
                None => {}
            }
            return Ok(());
        };
        let key = self.key(channel);
        let node = &*self.inner.node;
        match info {
            Some(info) => {
                let ttl = self.hold_ms();
                let max = self.inner.max_members.to_string();
                // In this node's held set first, so that if it dies from now on, whoever reaps
                // it finds the channel (the set is refreshed at every sync as well).
                let own = format!("{}:held:{node}", self.inner.kind.prefix());
                link.query(redis::cmd("SADD").arg(&own).arg(held_entry(channel))).await?;
                let value =
                    link.fcall(LIBRARY, "pushnode_presence_join", &key, &[node, user, &info, &ttl, &max]).await?;
                let [status, gone] = parts(value);
                self.announce_gone(channel, &strings(gone)).await;
                match int(&status) {
                    1 => self.announce_added(channel, user, &info, socket).await,
                    -1 => {
                        // Not let in: this socket's seat is released by its session.
                        return Err(PresenceError::Full(self.inner.max_members));
                    }
                    _ => {}
                }
            }
            None => {
                let value = link.fcall(LIBRARY, "pushnode_presence_leave", &key, &[node, user]).await?;
                let [status, gone] = parts(value);
                self.announce_gone(channel, &strings(gone)).await;
                if int(&status) == 1 {
                    self.announce_gone(channel, &[user.to_owned()]).await;
                }
            }
        }
        Ok(())
    }

    /// With `repair`, writes this node's whole truth for every channel it holds (and drops
    /// channels it no longer holds once Redis knows), announcing what that changed; then, every
    /// round, refreshes the node's deadline and evicts dead nodes.
    async fn sync_all(&self, repair: bool) {
        let Some(link) = &self.inner.link else {
            self.inner.channels.retain(|_, local| !local.users.is_empty());
            return;
        };
        if !repair {
            if let Err(e) = self.keep_alive_and_reap(link, &[], &[]).await {
                metrics::counter!(m::PRESENCE_ERRORS).increment(1);
                debug!(error = %e, "presence node registry not refreshed");
            }
            return;
        }
        // Redis's view is repaired below; a channel this node let go of everywhere is
        // forgotten once Redis knows.
        let channels: Vec<(ChannelRef, Vec<Held>)> = self
            .inner
            .channels
            .iter()
            .map(|e| (e.channel.clone(), e.users.iter().map(|(u, (_, i))| (u.clone(), i.clone())).collect()))
            .collect();
        let ttl = self.hold_ms();
        let (mut held, mut dropped) = (Vec::new(), Vec::new());
        for (channel, users) in channels {
            let mut args: Vec<&str> = vec![&self.inner.node, &ttl];
            for (user, info) in &users {
                args.push(user);
                args.push(info);
            }
            match link.fcall(LIBRARY, "pushnode_presence_sync", &self.key(&channel), &args).await {
                Ok(value) => {
                    let [added, removed, gone] = parts(value);
                    for member in pairs(added) {
                        self.announce_added(&channel, &member.user_id, &member.user_info, None).await;
                    }
                    let mut gone = strings(gone);
                    gone.extend(strings(removed));
                    self.announce_gone(&channel, &gone).await;
                    if users.is_empty() {
                        self.inner.channels.remove_if(&channel.broker_channel, |_, local| local.users.is_empty());
                        dropped.push(held_entry(&channel));
                    } else {
                        held.push(held_entry(&channel));
                    }
                }
                Err(e) => {
                    metrics::counter!(m::PRESENCE_ERRORS).increment(1);
                    debug!(error = %e, channel = %channel.name, "presence sync failed; retrying next time");
                }
            }
        }
        if let Err(e) = self.keep_alive_and_reap(link, &held, &dropped).await {
            metrics::counter!(m::PRESENCE_ERRORS).increment(1);
            debug!(error = %e, "presence node registry not refreshed");
        }
    }

    /// How long a hold on one channel lasts, in ms (see [`HOLD_TTLS`]).
    fn hold_ms(&self) -> String {
        (self.inner.ttl.as_millis() * u128::from(HOLD_TTLS)).to_string()
    }

    /// A node that restarts under the same id (a container restarted in its pod keeps the pod's
    /// name) finds its previous process's holds still listed as its own, and alive: nobody
    /// else would ever reap them. At its first round it lets go of every channel it held that
    /// it does not hold now, announcing what that vacates or removes. True once done.
    async fn reclaim(&self) -> bool {
        let Some(link) = &self.inner.link else { return true };
        let own = format!("{}:held:{}", self.inner.kind.prefix(), self.inner.node);
        let entries = match link.query(redis::cmd("SMEMBERS").arg(&own)).await {
            Ok(value) => strings(value),
            Err(e) => {
                debug!(error = %e, "previous holds not checked; retrying");
                return false;
            }
        };
        for entry in entries {
            let Some(channel) = parse_held_entry(&entry) else { continue };
            if self.inner.channels.contains_key(&channel.broker_channel) {
                continue; // held now: the sync below makes Redis agree with this process
            }
            match link.fcall(LIBRARY, "pushnode_presence_evict", &self.key(&channel), &[&self.inner.node]).await {
                Ok(gone) => {
                    self.announce_gone(&channel, &strings(gone)).await;
                    let _ = link.query(redis::cmd("SREM").arg(&own).arg(&entry)).await;
                }
                Err(e) => {
                    debug!(error = %e, "previous holds not released; retrying");
                    return false;
                }
            }
        }
        true
    }

    /// Refreshes this node's deadline and the set of channels it holds, and reaps the channels
    /// of nodes past their deadline (killed), so their members (their occupancy) are announced
    /// gone even when no live node has sockets in those channels.
    async fn keep_alive_and_reap(
        &self,
        link: &RedisLink,
        held: &[String],
        dropped: &[String],
    ) -> Result<(), LinkError> {
        let prefix = self.inner.kind.prefix();
        let registry = format!("{prefix}:nodes");
        let held_key = |node: &str| format!("{prefix}:held:{node}");
        let own = held_key(&self.inner.node);
        if !dropped.is_empty() {
            link.query(redis::cmd("SREM").arg(&own).arg(dropped)).await?;
        }
        if !held.is_empty() {
            link.query(redis::cmd("SADD").arg(&own).arg(held)).await?;
        }
        // The set outlives this node by a few TTLs, long enough for a live node to evict it.
        link.query(redis::cmd("PEXPIRE").arg(&own).arg(self.inner.ttl.as_millis() as u64 * 4)).await?;
        let ttl = self.inner.ttl.as_millis().to_string();
        let dead = strings(link.fcall(LIBRARY, "pushnode_presence_alive", &registry, &[&self.inner.node, &ttl]).await?);
        for node in dead.iter().filter(|n| **n != *self.inner.node) {
            let entries = strings(link.query(redis::cmd("SMEMBERS").arg(held_key(node))).await?);
            for entry in entries {
                if let Some(channel) = parse_held_entry(&entry) {
                    let gone = link.fcall(LIBRARY, "pushnode_presence_evict", &self.key(&channel), &[node]).await?;
                    self.announce_gone(&channel, &strings(gone)).await;
                }
            }
            link.query(redis::cmd("DEL").arg(held_key(node))).await?;
            link.query(redis::cmd("ZREM").arg(&registry).arg(node)).await?;
            debug!(node = %node, kind = ?self.inner.kind, "reaped a dead node's channels");
        }
        Ok(())
    }

    /// On shutdown: let go of every user at once, so they leave now rather than at the TTL.
    async fn leave_all(&self) {
        for mut local in self.inner.channels.iter_mut() {
            local.users.clear();
        }
        self.sync_all(true).await;
    }

    /// A member joined (the channel became occupied): tells the channel's sockets (presence)
    /// and the webhooks.
    async fn announce_added(&self, channel: &ChannelRef, user: &str, info: &str, socket: Option<&str>) {
        match self.inner.kind {
            Kind::Presence => {
                let data = format!(r#"{{"user_id":{user},"user_info":{info}}}"#);
                self.publish(channel, "pusher_internal:member_added", &data, socket).await;
                self.webhook(channel, "member_added", Some(user)).await;
            }
            Kind::Occupancy => self.webhook(channel, "channel_occupied", None).await,
        }
    }

    /// Members left (the channel was vacated).
    async fn announce_gone(&self, channel: &ChannelRef, users: &[String]) {
        for user in users {
            match self.inner.kind {
                Kind::Presence => {
                    self.publish(channel, "pusher_internal:member_removed", &removed_data(user), None).await;
                    self.webhook(channel, "member_removed", Some(user)).await;
                }
                Kind::Occupancy => self.webhook(channel, "channel_vacated", None).await,
            }
        }
    }

    /// Queues the webhook event `name` of `channel` (with the member's id as a string).
    async fn webhook(&self, channel: &ChannelRef, name: &str, user: Option<&str>) {
        if !self.inner.webhooks.wants(&channel.app_id, name) {
            return;
        }
        let mut event = serde_json::json!({ "name": name, "channel": &*channel.name });
        if let Some(user) = user {
            // Pusher sends user ids as strings.
            let id = match serde_json::from_str::<serde_json::Value>(user) {
                Ok(serde_json::Value::String(s)) => s,
                _ => user.to_owned(),
            };
            event["user_id"] = id.into();
        }
        self.inner.webhooks.emit(&channel.app_id, event).await;
    }

    /// Publishes a member event to every node's sockets in `channel` (but `except`).
    async fn publish(&self, channel: &ChannelRef, event: &str, data: &str, except: Option<&str>) {
        let Ok(data) = RawValue::from_string(data.to_owned()) else {
            warn!(channel = %channel.name, "member event with invalid JSON not sent");
            return;
        };
        let id = format!("{}-presence", self.inner.node);
        let mut envelope = Envelope::new(&id, Some(event), &data);
        envelope.socket = except.map(Into::into);
        if let Err(e) = self.inner.broker.publish(&channel.broker_channel, envelope.encode()).await {
            metrics::counter!(m::PRESENCE_ERRORS).increment(1);
            debug!(error = %e, channel = %channel.name, "member event not published");
        }
    }
}

/// A channel in a node's held set: app id, name and broker channel, newline-separated (none of
/// them can hold a newline).
fn held_entry(channel: &ChannelRef) -> String {
    format!("{}\n{}\n{}", channel.app_id, channel.name, channel.broker_channel)
}

fn parse_held_entry(entry: &str) -> Option<ChannelRef> {
    let mut parts = entry.splitn(3, '\n');
    Some(ChannelRef { app_id: parts.next()?.into(), name: parts.next()?.into(), broker_channel: parts.next()?.into() })
}

/// A user this node holds in a channel, with its info.
type Held = (Arc<str>, Arc<str>);

fn removed_data(user: &str) -> String {
    format!(r#"{{"user_id":{user}}}"#)
}

/// The parts of a function's array reply (missing parts are empty).
fn parts<const N: usize>(value: Value) -> [Value; N] {
    let mut items = match value {
        Value::Array(items) => items.into_iter(),
        _ => Vec::new().into_iter(),
    };
    std::array::from_fn(|_| items.next().unwrap_or(Value::Nil))
}

/// The strings of an array reply (or a set reply: RESP3 answers SMEMBERS with one).
fn strings(value: Value) -> Vec<String> {
    match value {
        Value::Array(items) | Value::Set(items) => {
            items.into_iter().filter_map(|v| redis::from_redis_value::<String>(v).ok()).collect()
        }
        _ => Vec::new(),
    }
}

fn pairs(value: Value) -> Vec<Member> {
    let flat = strings(value);
    flat.chunks_exact(2).map(|p| Member { user_id: p[0].clone(), user_info: p[1].clone() }).collect()
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        _ => 0,
    }
}
