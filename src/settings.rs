//! `Settings`: the one configuration tree of a node.
//!
//! Layers, later wins: built-in defaults < a TOML file (`--config FILE` or `PUSHNODE_CONFIG`) <
//! environment variables `PUSHNODE__SECTION__KEY` (for example `PUSHNODE__SERVER__PUBLIC_ADDR`;
//! lists such as `PUSHNODE__AUTH__API_KEYS` are comma-separated). Nothing else in the crate reads
//! the environment. The doc comments below are the configuration reference, mirrored with the
//! defaults in `config/default.toml` (a test keeps the two equal).
//!
//! Unknown keys and bad values stop the start with a message naming the key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::channel::ChannelNames;
use crate::protocol::Format;

/// Environment variable naming the configuration file when `--config` is not given.
pub const CONFIG_ENV: &str = "PUSHNODE_CONFIG";
const ENV_PREFIX: &str = "PUSHNODE";
const ENV_SEPARATOR: &str = "__";
/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &["auth.api_keys", "auth.allowed_origins", "broker.cluster_nodes"];
const REDACTED: &str = "<redacted>";
/// Shortest JWT secret accepted: HS256 wants at least 256 bits of key.
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: Server,
    pub auth: Auth,
    pub session: Session,
    pub limits: Limits,
    pub broker: Broker,
    pub inbox: Inbox,
    pub pusher: Pusher,
    pub webhooks: Webhooks,
    pub demo: Demo,
    pub log: Log,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Server {
    /// Address of the public listener: WebSocket (`/ws`, `/`), demo page, `/pushnode.js`.
    pub public_addr: SocketAddr,
    /// Address of the internal listener: `/api/*`, `/healthz`, `/readyz`, `/metrics`. Keep it
    /// off the public network.
    pub internal_addr: SocketAddr,
    /// Name of this node in logs and welcome frames; empty picks a random one at start.
    pub node_id: String,
    /// Listen backlog of the public socket (the kernel caps it at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// On SIGTERM, sessions are closed evenly spread over this period, so clients do not all
    /// reconnect at the same instant.
    #[serde(with = "humantime_serde")]
    pub drain_period: Duration,
    /// Extra time after the drain for sessions to finish closing before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Upper bound of the random reconnect delay suggested to drained clients.
    #[serde(with = "humantime_serde")]
    pub reconnect_jitter: Duration,
    /// A new connection (on either listener) that has not sent a whole request head within this
    /// is closed: silent and slowly-sent requests cannot hold a file descriptor for long.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A kept-alive HTTP connection with no request under way is closed after this; the next
    /// request's head must also arrive within it.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            public_addr: SocketAddr::from(([127, 0, 0, 1], 9501)),
            internal_addr: SocketAddr::from(([127, 0, 0, 1], 9502)),
            node_id: String::new(),
            listen_backlog: 4096,
            drain_period: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            reconnect_jitter: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// HS256 secret for connection tokens (at least 32 bytes). Empty is allowed only with
    /// `demo.enabled` or `insecure_uid` (tokens then verify on no node). Demo tokens are signed
    /// with a separate random per-process secret, never with this one.
    pub jwt_secret: String,
    /// Keys accepted by the internal API as `Authorization: Bearer <key>`. Empty (demo only)
    /// leaves the API open, and is refused unless both listeners are on loopback addresses.
    pub api_keys: Vec<String>,
    /// Accept `?uid=ID` without a token (local demos, migration from the classic demo). Refused
    /// unless both listeners are on loopback addresses.
    pub insecure_uid: bool,
    /// Browser origins allowed to connect (exact `scheme://host[:port]`); empty allows any.
    /// Requests without an `Origin` header (non-browser clients) are not affected.
    pub allowed_origins: Vec<String>,
    /// Clock skew tolerated when checking a token's `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// When set, tokens must carry this `iss`; empty does not check `iss`.
    pub issuer: String,
    /// When set, tokens must carry this `aud` (or a list holding it); empty ignores `aud`.
    pub audience: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets never reach a log line or a panic message.
        f.debug_struct("Auth")
            .field("jwt_secret", &redact_secret(&self.jwt_secret))
            .field("api_keys", &format_args!("<{} redacted>", self.api_keys.len()))
            .field("insecure_uid", &self.insecure_uid)
            .field("allowed_origins", &self.allowed_origins)
            .field("clock_skew", &self.clock_skew)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            api_keys: Vec::new(),
            insecure_uid: false,
            allowed_origins: Vec::new(),
            clock_skew: Duration::from_secs(10),
            issuer: String::new(),
            audience: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Session {
    /// How often the node pings each session.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A session from which nothing (not even a pong) arrived for this long, although it was
    /// pinged, is closed (4002) at its next heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// Frames a session may have queued before it counts as a slow consumer and is closed
    /// (4001). Bounds memory per connection at about this many frames.
    pub outbox_capacity: usize,
    /// A socket write that takes longer than this closes the session.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Format for sessions that do not ask (`?format=json|raw`).
    pub default_format: Format,
    /// Bytes of the per-connection WebSocket read buffer. Client frames are small; a small
    /// buffer keeps idle connections cheap (tungstenite's default is 128 KiB).
    pub read_buffer_bytes: usize,
    /// Bytes of outgoing frames gathered before a socket write within one batch. The buffer
    /// lives only as long as the batch: an idle session keeps none.
    pub write_buffer_bytes: usize,
}

impl Default for Session {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(25),
            heartbeat_timeout: Duration::from_secs(60),
            outbox_capacity: 256,
            write_timeout: Duration::from_secs(10),
            default_format: Format::Json,
            read_buffer_bytes: 256,
            write_buffer_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sessions per node; upgrades above it get HTTP 503. Lowered at start if the process's
    /// file-descriptor limit cannot hold it (after 64 reserved descriptors, the internal pool,
    /// and 256 kept for accepting new connections).
    pub max_connections: usize,
    /// Connections on the public listener that are not (yet) WebSocket sessions; with the
    /// sessions, never more than the descriptors left for the public listener. When all are
    /// taken, the one idle longest (for 2 s or more) is closed to make room, so a flood of
    /// silent sockets cannot lock clients out.
    pub max_pending_connections: usize,
    /// Connections on the internal listener (API, probes, scrapes), with the same rule. Raise
    /// it if the application keeps more connections open to the API than this.
    pub max_internal_connections: usize,
    /// Sessions per user on one node; upgrades above it get HTTP 429.
    pub max_connections_per_user: usize,
    /// Largest client frame in bytes; a larger one closes the session (1009).
    pub max_frame_bytes: usize,
    /// Client WebSocket frames per second of every kind (data, ping, pong, continuation),
    /// sustained, with a burst of the same size; more closes the session (4003).
    pub client_frames_per_second: u32,
    /// Topic channels one session may join.
    pub max_topics_per_session: usize,
    /// Largest `POST /api/publish` body in bytes; larger gets HTTP 413.
    pub max_publish_bytes: usize,
    /// Users one `POST /api/publish` may name.
    pub max_publish_users: usize,
    /// Resident memory (bytes) above which new connections get 503 and readiness fails, so the
    /// load balancer and autoscaler send users elsewhere; 0 turns it off.
    pub max_memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_pending_connections: 4096,
            max_internal_connections: 128,
            max_connections_per_user: 32,
            max_frame_bytes: 4096,
            client_frames_per_second: 20,
            max_topics_per_session: 64,
            max_publish_bytes: 64 * 1024,
            max_publish_users: 1000,
            max_memory_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// In-process: one node alone, no Redis.
    Memory,
    /// One Redis server (`broker.redis_url`): SUBSCRIBE / PUBLISH.
    Redis,
    /// A Redis Cluster (`broker.cluster_nodes`): sharded pub/sub, SSUBSCRIBE / SPUBLISH.
    RedisCluster,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Broker {
    /// `memory` (one node, no Redis), `redis` or `redis-cluster`.
    pub kind: BrokerKind,
    /// Broker channel of a user's notifications; `{user}` stands for the user id. The classic
    /// demo's `push:message:{user}` works. In `redis-cluster` mode the id is wrapped in a hash
    /// tag: `push:message:{42}`.
    pub user_channel: String,
    /// Broker channel of a topic; `{topic}` stands for the topic name.
    pub topic_channel: String,
    /// Redis URL for `kind = "redis"`: `redis://[[user]:password@]host:port[/db]`, or
    /// `redis+unix:///path/to/socket?db=0&pass=...`.
    pub redis_url: String,
    /// Seed nodes for `kind = "redis-cluster"`, e.g. `["redis://10.0.0.1:6379"]`.
    pub cluster_nodes: Vec<String>,
    /// PEM file of the CA(s) that sign the Redis servers' certificates, for `rediss://` URLs
    /// with a private CA. Unset: the system's root certificates.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// A channel whose last local session left stays subscribed this long, so reconnect churn
    /// does not turn into SUBSCRIBE/UNSUBSCRIBE traffic.
    #[serde(with = "humantime_serde")]
    pub unsubscribe_delay: Duration,
    /// Channels per SUBSCRIBE / UNSUBSCRIBE command.
    pub subscribe_batch: usize,
    /// Subscriber connections to Redis (per shard in cluster mode): the node's channels are
    /// spread over them by a hash of their name, so that parsing and fan-out use several
    /// cores. `0`: one per worker thread of the runtime (`TOKIO_WORKER_THREADS`, by default
    /// the CPUs), at most [`MAX_SUBSCRIBER_CONNECTIONS`].
    pub subscriber_connections: usize,
    /// How often the node publishes a probe to itself through Redis.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A subscriber that has not seen its own probe for this long is reconnected, and the node
    /// reports not ready meanwhile.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Connecting to Redis gives up after this.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// A Redis command (publish, subscribe) gives up after this.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Reconnect delays grow from this ...
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// ... to at most this, with full jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long a new session waits for its channel's subscription before its welcome frame.
    #[serde(with = "humantime_serde")]
    pub subscribe_wait: Duration,
    /// A node whose broker worked before stays ready (`/readyz` 200, reported as degraded)
    /// for this long after it stopped working, so a Redis blip does not take every node of a
    /// fleet out of its Service at once. `0s`: unready at once. A node that never reached
    /// Redis is not ready.
    #[serde(with = "humantime_serde")]
    pub unready_after: Duration,
}

impl Default for Broker {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Memory,
            user_channel: "pushnode:user:{user}".into(),
            topic_channel: "pushnode:topic:{topic}".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            tls_ca_file: None,
            unsubscribe_delay: Duration::from_secs(2),
            subscribe_batch: 500,
            subscriber_connections: 0,
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            subscribe_wait: Duration::from_secs(2),
            unready_after: Duration::from_secs(30),
        }
    }
}

