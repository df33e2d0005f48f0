//! `Inbox`: the durable per-user notifications, the feature that keeps what a user has not
//! seen until it is seen.
//!
//! A persisted notification gets an id ordered per user (`<ms>-<seq>`), is appended to the
//! user's inbox, raises the unread count and is published live, in one atomic step: a Redis
//! Function (`pushnode.lua`) with the Redis broker, one lock with the memory broker. Readers
//! never see a count that disagrees with the inbox. Marking read publishes the new count to
//! every session of the user on every node.
//!
//! Bounds: at most `inbox.max_per_user` notifications per user (the oldest go first) and
//! `inbox.ttl` (older ones are trimmed; an inbox untouched for that long disappears).
//!
//! Guarantee: persisted notifications reach each device at least once: sessions replay from the
//! inbox on connect, on resume (`last_id`) and after a broker gap; ids let clients de-duplicate.

mod memory;
mod redis;

use std::time::Duration;

use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::channel::ChannelNames;
use crate::hub::Hub;
use crate::metrics as m;
use crate::protocol::NoteId;
use crate::redis_link::{LinkError, RedisLink};
use crate::settings;

pub use self::memory::MemoryInbox;
pub use self::redis::{LIBRARY, RedisInbox};

/// Result of appending one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub id: NoteId,
    pub unread: u64,
    /// The idempotency key was seen before: nothing new was stored or published; `id` is the
    /// first publish's.
    pub duplicate: bool,
}

/// One retained notification.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: NoteId,
    /// Publish time, microseconds since the Unix epoch.
    pub ts_us: u64,
    pub event: Option<String>,
    pub data: Box<RawValue>,
    pub read: bool,
}

/// What a session's welcome tells about the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InboxState {
    pub unread: u64,
    pub newest: Option<NoteId>,
}

/// Which notifications to mark read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadScope {
    Ids(Vec<NoteId>),
    /// Everything up to and including this id.
    UpTo(NoteId),
    All,
}

/// Why a read request does not name a [`ReadScope`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// `field` (`ids[i]` or `up_to`) is not a notification id.
    #[error("{field} must be <ms>-<seq>")]
    BadId { field: String },
    #[error("give exactly one of ids (non-empty), up_to, all")]
    NotOne,
}

impl ReadScope {
    /// The scope a read request names, from its three optional parts (the API's body and the
    /// session's `read` frame both carry them): exactly one of a non-empty `ids`, `up_to`, or
    /// `all`.
    pub fn parse(ids: Option<&[String]>, up_to: Option<&str>, all: bool) -> Result<Self, ScopeError> {
        match (ids, up_to, all) {
            (Some(ids), None, false) if !ids.is_empty() => ids
                .iter()
                .enumerate()
                .map(|(i, id)| id.parse().map_err(|()| ScopeError::BadId { field: format!("ids[{i}]") }))
                .collect::<Result<_, _>>()
                .map(Self::Ids),
            (None, Some(up_to), false) => {
                up_to.parse().map(Self::UpTo).map_err(|()| ScopeError::BadId { field: "up_to".into() })
            }
            (None, None, true) => Ok(Self::All),
            _ => Err(ScopeError::NotOne),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox unavailable: {0}")]
    Unavailable(String),
    /// Redis answered this call with an error (a permission, say); others may still work.
    #[error("inbox refused the call: {0}")]
    Refused(String),
    #[error("inbox returned something unexpected: {0}")]
    Corrupt(String),
}

impl From<LinkError> for InboxError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Command(e) => Self::Refused(e),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl InboxError {
    /// Whether the store itself is out of reach (not just refusing this one call).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Limits shared by both stores.
#[derive(Debug, Clone)]
struct Limits {
    max_per_user: usize,
    ttl: Duration,
    idempotency_ttl: Duration,
}

#[derive(Debug, Clone)]
pub enum Inbox {
    Memory(MemoryInbox),
    Redis(RedisInbox),
}

impl Inbox {
    /// The inbox follows the broker: in Redis over `link` when there is one (the Redis
    /// brokers), in memory otherwise, publishing straight into the local `hub`.
    pub fn new(settings: &settings::Inbox, link: Option<RedisLink>, hub: Hub, names: ChannelNames) -> Self {
        let limits = Limits {
            max_per_user: settings.max_per_user,
            ttl: settings.ttl,
            idempotency_ttl: settings.idempotency_ttl,
        };
        match link {
            None => Self::Memory(MemoryInbox::new(hub, names, limits)),
            Some(link) => Self::Redis(RedisInbox::new(link, names, &settings.key_prefix, limits)),
        }
    }

    /// Background upkeep until `stop`: memory sweeps expired inboxes; Redis (re)loads its
    /// function library whenever the link's epoch advances.
    pub async fn run(self, stop: CancellationToken) {
        match self {
            Self::Memory(m) => m.run(stop).await,
            Self::Redis(r) => r.run(stop).await,
        }
    }

    /// Persists a notification for `user` and publishes it live, atomically.
    pub async fn append(
        &self,
        user: &str,
        event: Option<&str>,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, InboxError> {
        let result = match self {
            Self::Memory(m) => Ok(m.append(user, event, data, idempotency_key)),
            Self::Redis(r) => r.append(user, event, data, idempotency_key).await,
        };
        match &result {
            Ok(a) if a.duplicate => metrics::counter!(m::INBOX_DUPLICATES).increment(1),
            Ok(_) => metrics::counter!(m::INBOX_APPENDED).increment(1),
            Err(_) => metrics::counter!(m::INBOX_ERRORS, "operation" => "append").increment(1),
        }
        result
    }

    pub async fn state(&self, user: &str) -> Result<InboxState, InboxError> {
        let result = match self {
            Self::Memory(m) => Ok(m.state(user)),
            Self::Redis(r) => r.state(user).await,
        };
        if result.is_err() {
            metrics::counter!(m::INBOX_ERRORS, "operation" => "state").increment(1);
        }
        result
    }

    /// Up to `limit` notifications after `after` (from the oldest if `None`), in id order.
    pub async fn list(
        &self,
        user: &str,
        after: Option<NoteId>,
        limit: usize,
        unread_only: bool,
    ) -> Result<Vec<Stored>, InboxError> {
        let result = match self {
            Self::Memory(m) => Ok(m.list(user, after, limit, unread_only)),
            Self::Redis(r) => r.list(user, after, limit, unread_only).await,
        };
        if result.is_err() {
            metrics::counter!(m::INBOX_ERRORS, "operation" => "list").increment(1);
        }
        result
    }

    /// Marks notifications read and publishes the new unread count to the user's sessions.
    pub async fn mark_read(&self, user: &str, scope: &ReadScope) -> Result<u64, InboxError> {
        let result = match self {
            Self::Memory(m) => Ok(m.mark_read(user, scope)),
            Self::Redis(r) => r.mark_read(user, scope).await,
        };
        match &result {
            Ok(_) => metrics::counter!(m::INBOX_READS).increment(1),
            Err(_) => metrics::counter!(m::INBOX_ERRORS, "operation" => "read").increment(1),
        }
        result
    }
}
