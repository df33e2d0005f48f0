//! The Redis inbox: calls the `pushnode` Redis Functions library (`pushnode.lua`) through the
//! node's shared command connection ([`RedisLink`]). Each call is one atomic function on the user's keys, all in
//! one slot in a cluster (`<key_prefix>{<user>}`), together with the user's channel.
//!
//! The library is loaded whenever the link's epoch advances (the broker subscribed after a
//! (re)connect; a restarted Redis without persistence forgets functions), and on demand if a
//! call finds it missing.

use redis::Value;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Appended, InboxError, InboxState, Limits, ReadScope, Stored};
use crate::channel::ChannelNames;
use crate::metrics as m;
use crate::protocol::{NoteId, json};
use crate::redis_link::RedisLink;

/// The Redis Functions library (`#!lua name=pushnode`).
pub const LIBRARY: &str = include_str!("pushnode.lua");

#[derive(Debug, Clone)]
pub struct RedisInbox {
    link: RedisLink,
    names: ChannelNames,
    key_prefix: String,
    limits: Limits,
}

impl RedisInbox {
    pub(super) fn new(link: RedisLink, names: ChannelNames, key_prefix: &str, limits: Limits) -> Self {
        Self { link, names, key_prefix: key_prefix.to_owned(), limits }
    }

    /// Loads the library every time the link's epoch advances (the first time included),
    /// until `stop`.
    pub(super) async fn run(self, stop: CancellationToken) {
        self.link.keep_library_loaded("pushnode", LIBRARY, stop).await;
    }

    fn key(&self, user: &str) -> String {
        format!("{}{{{user}}}", self.key_prefix)
    }

    /// `FCALL function 1 key args...` on the user's inbox.
    async fn call(&self, function: &str, user: &str, args: &[&str]) -> Result<Value, InboxError> {
        Ok(self.link.fcall(LIBRARY, function, &self.key(user), args).await?)
    }

    pub(super) async fn append(
        &self,
        user: &str,
        event: Option<&str>,
        data: &RawValue,
        key: Option<&str>,
    ) -> Result<Appended, InboxError> {
        let channel = self.names.user(user);
        let max = self.limits.max_per_user.to_string();
        let ttl = self.limits.ttl.as_millis().to_string();
        let idem_ttl = self.limits.idempotency_ttl.as_millis().max(1).to_string();
        let args = [
            &*channel,
            self.link.publish_command(),
            data.get(),
            event.unwrap_or(""),
            key.unwrap_or(""),
            &max,
            &ttl,
            &idem_ttl,
        ];
        let value = self.call("pushnode_notify", user, &args).await?;
        match items(value)?.as_slice() {
            [id, unread, duplicate] => {
                Ok(Appended { id: note_id(id)?, unread: int(unread)?, duplicate: int(duplicate)? == 1 })
            }
            other => Err(corrupt("pushnode_notify", other)),
        }
    }

    pub(super) async fn state(&self, user: &str) -> Result<InboxState, InboxError> {
        let value = self.call("pushnode_state", user, &[]).await?;
        match items(value)?.as_slice() {
            [unread, newest] => {
                let newest = match text(newest)? {
                    t if t.is_empty() => None,
                    t => Some(t.parse().map_err(|()| InboxError::Corrupt(format!("bad id {t:?}")))?),
                };
                Ok(InboxState { unread: int(unread)?, newest })
            }
            other => Err(corrupt("pushnode_state", other)),
        }
    }

    pub(super) async fn list(
        &self,
        user: &str,
        after: Option<NoteId>,
        limit: usize,
        unread_only: bool,
    ) -> Result<Vec<Stored>, InboxError> {
        let after = after.map(|a| a.to_string()).unwrap_or_default();
        let limit = limit.to_string();
        let value = self.call("pushnode_list", user, &[&after, &limit, if unread_only { "1" } else { "0" }]).await?;
        items(value)?
            .into_iter()
            .map(|entry| match items(entry)?.as_slice() {
                [id, ts, event, data, unread] => {
                    let event = text(event)?;
                    let data = stored_data(text(data)?);
                    Ok(Stored {
                        id: note_id(id)?,
                        ts_us: text(ts)?.parse().map_err(|_| InboxError::Corrupt("bad ts".into()))?,
                        event: (!event.is_empty()).then_some(event),
                        data,
                        read: int(unread)? == 0,
                    })
                }
                other => Err(corrupt("pushnode_list", other)),
            })
            .collect()
    }

    pub(super) async fn mark_read(&self, user: &str, scope: &ReadScope) -> Result<u64, InboxError> {
        let channel = self.names.user(user);
        let ids: Vec<String>;
        let mut args = vec![&*channel, self.link.publish_command()];
        match scope {
            ReadScope::All => args.push("all"),
            ReadScope::UpTo(id) => {
                ids = vec![id.to_string()];
                args.push("upto");
                args.push(&ids[0]);
            }
            ReadScope::Ids(list) => {
                ids = list.iter().map(ToString::to_string).collect();
                args.push("ids");
                args.extend(ids.iter().map(String::as_str));
            }
        }
        int(&self.call("pushnode_read", user, &args).await?)
    }
}

/// Stored `data` as clients may get it. `FCALL pushnode_notify` from an application stores
/// whatever it is given; what fails [`json::check`] is replaced by `null` (and counted) rather
/// than failing the whole read, which a session would retry for ever.
fn stored_data(text: String) -> Box<RawValue> {
    match json::check(&text).ok().and_then(|()| RawValue::from_string(text).ok()) {
        Some(data) => data,
        None => {
            metrics::counter!(m::INBOX_ERRORS, "operation" => "invalid_data").increment(1);
            debug!("stored notification data is not acceptable JSON; replaced by null");
            RawValue::from_string("null".to_owned()).unwrap_or_default()
        }
    }
}

fn corrupt(function: &str, got: &[Value]) -> InboxError {
    InboxError::Corrupt(format!("{function} returned {got:?}"))
}

fn items(value: Value) -> Result<Vec<Value>, InboxError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(InboxError::Corrupt(format!("expected an array, got {other:?}"))),
    }
}

fn text(value: &Value) -> Result<String, InboxError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes.clone()).map_err(|_| InboxError::Corrupt("not UTF-8".into()))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        Value::VerbatimString { text, .. } => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(InboxError::Corrupt(format!("expected a string, got {other:?}"))),
    }
}

fn int(value: &Value) -> Result<u64, InboxError> {
    match value {
        Value::Int(n) => u64::try_from(*n).map_err(|_| InboxError::Corrupt(format!("negative count {n}"))),
        other => text(other)?.parse().map_err(|_| InboxError::Corrupt(format!("expected an integer, got {other:?}"))),
    }
}

fn note_id(value: &Value) -> Result<NoteId, InboxError> {
    let t = text(value)?;
    t.parse().map_err(|()| InboxError::Corrupt(format!("bad id {t:?}")))
}
