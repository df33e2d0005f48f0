//! `RedisLink`: the node's one way to Redis, shared by the broker and the inbox (and by what
//! comes after them) so that none of them imports another to borrow a connection.
//!
//! It owns where Redis is (one server, or a cluster's seed nodes) and how to talk to it
//! (RESP3, the connect and command timeouts), the cached command connection every caller
//! shares, [`RedisLink::query`] with its timeout and error mapping, and the choice between
//! PUBLISH and SPUBLISH. Subscriber connections are opened here too
//! ([`RedisLink::connect_subscriber`]) but owned by whoever asked: the broker.
//!
//! It also carries the link's epoch: the broker advances it after every full (re)subscribe,
//! which is when a restarted Redis may have forgotten what the node loaded into it (the
//! inbox's functions), so followers reload on every change.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, IntoConnectionInfo, ProtocolVersion, PushInfo, TlsCertificates, Value};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::settings::{self, BrokerKind};

/// Why a Redis call did not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Not connected, the connection broke, or the command timed out.
    #[error("Redis unavailable: {0}")]
    Unavailable(String),
    /// The settings do not describe a reachable Redis (a malformed URL).
    #[error("Redis configuration: {0}")]
    Config(String),
    /// Redis answered with an error (the connection itself is fine).
    #[error("Redis command failed: {0}")]
    Command(String),
}

/// Where to connect.
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    /// Seed nodes, and the CA file's certificates for `rediss://` nodes.
    Cluster(Vec<String>, Option<Vec<u8>>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry passwords; say only which mode.
        f.write_str(match self {
            Self::Single(_) => "Single",
            Self::Cluster(..) => "Cluster",
        })
    }
}

/// One connection, to a server or to a cluster (one connection per shard, managed by the
/// `redis` crate). Cheap to clone: clones share the connection.
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

/// Cheap-clone handle to the node's Redis.
#[derive(Debug, Clone)]
pub struct RedisLink {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    target: Target,
    connect_timeout: Duration,
    command_timeout: Duration,
    /// The shared command connection; `None` until first used and after it failed.
    commands: Mutex<Option<Conn>>,
    /// Serialises (re)connects of the command connection, so an outage does not open one
    /// connection per caller.
    connecting: tokio::sync::Mutex<()>,
    /// Advanced by the broker after every full (re)subscribe.
    epoch: watch::Sender<u64>,
}

impl RedisLink {
    /// The link the broker settings describe, or `None` for the in-process broker.
    pub fn from_settings(settings: &settings::Broker) -> Result<Option<Self>, LinkError> {
        if settings.kind == BrokerKind::Memory {
            return Ok(None);
        }
        // `rediss://` needs a crypto provider; installing it again (a second link in the same
        // process) is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca =
            match &settings.tls_ca_file {
                Some(path) => Some(std::fs::read(path).map_err(|e| {
                    LinkError::Config(format!("broker.tls_ca_file: cannot read {}: {e}", path.display()))
                })?),
                None => None,
            };
        let target = match settings.kind {
            BrokerKind::Memory => return Ok(None),
            BrokerKind::RedisCluster => Target::Cluster(settings.cluster_nodes.clone(), ca),
            BrokerKind::Redis => {
                let bad_url = |e: redis::RedisError| LinkError::Config(format!("broker.redis_url: {e}"));
                let info = settings.redis_url.as_str().into_connection_info().map_err(bad_url)?;
                let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
                let info = info.set_redis_settings(resp3);
                let client = match ca {
                    Some(root_cert) => redis::Client::build_with_tls(
                        info,
                        TlsCertificates { client_tls: None, root_cert: Some(root_cert) },
                    ),
                    None => redis::Client::open(info),
                }
                .map_err(bad_url)?;
                Target::Single(client)
            }
        };
        Ok(Some(Self {
            inner: Arc::new(Inner {
                target,
                connect_timeout: settings.connect_timeout,
                command_timeout: settings.command_timeout,
                commands: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                epoch: watch::Sender::new(0),
            }),
        }))
    }

    /// True for a Redis Cluster, whose channels use sharded pub/sub.
    pub fn is_cluster(&self) -> bool {
        matches!(self.inner.target, Target::Cluster(..))
    }

