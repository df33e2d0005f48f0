//! `Webhooks`: signed HTTP calls that tell the application what happened: a channel's first
//! subscriber or last (`channel_occupied`, `channel_vacated`), a presence member
//! (`member_added`, `member_removed`), a client event (`client_event`), notifications read
//! (`notifications_read`). `docs/webhooks.md` is the prose version.
//!
//! The node that decides an event (each is decided once in the cluster: see
//! [`crate::presence`]) queues it, once per endpoint that wants it, in a queue all nodes share
//! (`webhooks.lua` in Redis; in memory without Redis), bounded by `webhooks.max_queue`. Every
//! node's sender claims due entries under a lease (so no two nodes send the same one), sends
//! them in one call per endpoint every `webhooks.batch_window`, deletes them on a 2xx, and
//! otherwise puts them back after a doubling delay until `webhooks.retry_for` has passed since
//! the event, when they are dropped and counted. Calls are bounded in time
//! (`webhooks.timeout`), follow no redirects and never read a response body, so an endpoint
//! that hangs, fails, redirects or answers with gigabytes costs a timeout, never memory; the
//! sender is its own task, so sessions never wait for it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use redis::Value;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::inbox::ReadScope;
use crate::metrics as m;
use crate::redis_link::{LinkError, RedisLink};
use crate::settings::Settings;

/// The Redis Functions library (`#!lua name=pushnode_webhooks`).
pub const LIBRARY: &str = include_str!("webhooks.lua");
/// The queue's keys (one hash slot).
const QUEUE_KEY: &str = "pushnode:webhooks:{q}";
/// Entries claimed per round.
const CLAIM: usize = 500;
/// Retries are spaced 1 s, 2 s, 4 s, … at most this far apart.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One queued event for one endpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// [`Endpoint::id`].
    endpoint: String,
    /// When the event happened, ms since the Unix epoch.
    at: u64,
    /// Calls that failed so far.
    attempt: u32,
    event: Box<RawValue>,
}

#[derive(Debug)]
struct Endpoint {
    /// `<app>|<url>`: what a queued entry names.
    id: String,
    app: String,
    url: String,
    events: Vec<String>,
    channel_prefix: String,
    /// `X-Pusher-Key`, and the secret of `X-Pusher-Signature`.
    key: String,
    secret: String,
}

impl Endpoint {
    fn wants(&self, app: &str, name: &str, channel: Option<&str>) -> bool {
        self.app == app
            && (self.events.is_empty() || self.events.iter().any(|e| e == name))
            && channel.is_none_or(|c| c.starts_with(&self.channel_prefix))
    }
}

#[derive(Clone, Debug)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<Endpoint>,
    queue: Queue,
    batch_window: Duration,
    timeout: Duration,
    retry_for: Duration,
    max_queue: usize,
    http: reqwest::Client,
}

#[derive(Debug)]
enum Queue {
    Redis(RedisLink),
    Memory(Mutex<MemoryQueue>),
}