/// The most subscriber connections a node opens (and the cap of the automatic choice).
pub const MAX_SUBSCRIBER_CONNECTIONS: usize = 64;

impl Broker {
    /// How many subscriber connections to open on a runtime with `workers` worker threads.
    pub fn subscriber_connections_for(&self, workers: usize) -> usize {
        match self.subscriber_connections {
            0 => workers.clamp(1, MAX_SUBSCRIBER_CONNECTIONS),
            n => n,
        }
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Redis URLs carry passwords.
        let nodes: Vec<String> = self.cluster_nodes.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("Broker")
            .field("kind", &self.kind)
            .field("user_channel", &self.user_channel)
            .field("topic_channel", &self.topic_channel)
            .field("redis_url", &redact_url(&self.redis_url))
            .field("cluster_nodes", &nodes)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("unsubscribe_delay", &self.unsubscribe_delay)
            .field("subscribe_batch", &self.subscribe_batch)
            .field("subscriber_connections", &self.subscriber_connections)
            .field("probe_interval", &self.probe_interval)
            .field("probe_timeout", &self.probe_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("subscribe_wait", &self.subscribe_wait)
            .field("unready_after", &self.unready_after)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Inbox {
    /// Notifications kept per user; the oldest go first.
    pub max_per_user: usize,
    /// Notifications older than this are trimmed, and an inbox untouched this long disappears.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// A retried publish with the same idempotency key within this window notifies once.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Prefix of the inbox keys in Redis: `<prefix>{<user>}` (the braces are a hash tag).
    pub key_prefix: String,
    /// Most notifications replayed to a session at once (on connect, resume or after a gap).
    pub replay_limit: usize,
}

impl Default for Inbox {
    fn default() -> Self {
        Self {
            max_per_user: 200,
            ttl: Duration::from_secs(30 * 24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            key_prefix: "pushnode:inbox:".into(),
            replay_limit: 500,
        }
    }
}

/// The Pusher protocol front end (pusher-js, Laravel Echo, Pusher server SDKs). Off while
/// `apps` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Pusher {
    /// The applications: clients connect to `/app/<key>`, servers call `/apps/<id>/...` signed
    /// with the secret. In a file, `[[pusher.apps]]` tables; from the environment,
    /// `PUSHNODE__PUSHER__APPS__<n>__<FIELD>` (n from 0), which also overrides one field of
    /// the file's n-th app (the secret, say).
    pub apps: Vec<PusherApp>,
    /// Sent to clients as `activity_timeout`: after this long without a frame from the node,
    /// pusher-js sends `pusher:ping` (whole seconds, at least 1).
    #[serde(with = "humantime_serde")]
    pub activity_timeout: Duration,
    /// Where the HTTP API (`/apps/<id>/events`, ...) is served: `public` (beside `/app/<key>`,
    /// the one host Laravel's `PUSHER_HOST` names), `internal`, or `both`.
    pub api_listener: ApiListener,
    /// A node that stops without saying goodbye (killed) keeps its presence members for at
    /// most this long plus a third of it; live nodes refresh every third of it.
    #[serde(with = "humantime_serde")]
    pub presence_ttl: Duration,
    /// Most distinct users in one presence channel (Pusher's limit is 100); one more is refused.
    pub max_presence_members: usize,
    /// Keep Laravel's broadcast notifications (`notification_event` on a `notification_channel`)
    /// in the user's pushnode inbox too, and replay the unread ones to a socket that
    /// subscribes the user's channel, so Echo's `.notification()` gets what arrived while the
    /// user was away.
    pub persist_notifications: bool,
    /// The private channel of a user's notifications; `{user}` is the user id (an inbox user id:
    /// 1 to 128 of A-Z a-z 0-9 _ - . : @ =). Laravel: `App.Models.User.{id}`, made private.
    pub notification_channel: String,
    /// The event name Laravel broadcasts notifications as.
    pub notification_event: String,
}

impl Default for Pusher {
    fn default() -> Self {
        Self {
            apps: Vec::new(),
            activity_timeout: Duration::from_secs(30),
            api_listener: ApiListener::Public,
            presence_ttl: Duration::from_secs(15),
            max_presence_members: 100,
            persist_notifications: false,
            notification_channel: "private-App.Models.User.{user}".into(),
            notification_event: r"Illuminate\Notifications\Events\BroadcastNotificationCreated".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiListener {
    Public,
    Internal,
    Both,
}

impl ApiListener {
    pub fn public(self) -> bool {
        matches!(self, Self::Public | Self::Both)
    }

    pub fn internal(self) -> bool {
        matches!(self, Self::Internal | Self::Both)
    }
}

/// One Pusher application.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PusherApp {
    /// The app id in API paths (`PUSHER_APP_ID`).
    pub id: String,
    /// The public key clients connect with (`PUSHER_APP_KEY`).
    pub key: String,
    /// Signs channel authorisations and API requests (`PUSHER_APP_SECRET`). At least 8 bytes.
    pub secret: String,
    /// Accept `client-*` events (Echo's `whisper`) on private and presence channels.
    #[serde(default)]
    pub enable_client_messages: bool,
    /// Most connections of this app on one node; 0: only the node's limits apply.
    #[serde(default)]
    pub max_connections: usize,
}

impl std::fmt::Debug for PusherApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PusherApp")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &redact_secret(&self.secret))
            .field("enable_client_messages", &self.enable_client_messages)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Webhooks: signed HTTP calls to the application when something happens (docs/webhooks.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Webhooks {
    /// Where events go: `[[webhooks.endpoints]]` with `app` (a Pusher app id, or `native`),
    /// `url`, and optionally `events` (names; empty: all) and `channel_prefix`.
    pub endpoints: Vec<WebhookEndpoint>,
    /// Events are gathered this long before a call, so one call carries several.
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// A call that has not answered in this long has failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A failing event is retried (1 s, 2 s, 4 s … at most a minute apart) for this long after
    /// it happened, then dropped and counted.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
    /// Most events waiting (in Redis, or in memory without it); beyond, new ones are dropped
    /// and counted.
    pub max_queue: usize,
    /// Signs the webhooks of `native` endpoints (`X-Pusher-Signature`), at least 8 bytes.
    pub native_secret: String,
    /// Sent as `X-Pusher-Key` by `native` endpoints.
    pub native_key: String,
}

impl Default for Webhooks {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            batch_window: Duration::from_millis(250),
            timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(600),
            max_queue: 100_000,
            native_secret: String::new(),
            native_key: "pushnode".into(),
        }
    }
}

/// One webhook endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// A Pusher app id (its key and secret sign the calls), or `native`.
    pub app: String,
    pub url: String,
    /// Event names to send; empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Only events of channels starting with this (events without a channel always pass).
    #[serde(default)]
    pub channel_prefix: String,
}

/// Shortest Pusher app secret accepted.
pub const MIN_PUSHER_SECRET_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Demo {
    /// Serve the demo page's helper routes (`/demo/token`, `/demo/send`), which mint tokens for
    /// any user (signed with a per-process secret, valid on this node only): only for local
    /// trials. Refused unless both listeners are on loopback addresses.
    pub enabled: bool,
}

impl Default for Demo {
    fn default() -> Self {
        Self { enabled: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `tracing` filter, such as `info` or `pushnode=debug,info`.
    pub filter: String,
}

impl Default for Log {
    fn default() -> Self {
        Self { format: LogFormat::Text, filter: "info".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("configuration: {0}")]
    Load(config::ConfigError),
    #[error("configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        Self::Load(e)
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, reason: reason.into() }
}

impl Settings {
    /// Loads defaults, then `file` (or the file named by `PUSHNODE_CONFIG`), then the process
    /// environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// As [`Settings::load`], with an explicit environment (tests use this).
    pub fn load_from(file: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, SettingsError> {
        let file = file.map(Path::to_path_buf).or_else(|| env.get(CONFIG_ENV).map(Into::into));
        let mut builder = Config::builder();
        if let Some(path) = &file {
            let path = path.to_str().ok_or_else(|| invalid("--config", "path is not UTF-8"))?;
            builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
        }
        // Values stay strings: `config` converts them to the type each key wants, and a secret
        // or key that happens to be all digits (or has a leading zero) is never turned into a
        // number. List keys are split here, as `config` splits only parsed values.
        let mut plain = HashMap::new();
        for (name, value) in env.iter().filter(|(k, _)| k.starts_with("PUSHNODE__")) {
            let key = name["PUSHNODE__".len()..].to_lowercase().replace(ENV_SEPARATOR, ".");
            if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> =
                    value.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned).collect();
                builder = builder.set_override(key, items)?;
            } else if let Some(path) = indexed_path(&key) {
                // A field of a list of tables (`pusher.apps.0.secret` is `pusher.apps[0].secret`).
                builder = builder.set_override(path, value.clone())?;
            } else {
                plain.insert(name.clone(), value.clone());
            }
        }
        let environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .try_parsing(false)
            .source(Some(plain));
        builder = builder.add_source(environment);
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types alone cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), SettingsError> {
        // Anything that lets a caller act without credentials stays on this machine: a demo
        // token works on the public listener, an open API on the internal one.
        let loopback = self.server.public_addr.ip().is_loopback() && self.server.internal_addr.ip().is_loopback();
        if self.auth.insecure_uid && !loopback {
            return Err(invalid(
                "auth.insecure_uid",
                "lets anyone connect as any user; it is refused unless server.public_addr and server.internal_addr are loopback",
            ));
        }
        if self.demo.enabled && !loopback {
            return Err(invalid(
                "demo.enabled",
                "the demo routes mint tokens for any user; set demo.enabled = false unless server.public_addr and server.internal_addr are loopback",
            ));
        }
        // A Pusher-only node needs neither: without a secret no native token is valid (a random
        // per-process key checks them), and without keys the native API refuses every call.
        let pusher_only = !self.pusher.apps.is_empty();
        if self.auth.jwt_secret.is_empty() && !self.demo.enabled && !self.auth.insecure_uid && !pusher_only {
            return Err(invalid(
                "auth.jwt_secret",
                "required unless demo.enabled, auth.insecure_uid or Pusher apps (pusher.apps) are set",
            ));
        }
        if !self.auth.jwt_secret.is_empty() && self.auth.jwt_secret.len() < MIN_SECRET_LEN {
            return Err(invalid("auth.jwt_secret", format!("must be at least {MIN_SECRET_LEN} bytes")));
        }
        if self.auth.api_keys.is_empty() && !(self.demo.enabled && loopback) && !pusher_only {
            return Err(invalid(
                "auth.api_keys",
                "at least one key is required; the API runs without one only in demo mode with both listeners on loopback (with Pusher apps and no key, it refuses every call)",
            ));
        }
        if self.auth.api_keys.iter().any(|k| k.len() < 16) {
            return Err(invalid("auth.api_keys", "each key must be at least 16 bytes"));
        }
        if let Some(origin) = self.auth.allowed_origins.iter().find(|o| crate::auth::normalize_origin(o).is_none()) {
            return Err(invalid("auth.allowed_origins", format!("{origin:?} is not scheme://host[:port]")));
        }
        if self.session.heartbeat_interval.is_zero() {
            return Err(invalid("session.heartbeat_interval", "must be above zero"));
        }
        if self.session.heartbeat_timeout <= self.session.heartbeat_interval {
            return Err(invalid("session.heartbeat_timeout", "must be longer than session.heartbeat_interval"));
        }
        if self.session.outbox_capacity == 0 {
            return Err(invalid("session.outbox_capacity", "must be at least 1"));
        }
        if self.session.read_buffer_bytes < 64 {
            return Err(invalid("session.read_buffer_bytes", "must be at least 64"));
        }
        if self.limits.max_frame_bytes < 64 {
            return Err(invalid("limits.max_frame_bytes", "must be at least 64"));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.max_pending_connections == 0 {
            return Err(invalid("limits.max_pending_connections", "must be at least 1"));
        }
        if self.limits.max_internal_connections == 0 {
            return Err(invalid("limits.max_internal_connections", "must be at least 1"));
        }
        if self.server.header_timeout.is_zero() {
            return Err(invalid("server.header_timeout", "must be above zero"));
        }
        if self.server.keepalive_timeout.is_zero() {
            return Err(invalid("server.keepalive_timeout", "must be above zero"));
        }
        if self.limits.max_connections_per_user == 0 {
            return Err(invalid("limits.max_connections_per_user", "must be at least 1"));
        }
        if self.limits.client_frames_per_second == 0 {
            return Err(invalid("limits.client_frames_per_second", "must be at least 1"));
        }
        if self.limits.max_publish_bytes < 128 {
            return Err(invalid("limits.max_publish_bytes", "must be at least 128"));
        }
        if self.limits.max_publish_users == 0 {
            return Err(invalid("limits.max_publish_users", "must be at least 1"));
        }
        if self.broker.user_channel.matches("{user}").count() != 1 {
            return Err(invalid("broker.user_channel", "must contain {user} exactly once"));
        }
        if self.broker.topic_channel.matches("{topic}").count() != 1 {
            return Err(invalid("broker.topic_channel", "must contain {topic} exactly once"));
        }
        let cluster = self.broker.kind == BrokerKind::RedisCluster;
        if cluster {
            for (key, pattern, placeholder) in [
                ("broker.user_channel", &self.broker.user_channel, "{user}"),
                ("broker.topic_channel", &self.broker.topic_channel, "{topic}"),
            ] {
                if pattern.replace(placeholder, "").contains(['{', '}']) {
                    return Err(invalid(
                        key,
                        "must have no braces besides the placeholder in redis-cluster mode (the id is the hash tag)",
                    ));
                }
            }
        }
        let names = ChannelNames::new(&self.broker.user_channel, &self.broker.topic_channel, cluster);
        if let Some(overlap) = names.overlap() {
            return Err(invalid(
                "broker.topic_channel",
                format!(
                    "overlaps broker.user_channel: topic {:?} would be user {:?}'s channel {:?}, so a token granting that topic could read that user's notifications",
                    overlap.topic, overlap.user, overlap.channel
                ),
            ));
        }
        if self.broker.kind == BrokerKind::RedisCluster && self.broker.cluster_nodes.is_empty() {
            return Err(invalid("broker.cluster_nodes", "at least one seed node is required for redis-cluster"));
        }
        if self.broker.tls_ca_file.is_some() {
            let urls: Vec<&String> = match self.broker.kind {
                BrokerKind::Redis => vec![&self.broker.redis_url],
                BrokerKind::RedisCluster => self.broker.cluster_nodes.iter().collect(),
                BrokerKind::Memory => vec![],
            };
            if urls.iter().any(|u| !u.starts_with("rediss://")) {
                return Err(invalid("broker.tls_ca_file", "is for TLS: the Redis URLs must be rediss://"));
            }
        }
        if self.broker.kind == BrokerKind::Redis && redis::parse_redis_url(&self.broker.redis_url).is_none() {
            return Err(invalid("broker.redis_url", "not a redis://, rediss:// or redis+unix:// URL"));
        }
        if self.broker.subscribe_batch == 0 {
            return Err(invalid("broker.subscribe_batch", "must be at least 1"));
        }
        if self.broker.subscriber_connections > MAX_SUBSCRIBER_CONNECTIONS {
            return Err(invalid(
                "broker.subscriber_connections",
                format!("must be at most {MAX_SUBSCRIBER_CONNECTIONS} (0: one per worker thread)"),
            ));
        }
        if self.broker.probe_timeout <= self.broker.probe_interval {
            return Err(invalid("broker.probe_timeout", "must be longer than broker.probe_interval"));
        }
        if self.broker.reconnect_min.is_zero() || self.broker.reconnect_max < self.broker.reconnect_min {
            return Err(invalid("broker.reconnect_max", "need 0 < reconnect_min <= reconnect_max"));
        }
        if self.inbox.max_per_user == 0 {
            return Err(invalid("inbox.max_per_user", "must be at least 1"));
        }
        if self.inbox.ttl < Duration::from_secs(1) {
            return Err(invalid("inbox.ttl", "must be at least 1s"));
        }
        if self.inbox.replay_limit == 0 {
            return Err(invalid("inbox.replay_limit", "must be at least 1"));
        }
        if self.inbox.key_prefix.contains(['{', '}']) {
            return Err(invalid("inbox.key_prefix", "must not contain braces (the user id is the hash tag)"));
        }
        self.validate_pusher()?;
        self.validate_webhooks()?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return Err(invalid("log.filter", format!("{:?} is not a valid filter", self.log.filter)));
        }
        Ok(())
    }

    fn validate_webhooks(&self) -> Result<(), SettingsError> {
        const EVENTS: &[&str] = &[
            "channel_occupied",
            "channel_vacated",
            "member_added",
            "member_removed",
            "client_event",
            "notifications_read",
        ];
        let w = &self.webhooks;
        for endpoint in &w.endpoints {
            let known_app = endpoint.app == "native" || self.pusher.apps.iter().any(|a| a.id == endpoint.app);
            if !known_app {
                return Err(invalid(
                    "webhooks.endpoints.app",
                    format!("{:?} is neither native nor a pusher.apps id", endpoint.app),
                ));
            }
            match url::Url::parse(&endpoint.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid("webhooks.endpoints.url", format!("{:?} is not an http(s) URL", endpoint.url)));
                }
            }
            if let Some(unknown) = endpoint.events.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                return Err(invalid(
                    "webhooks.endpoints.events",
                    format!("unknown event {unknown:?}; one of {EVENTS:?}"),
                ));
            }
            if endpoint.app == "native" && w.native_secret.len() < MIN_PUSHER_SECRET_LEN {
                return Err(invalid(
                    "webhooks.native_secret",
                    format!("native endpoints need a secret of at least {MIN_PUSHER_SECRET_LEN} bytes"),
                ));
            }
        }
        if w.timeout.is_zero() || w.batch_window.is_zero() || w.max_queue == 0 {
            return Err(invalid("webhooks.timeout", "timeout, batch_window and max_queue must be above zero"));
        }
        Ok(())
    }

    fn validate_pusher(&self) -> Result<(), SettingsError> {
        let pusher = &self.pusher;
        if pusher.activity_timeout < Duration::from_secs(1) {
            return Err(invalid("pusher.activity_timeout", "must be at least 1s"));
        }
        if pusher.presence_ttl < Duration::from_secs(3) {
            return Err(invalid("pusher.presence_ttl", "must be at least 3s"));
        }
        if pusher.max_presence_members == 0 {
            return Err(invalid("pusher.max_presence_members", "must be at least 1"));
        }
        let channel = &pusher.notification_channel;
        if channel.matches("{user}").count() != 1 || !channel.starts_with("private-") {
            return Err(invalid("pusher.notification_channel", "must start with private- and hold {user} once"));
        }
        if pusher.notification_event.is_empty() {
            return Err(invalid("pusher.notification_event", "must not be empty"));
        }
        // Ids and keys appear in URL paths: a plain alphabet keeps them out of any escaping.
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        for (i, app) in pusher.apps.iter().enumerate() {
            if !plain(&app.id) {
                return Err(invalid("pusher.apps.id", format!("app {i}: 1 to 64 of A-Z a-z 0-9 - _ .")));
            }
            if !plain(&app.key) {
                return Err(invalid("pusher.apps.key", format!("app {i}: 1 to 64 of A-Z a-z 0-9 - _ .")));
            }
            if app.secret.len() < MIN_PUSHER_SECRET_LEN {
                return Err(invalid(
                    "pusher.apps.secret",
                    format!("app {} needs a secret of at least {MIN_PUSHER_SECRET_LEN} bytes", app.id),
                ));
            }
            let earlier = &pusher.apps[..i];
            if earlier.iter().any(|other| other.id == app.id) {
                return Err(invalid("pusher.apps.id", format!("{:?} is used twice", app.id)));
            }
            if earlier.iter().any(|other| other.key == app.key) {
                return Err(invalid("pusher.apps.key", format!("{:?} is used twice", app.key)));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML with secrets replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.auth.jwt_secret = redact_secret(&copy.auth.jwt_secret).to_owned();
        copy.auth.api_keys = copy.auth.api_keys.iter().map(|_| REDACTED.into()).collect();
        copy.broker.redis_url = redact_url(&copy.broker.redis_url);
        copy.broker.cluster_nodes = copy.broker.cluster_nodes.iter().map(|u| redact_url(u)).collect();
        for app in &mut copy.pusher.apps {
            app.secret = redact_secret(&app.secret).to_owned();
        }
        copy.webhooks.native_secret = redact_secret(&copy.webhooks.native_secret).to_owned();
        toml::to_string(&copy).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// `a.b.0.c` as config's path `a.b[0].c`; `None` for a key without a numeric segment.
fn indexed_path(key: &str) -> Option<String> {
    let mut path = String::with_capacity(key.len() + 2);
    let mut indexed = false;
    for segment in key.split('.') {
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) && !path.is_empty() {
            path.push_str(&format!("[{segment}]"));
            indexed = true;
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    indexed.then_some(path)
}

fn redact_secret(secret: &str) -> &str {
    if secret.is_empty() { "" } else { REDACTED }
}

/// Query parameters of a Redis URL that carry a password (`redis+unix://…?pass=` is the
/// redis crate's spelling; `password` is common elsewhere).
const SECRET_PARAMS: &[&str] = &["pass", "password"];

/// A Redis URL with its password hidden, in every form the redis crate takes: user info
/// (`redis://user:pw@host`, `rediss://`), and query parameters (`redis+unix:///s?pass=pw`,
/// `unix:///s?password=pw`). A URL that does not parse is hidden whole: it might be anything.
fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return if url.is_empty() { String::new() } else { format!("{REDACTED} (unparsable URL)") };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(REDACTED));
    }
    if parsed.query_pairs().any(|(k, _)| SECRET_PARAMS.contains(&k.as_ref())) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if SECRET_PARAMS.contains(&k.as_ref()) { REDACTED.to_owned() } else { v.into_owned() };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `<` and `>` come back percent-encoded; show the marker as written.
    parsed.to_string().replace("%3Credacted%3E", REDACTED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn default_toml_documents_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let loaded = Settings::load_from(Some(&path), &HashMap::new()).unwrap();
        assert_eq!(loaded, Settings::default());
    }

    #[test]
    fn environment_overrides_with_double_underscores_and_lists() {
        let settings = Settings::load_from(
            None,
            &env(&[
                ("PUSHNODE__SERVER__PUBLIC_ADDR", "127.0.0.1:7000"),
                ("PUSHNODE__AUTH__API_KEYS", "key-aaaaaaaaaaaaaaaa,key-bbbbbbbbbbbbbbbb"),
                ("PUSHNODE__SESSION__HEARTBEAT_INTERVAL", "5s"),
                ("PUSHNODE__LIMITS__MAX_CONNECTIONS", "10"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.server.public_addr.port(), 7000);
        assert_eq!(settings.auth.api_keys.len(), 2);
        assert_eq!(settings.session.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(settings.limits.max_connections, 10);
    }

    #[test]
    fn subscriber_connections_follow_the_workers_unless_set() {
        let mut broker = Broker::default();
        assert_eq!(broker.subscriber_connections_for(8), 8);
        assert_eq!(broker.subscriber_connections_for(0), 1);
        assert_eq!(broker.subscriber_connections_for(500), MAX_SUBSCRIBER_CONNECTIONS);
        broker.subscriber_connections = 3;
        assert_eq!(broker.subscriber_connections_for(16), 3);

        let too_many = Settings::load_from(None, &env(&[("PUSHNODE__BROKER__SUBSCRIBER_CONNECTIONS", "65")]));
        let error = too_many.unwrap_err().to_string();
        assert!(error.contains("broker.subscriber_connections"), "{error}");
    }

    #[test]
    fn unknown_keys_are_named_in_the_error() {
        let err = Settings::load_from(None, &env(&[("PUSHNODE__SERVER__PUBLIK_ADDR", "x")])).unwrap_err();
        assert!(err.to_string().contains("publik_addr"), "{err}");
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let err = Settings::load_from(None, &env(&[("PUSHNODE__SESSION__HEARTBEAT_INTERVAL", "soon")])).unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval"), "{err}");
        let err = Settings::load_from(None, &env(&[("PUSHNODE__AUTH__JWT_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
    }

    #[test]
    fn insecure_and_demo_modes_are_refused_off_loopback() {
        let mut s = Settings::default();
        s.server.public_addr = "0.0.0.0:9501".parse().unwrap();
        assert!(s.validate().unwrap_err().to_string().contains("demo.enabled"));
        s.demo.enabled = false;
        s.auth.insecure_uid = true;
        assert!(s.validate().unwrap_err().to_string().contains("auth.insecure_uid"));
    }

    #[test]
    fn nothing_runs_without_credentials_off_loopback() {
        // The internal listener alone on a reachable address is enough to refuse each.
        let mut demo = Settings::default();
        demo.server.internal_addr = "0.0.0.0:9502".parse().unwrap();
        assert!(demo.validate().unwrap_err().to_string().contains("demo.enabled"));
        let mut open_api = demo.clone();
        open_api.demo.enabled = false;
        open_api.auth.jwt_secret = "s".repeat(32);
        assert!(open_api.validate().unwrap_err().to_string().contains("auth.api_keys"));
        open_api.auth.api_keys = vec!["k".repeat(16)];
        assert!(open_api.validate().is_ok());
        let mut insecure = open_api.clone();
        insecure.auth.insecure_uid = true;
        assert!(insecure.validate().unwrap_err().to_string().contains("auth.insecure_uid"));
    }

    #[test]
    fn overlapping_channel_patterns_are_refused_naming_both_keys() {
        for (user, topic) in [
            ("push:message:{user}", "push:{topic}"),
            ("laravel_database_private-App.Models.User.{user}", "laravel_database_{topic}"),
            ("n:{user}", "n:{topic}"),
        ] {
            let mut s = Settings::default();
            s.broker.user_channel = user.into();
            s.broker.topic_channel = topic.into();
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("broker.topic_channel") && err.contains("broker.user_channel"), "{err}");
        }
    }

    #[test]
    fn braces_in_patterns_are_refused_in_cluster_mode() {
        let mut s = Settings::default();
        s.broker.kind = BrokerKind::RedisCluster;
        s.broker.cluster_nodes = vec!["redis://127.0.0.1:7000".into()];
        s.broker.user_channel = "app{x}:{user}".into();
        assert!(s.validate().unwrap_err().to_string().contains("broker.user_channel"));
        s.broker.user_channel = "app:{user}".into();
        s.broker.topic_channel = "t:{topic}}".into();
        assert!(s.validate().unwrap_err().to_string().contains("broker.topic_channel"));
    }

    #[test]
    fn secrets_from_the_environment_stay_strings() {
        let settings = Settings::load_from(
            None,
            &env(&[
                ("PUSHNODE__AUTH__JWT_SECRET", "12345678901234567890123456789012345"),
                ("PUSHNODE__AUTH__API_KEYS", "0123456789012345678"),
                ("PUSHNODE__DEMO__ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.auth.jwt_secret, "12345678901234567890123456789012345");
        assert_eq!(settings.auth.api_keys, vec!["0123456789012345678".to_owned()]);
        assert!(!settings.demo.enabled);
    }

    #[test]
    fn pusher_apps_come_from_a_file_and_their_secrets_from_the_environment() {
        let dir = std::env::temp_dir().join(format!("pushnode-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("apps.toml");
        std::fs::write(&file, "[[pusher.apps]]\nid = \"1\"\nkey = \"k1\"\nsecret = \"from-the-file\"\n").unwrap();
        let settings = Settings::load_from(
            Some(&file),
            &env(&[
                ("PUSHNODE__PUSHER__APPS__0__SECRET", "00000000from-env"),
                ("PUSHNODE__AUTH__INSECURE_UID", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.pusher.apps.len(), 1);
        assert_eq!(
            (settings.pusher.apps[0].id.as_str(), settings.pusher.apps[0].secret.as_str()),
            ("1", "00000000from-env")
        );
        assert!(!settings.redacted_toml().contains("from-env"));
        assert!(!format!("{settings:?}").contains("from-env"));

        // Without a file, the environment alone defines the app.
        let settings = Settings::load_from(
            None,
            &env(&[
                ("PUSHNODE__PUSHER__APPS__0__ID", "7"),
                ("PUSHNODE__PUSHER__APPS__0__KEY", "key7"),
                ("PUSHNODE__PUSHER__APPS__0__SECRET", "secret-seven"),
                ("PUSHNODE__PUSHER__APPS__0__ENABLE_CLIENT_MESSAGES", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (settings.pusher.apps[0].key.as_str(), settings.pusher.apps[0].enable_client_messages),
            ("key7", true)
        );

        let short = env(&[
            ("PUSHNODE__PUSHER__APPS__0__ID", "7"),
            ("PUSHNODE__PUSHER__APPS__0__KEY", "k"),
            ("PUSHNODE__PUSHER__APPS__0__SECRET", "short"),
        ]);
        let err = Settings::load_from(None, &short).unwrap_err().to_string();
        assert!(err.contains("pusher.apps.secret"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn debug_output_never_shows_a_secret() {
        let mut s = Settings::default();
        s.auth.jwt_secret = "jwt-secret-jwt-secret-jwt-secret!".into();
        s.auth.api_keys = vec!["api-key-api-key-1".into()];
        s.broker.redis_url = "redis://user:hunter2@redis:6379".into();
        s.broker.cluster_nodes = vec!["redis://:hunter3@r1:7000".into()];
        let debug = format!("{s:?} {s:#?}");
        for secret in ["jwt-secret", "api-key", "hunter2", "hunter3"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        assert!(debug.contains("r1:7000") && debug.contains("redis:6379"));
    }

    #[test]
    fn redaction_hides_passwords_in_every_url_form() {
        for (url, kept) in [
            ("redis://:hunter2@redis:6379", "redis:6379"),
            ("redis://user:hunter2@redis:6379/2", "user:<redacted>@redis:6379/2"),
            ("rediss://default:hunter2@redis:6380", "redis:6380"),
            ("redis+unix:///run/redis.sock?db=1&pass=hunter2", "/run/redis.sock?db=1&pass=<redacted>"),
            ("unix:///run/redis.sock?password=hunter2&db=0", "password=<redacted>&db=0"),
            ("redis://redis:6379", "redis://redis:6379"),
            ("not a url with hunter2", "<redacted>"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("hunter2") && shown.contains(kept), "{url} -> {shown}");
        }
    }

    #[test]
    fn redaction_hides_secrets() {
        let mut s = Settings::default();
        s.auth.jwt_secret = "a".repeat(40);
        s.auth.api_keys = vec!["k".repeat(20)];
        s.broker.redis_url = "redis://:hunter2@redis:6379".into();
        let out = s.redacted_toml();
        assert!(!out.contains(&"a".repeat(40)) && !out.contains(&"k".repeat(20)));
        assert!(!out.contains("hunter2") && out.contains("@redis:6379"), "{out}");
        assert!(out.contains(REDACTED));
    }
}