    /// The command that publishes on this deployment's channels: SPUBLISH in a cluster
    /// (sharded pub/sub), PUBLISH otherwise.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() { "SPUBLISH" } else { "PUBLISH" }
    }

    pub fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }

    /// Runs one command on the shared command connection (routed by key in cluster mode),
    /// failing fast while Redis is unreachable: connecting and answering are each bounded by
    /// the broker's timeouts. A broken or silent connection is dropped and reopened by the next
    /// caller; an error reply leaves it in place.
    pub async fn query(&self, cmd: &redis::Cmd) -> Result<Value, LinkError> {
        let mut conn = self.commands().await?;
        let limit = self.inner.command_timeout;
        let result = match &mut conn {
            Conn::Single(c) => timeout(limit, cmd.query_async::<Value>(c)).await,
            Conn::Cluster(c) => timeout(limit, cmd.query_async::<Value>(c)).await,
        };
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.code().is_some() => Err(LinkError::Command(e.to_string())),
            Ok(Err(e)) => {
                self.drop_commands();
                Err(LinkError::Unavailable(e.to_string()))
            }
            Err(_) => {
                self.drop_commands();
                Err(LinkError::Unavailable("Redis command timed out".into()))
            }
        }
    }

    fn drop_commands(&self) {
        *self.inner.commands.lock() = None;
    }

    async fn commands(&self) -> Result<Conn, LinkError> {
        if let Some(conn) = self.inner.commands.lock().clone() {
            return Ok(conn);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(conn) = self.inner.commands.lock().clone() {
            return Ok(conn);
        }
        let conn = self.connect(None).await?;
        *self.inner.commands.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a dedicated subscriber connection whose pushes (messages, unsubscribes,
    /// disconnection) go to `on_push`, which runs on the connection's reader and must not block.
    pub async fn connect_subscriber<F>(&self, on_push: F) -> Result<Conn, LinkError>
    where
        F: Fn(PushInfo) + Send + Sync + 'static,
    {
        self.connect(Some(Arc::new(on_push))).await
    }

    async fn connect(&self, on_push: Option<Arc<dyn Fn(PushInfo) + Send + Sync>>) -> Result<Conn, LinkError> {
        let (connect_timeout, command_timeout) = (self.inner.connect_timeout, self.inner.command_timeout);
        let attempt = async {
            match &self.inner.target {
                Target::Single(client) => {
                    let mut config = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(connect_timeout))
                        .set_response_timeout(Some(command_timeout));
                    if let Some(on_push) = on_push {
                        config = config.set_push_sender(move |info| {
                            on_push(info);
                            Ok::<(), std::convert::Infallible>(())
                        });
                    }
                    client.get_multiplexed_async_connection_with_config(&config).await.map(Conn::Single)
                }
                Target::Cluster(nodes, ca) => {
                    let mut builder = ClusterClientBuilder::new(nodes.clone())
                        .use_protocol(ProtocolVersion::RESP3)
                        .connection_timeout(connect_timeout)
                        .response_timeout(command_timeout)
                        .retries(2);
                    if let Some(root_cert) = ca {
                        builder =
                            builder.certs(TlsCertificates { client_tls: None, root_cert: Some(root_cert.clone()) });
                    }
                    if let Some(on_push) = on_push {
                        builder = builder.push_sender(move |info| {
                            on_push(info);
                            Ok::<(), std::convert::Infallible>(())
                        });
                    }
                    let client = builder.build()?;
                    client.get_async_connection().await.map(Conn::Cluster)
                }
            }
        };
        match timeout(connect_timeout + command_timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(LinkError::Unavailable(format!("cannot connect to Redis: {e}"))),
            Err(_) => Err(LinkError::Unavailable("connecting to Redis timed out".into())),
        }
    }

    /// Advances the epoch: the broker's subscriber has (re)connected and subscribed. Redis may
    /// have restarted in between.
    pub fn advance_epoch(&self) {
        self.inner.epoch.send_modify(|e| *e += 1);
    }

    /// Watches the epoch (see [`RedisLink::advance_epoch`]).
    pub fn watch_epoch(&self) -> watch::Receiver<u64> {
        self.inner.epoch.subscribe()
    }

    /// Loads a Redis Functions library (`FUNCTION LOAD REPLACE`).
    pub async fn load_library(&self, library: &str) -> Result<(), LinkError> {
        self.query(redis::cmd("FUNCTION").arg("LOAD").arg("REPLACE").arg(library)).await.map(|_| ())
    }

    /// Loads `library` every time the epoch advances (the first time included), until `stop`:
    /// a restarted Redis without persistence has forgotten it. `name` is for the log.
    pub async fn keep_library_loaded(self, name: &'static str, library: &'static str, stop: CancellationToken) {
        let mut epoch = self.watch_epoch();
        loop {
            tokio::select! {
                changed = epoch.changed() => if changed.is_err() { return },
                () = stop.cancelled() => return,
            }
            match self.load_library(library).await {
                Ok(()) => info!(library = name, "Redis functions loaded"),
                Err(e) => {
                    warn!(library = name, error = %e, "cannot load Redis functions; retrying on the next reconnect")
                }
            }
        }
    }

    /// `FCALL function 1 key args...`, loading `library` once if Redis does not know the
    /// function (a restart raced the reload).
    pub async fn fcall(&self, library: &str, function: &str, key: &str, args: &[&str]) -> Result<Value, LinkError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function).arg(1).arg(key).arg(args);
        match self.query(&cmd).await {
            Err(LinkError::Command(e)) if e.contains("Function not found") || e.contains("function not found") => {
                self.load_library(library).await?;
                self.query(&cmd).await
            }
            result => result,
        }
    }
}