/// The queue without Redis: the same operations on this node alone.
#[derive(Debug, Default)]
struct MemoryQueue {
    seq: u64,
    /// (due ms, id)
    due: BTreeSet<(u64, u64)>,
    entries: HashMap<u64, (u64, String)>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `X-Pusher-Signature`: hex HMAC-SHA256 of the body with the secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

impl Webhooks {
    pub fn new(settings: &Settings, link: Option<RedisLink>) -> Self {
        let w = &settings.webhooks;
        let endpoints = w
            .endpoints
            .iter()
            .filter_map(|e| {
                let (key, secret) = if e.app == "native" {
                    (w.native_key.clone(), w.native_secret.clone())
                } else {
                    let app = settings.pusher.apps.iter().find(|a| a.id == e.app)?;
                    (app.key.clone(), app.secret.clone())
                };
                Some(Endpoint {
                    id: format!("{}|{}", e.app, e.url),
                    app: e.app.clone(),
                    url: e.url.clone(),
                    events: e.events.clone(),
                    channel_prefix: e.channel_prefix.clone(),
                    key,
                    secret,
                })
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(w.timeout)
            .connect_timeout(w.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(4)
            .build()
            .unwrap_or_default();
        let queue = match link {
            Some(link) => Queue::Redis(link),
            None => Queue::Memory(Mutex::new(MemoryQueue::default())),
        };
        Self {
            inner: Arc::new(Inner {
                endpoints,
                queue,
                batch_window: w.batch_window,
                timeout: w.timeout,
                retry_for: w.retry_for,
                max_queue: w.max_queue,
                http,
            }),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.inner.endpoints.is_empty()
    }

    /// Whether some endpoint of `app` wants `name` events.
    pub fn wants(&self, app: &str, name: &str) -> bool {
        self.inner.endpoints.iter().any(|e| e.app == app && (e.events.is_empty() || e.events.iter().any(|n| n == name)))
    }

    /// Queues `event` (`{"name": …, "channel"?: …, …}`) of app `app` (`native` for the native
    /// protocol) for every endpoint that wants it. Never waits for a call; an event the queue
    /// cannot take (full, or Redis unreachable) is counted as dropped.
    pub async fn emit(&self, app: &str, event: serde_json::Value) {
        let name = event["name"].as_str().unwrap_or_default();
        let channel = event["channel"].as_str();
        let at = now_ms();
        let Ok(event) = serde_json::value::to_raw_value(&event) else { return };
        let entries: Vec<String> = self
            .inner
            .endpoints
            .iter()
            .filter(|e| e.wants(app, name, channel))
            .filter_map(|e| {
                serde_json::to_string(&Entry { endpoint: e.id.clone(), at, attempt: 0, event: event.clone() }).ok()
            })
            .collect();
        if entries.is_empty() {
            return;
        }
        match self.push(&entries).await {
            Ok(0) => {}
            Ok(dropped) => {
                metrics::counter!(m::WEBHOOKS_DROPPED, "reason" => "queue_full").increment(dropped);
                warn!(dropped, "webhook queue full (webhooks.max_queue); events dropped");
            }
            Err(e) => {
                metrics::counter!(m::WEBHOOKS_DROPPED, "reason" => "unavailable").increment(entries.len() as u64);
                debug!(error = %e, "webhook events not queued");
            }
        }
    }

    /// Queues entries; returns how many were dropped for a full queue.
    async fn push(&self, entries: &[String]) -> Result<u64, LinkError> {
        match &self.inner.queue {
            Queue::Memory(queue) => {
                let mut q = queue.lock();
                let now = now_ms();
                let mut dropped = 0;
                for entry in entries {
                    if q.entries.len() >= self.inner.max_queue {
                        dropped += 1;
                        continue;
                    }
                    q.seq += 1;
                    let id = q.seq;
                    q.due.insert((now, id));
                    q.entries.insert(id, (now, entry.clone()));
                }
                Ok(dropped)
            }
            Queue::Redis(link) => {
                let max = self.inner.max_queue.to_string();
                let mut args: Vec<&str> = vec![&max];
                args.extend(entries.iter().map(String::as_str));
                let value = link.fcall(LIBRARY, "pushnode_webhook_push", QUEUE_KEY, &args).await?;
                Ok(match value {
                    Value::Array(parts) => match parts.get(1) {
                        Some(Value::Int(n)) => *n as u64,
                        _ => 0,
                    },
                    _ => 0,
                })
            }
        }
    }

    /// Due entries, leased to this node for `lease`.
    async fn claim(&self, lease: Duration) -> Result<Vec<(String, String)>, LinkError> {
        match &self.inner.queue {
            Queue::Memory(queue) => {
                let mut q = queue.lock();
                let now = now_ms();
                let due: Vec<(u64, u64)> = q.due.iter().take_while(|(at, _)| *at <= now).take(CLAIM).copied().collect();
                let mut out = Vec::with_capacity(due.len());
                for (at, id) in due {
                    q.due.remove(&(at, id));
                    let until = now + lease.as_millis() as u64;
                    q.due.insert((until, id));
                    if let Some(entry) = q.entries.get_mut(&id) {
                        entry.0 = until;
                        out.push((id.to_string(), entry.1.clone()));
                    }
                }
                Ok(out)
            }
            Queue::Redis(link) => {
                let (max, lease) = (CLAIM.to_string(), lease.as_millis().to_string());
                let value = link.fcall(LIBRARY, "pushnode_webhook_claim", QUEUE_KEY, &[&max, &lease]).await?;
                let Value::Array(flat) = value else { return Ok(Vec::new()) };
                let flat: Vec<String> = flat.into_iter().filter_map(|v| redis::from_redis_value(v).ok()).collect();
                Ok(flat.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect())
            }
        }
    }

    async fn done(&self, ids: &[String]) -> Result<(), LinkError> {
        if ids.is_empty() {
            return Ok(());
        }
        match &self.inner.queue {
            Queue::Memory(queue) => {
                let mut q = queue.lock();
                for id in ids.iter().filter_map(|id| id.parse::<u64>().ok()) {
                    if let Some((due, _)) = q.entries.remove(&id) {
                        q.due.remove(&(due, id));
                    }
                }
                Ok(())
            }
            Queue::Redis(link) => {
                let args: Vec<&str> = ids.iter().map(String::as_str).collect();
                link.fcall(LIBRARY, "pushnode_webhook_done", QUEUE_KEY, &args).await.map(|_| ())
            }
        }
    }

    /// Puts entries back: (id, delay, rewritten entry).
    async fn retry(&self, entries: &[(String, Duration, String)]) -> Result<(), LinkError> {
        if entries.is_empty() {
            return Ok(());
        }
        match &self.inner.queue {
            Queue::Memory(queue) => {
                let mut q = queue.lock();
                let now = now_ms();
                for (id, delay, entry) in entries {
                    let Ok(id) = id.parse::<u64>() else { continue };
                    if let Some((due, _)) = q.entries.remove(&id) {
                        q.due.remove(&(due, id));
                        let due = now + delay.as_millis() as u64;
                        q.due.insert((due, id));
                        q.entries.insert(id, (due, entry.clone()));
                    }
                }
                Ok(())
            }
            Queue::Redis(link) => {
                let delays: Vec<String> = entries.iter().map(|(_, d, _)| d.as_millis().to_string()).collect();
                let mut args: Vec<&str> = Vec::with_capacity(entries.len() * 3);
                for ((id, _, entry), delay) in entries.iter().zip(&delays) {
                    args.extend([id.as_str(), delay.as_str(), entry.as_str()]);
                }
                link.fcall(LIBRARY, "pushnode_webhook_retry", QUEUE_KEY, &args).await.map(|_| ())
            }
        }
    }

    async fn depth(&self) -> Result<u64, LinkError> {
        match &self.inner.queue {
            Queue::Memory(queue) => Ok(queue.lock().entries.len() as u64),
            Queue::Redis(link) => match link.query(redis::cmd("ZCARD").arg(format!("{QUEUE_KEY}:due"))).await? {
                Value::Int(n) => Ok(n.max(0) as u64),
                _ => Ok(0),
            },
        }
    }

    /// The sender, until `stop`: every `batch_window`, claims what is due, sends it, and
    /// settles each entry (sent, retried later, or dropped).
    pub async fn run(self, stop: CancellationToken) {
        if !self.is_enabled() {
            return;
        }
        let mut tick = tokio::time::interval(self.inner.batch_window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A claimed entry is ours until this long from the claim: past the call's timeout.
        let lease = self.inner.timeout * 2 + Duration::from_secs(5);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Ok(depth) = self.depth().await {
                metrics::gauge!(m::WEBHOOKS_QUEUE).set(depth as f64);
            }
            let claimed = match self.claim(lease).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    debug!(error = %e, "webhook queue unavailable");
                    continue;
                }
            };
            if claimed.is_empty() {
                continue;
            }
            tokio::select! {
                () = self.send_all(claimed) => {}
                // Whatever was claimed and not settled goes back to the queue when its lease
                // ends; another node (or this one after a restart) sends it.
                () = stop.cancelled() => return,
            }
        }
    }

    /// Sends claimed entries, one call per endpoint (concurrently), and settles them.
    async fn send_all(&self, claimed: Vec<(String, String)>) {
        let mut groups: HashMap<&str, Vec<(String, Entry)>> = HashMap::new();
        let mut unknown = Vec::new();
        let by_id: HashMap<&str, &Endpoint> = self.inner.endpoints.iter().map(|e| (e.id.as_str(), e)).collect();
        let mut parsed = Vec::with_capacity(claimed.len());
        for (id, text) in claimed {
            match serde_json::from_str::<Entry>(&text) {
                Ok(entry) => parsed.push((id, entry)),
                Err(_) => unknown.push(id),
            }
        }
        for (id, entry) in parsed {
            match by_id.get(entry.endpoint.as_str()) {
                Some(endpoint) => groups.entry(endpoint.id.as_str()).or_default().push((id, entry)),
                // An endpoint no longer configured: its events cannot go anywhere.
                None => unknown.push(id),
            }
        }
        if !unknown.is_empty() {
            metrics::counter!(m::WEBHOOKS_DROPPED, "reason" => "unknown_endpoint").increment(unknown.len() as u64);
            let _ = self.done(&unknown).await;
        }
        let calls = groups.into_iter().filter_map(|(id, entries)| by_id.get(id).map(|e| self.send(e, entries)));
        futures_util::future::join_all(calls).await;
    }

    async fn send(&self, endpoint: &Endpoint, entries: Vec<(String, Entry)>) {
        let events: Vec<&RawValue> = entries.iter().map(|(_, e)| &*e.event).collect();
        let body = serde_json::json!({ "time_ms": now_ms(), "events": events }).to_string();
        let call = self
            .inner
            .http
            .post(&endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Pusher-Key", &endpoint.key)
            .header("X-Pusher-Signature", signature(&endpoint.secret, body.as_bytes()))
            .body(body)
            .send()
            .await;
        // The response body is never read: its size is the endpoint's business.
        let failure = match call {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(if response.status().is_redirection() { "redirect" } else { "status" }),
            Err(e) if e.is_timeout() => Some("timeout"),
            Err(_) => Some("connect"),
        };
        let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let Some(reason) = failure else {
            let now = now_ms();
            for (_, entry) in &entries {
                metrics::histogram!(m::WEBHOOKS_LATENCY).record(now.saturating_sub(entry.at) as f64 / 1e3);
            }
            metrics::counter!(m::WEBHOOKS_SENT).increment(entries.len() as u64);
            if let Err(e) = self.done(&ids).await {
                // Sent but not deleted: it is sent again when the lease ends.
                debug!(error = %e, "sent webhooks not removed from the queue");
            }
            return;
        };
        metrics::counter!(m::WEBHOOKS_FAILED, "reason" => reason).increment(1);
        debug!(url = %endpoint.url, reason, events = entries.len(), "webhook call failed");
        let now = now_ms();
        let mut back = Vec::new();
        let mut expired = Vec::new();
        for (id, mut entry) in entries {
            entry.attempt += 1;
            let delay = backoff(entry.attempt);
            if now + delay.as_millis() as u64 > entry.at + self.inner.retry_for.as_millis() as u64 {
                expired.push(id);
            } else if let Ok(text) = serde_json::to_string(&entry) {
                back.push((id, delay, text));
            }
        }
        if !expired.is_empty() {
            metrics::counter!(m::WEBHOOKS_DROPPED, "reason" => "expired").increment(expired.len() as u64);
            warn!(url = %endpoint.url, dropped = expired.len(), "webhooks dropped after webhooks.retry_for");
            let _ = self.done(&expired).await;
        }
        metrics::counter!(m::WEBHOOKS_RETRIED).increment(back.len() as u64);
        if let Err(e) = self.retry(&back).await {
            debug!(error = %e, "failed webhooks not put back; their lease returns them");
        }
    }
}

/// The `notifications_read` event: who read what, and the unread count after it.
pub fn read_event(user: &str, scope: &ReadScope, unread: u64) -> serde_json::Value {
    let mut event = serde_json::json!({ "name": "notifications_read", "user_id": user, "unread": unread });
    match scope {
        ReadScope::Ids(ids) => event["ids"] = ids.iter().map(ToString::to_string).collect::<Vec<_>>().into(),
        ReadScope::UpTo(id) => event["up_to"] = id.to_string().into(),
        ReadScope::All => event["all"] = true.into(),
    }
    event
}

/// The delay before attempt `attempt + 1`: 1 s, 2 s, 4 s, … at most [`MAX_BACKOFF`].
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let delays: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn signatures_are_pushers() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), a published vector.
        assert_eq!(
            signature("key", b"The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }
}
