//! `server`: binds the listeners, wires hub, broker, sessions and API into a [`Node`], and runs
//! the shutdown sequence. No business logic lives here.
//!
//! Shutdown, when `shutdown` is cancelled (SIGTERM/SIGINT in the binary):
//! 1. readiness fails and new upgrades get 503;
//! 2. sessions are closed one by one, evenly spread over `server.drain_period`, each with close
//!    code 4000 and a random reconnect delay up to `server.reconnect_jitter`;
//! 3. after `server.shutdown_grace`, whatever is still open is dropped and `run` returns.
//!
//! From the signal to the return takes at most `drain_period + min(1 s, shutdown_grace) +
//! shutdown_grace` (the Helm chart's termination grace is computed from it).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::channel::ChannelNames;
use crate::fd_budget::FdBudget;
use crate::hub::{Hub, heartbeat};
use crate::inbox::Inbox;
use crate::node::{Node, Parts};
use crate::presence::{self, Presence};
use crate::protocol::CloseReason;
use crate::pusher::Apps;
use crate::pusher::counts::ChannelCounts;
use crate::redis_link::RedisLink;
use crate::session::{Services, SessionContext};
use crate::settings::Settings;
use crate::webhooks::{self, Webhooks};
use crate::{acceptor, api, gateway, metrics};

/// The two bound sockets of a node. Tests bind port 0 and read the addresses back.
#[derive(Debug)]
pub struct Listeners {
    pub public: TcpListener,
    pub internal: TcpListener,
}

impl Listeners {
    pub fn bind(settings: &Settings) -> io::Result<Self> {
        Ok(Self {
            public: bind(settings.server.public_addr, settings.server.listen_backlog)?,
            internal: bind(settings.server.internal_addr, 1024)?,
        })
    }

    pub fn public_addr(&self) -> io::Result<SocketAddr> {
        self.public.local_addr()
    }

    pub fn internal_addr(&self) -> io::Result<SocketAddr> {
        self.internal.local_addr()
    }
}

/// Binds with an explicit backlog: a connect storm of thousands of clients overflows the
/// default and turns into SYN retries (seconds of delay).
fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(backlog)
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Redis(#[from] crate::redis_link::LinkError),
}

/// Runs a node on `listeners` until `shutdown` is cancelled, then drains and returns.
pub async fn run(listeners: Listeners, settings: Settings, shutdown: CancellationToken) -> Result<(), ServerError> {
    let node_id: Arc<str> = if settings.server.node_id.is_empty() {
        format!("{:08x}", fastrand::u32(..)).into()
    } else {
        settings.server.node_id.as_str().into()
    };
    let tracker = TaskTracker::new();
    // Stops sessions and background tasks after the drain; the listeners stop with it.
    let stop = CancellationToken::new();
    let metrics = metrics::install();
    let budget = FdBudget::for_this_process(&settings.limits);
    ::metrics::gauge!(metrics::CONNECTIONS_LIMIT).set(budget.sessions as f64);
    tracker.spawn(upkeep(metrics.clone(), stop.clone()));

    let link = RedisLink::from_settings(&settings.broker)?;
    // Without Redis there is no broker subscription to track: every channel is live at once.
    // With it, one lane of channels per subscriber connection.
    let lanes = match &link {
        Some(_) => {
            settings.broker.subscriber_connections_for(tokio::runtime::Handle::current().metrics().num_workers())
        }
        None => 0,
    };
    let hub = Hub::with_lanes(node_id.clone(), lanes);
    let cluster = link.as_ref().is_some_and(RedisLink::is_cluster);
    let names = ChannelNames::new(&settings.broker.user_channel, &settings.broker.topic_channel, cluster);
    let broker = Broker::start(&settings.broker, link.clone(), hub.subscriptions(), &tracker, stop.clone());
    let auth = Authenticator::new(&settings.auth);
    let auth = if settings.demo.enabled { auth.with_demo() } else { auth };
    if settings.auth.insecure_uid {
        warn!("auth.insecure_uid is on: anyone can connect as any user with ?uid=");
    }
    if settings.demo.enabled {
        warn!("demo.enabled is on: /demo/token mints tokens for any user (loopback only)");
    }
    let apps = Apps::new(&settings.pusher, cluster);
    let webhooks = Webhooks::new(&settings, link.clone());
    if webhooks.is_enabled() {
        tracker.spawn(webhooks.clone().run(stop.clone()));
        if let Some(link) = &link {
            tracker.spawn(link.clone().keep_library_loaded("pushnode_webhooks", webhooks::LIBRARY, stop.clone()));
        }
    }
    let tracked = |kind| {
        Presence::new(
            kind,
            node_id.clone(),
            link.clone(),
            broker.clone(),
            webhooks.clone(),
            settings.pusher.presence_ttl,
            settings.pusher.max_presence_members,
        )
    };
    let (presence, occupancy) = (tracked(presence::Kind::Presence), tracked(presence::Kind::Occupancy));
    let counts = ChannelCounts::new(hub.clone(), apps.clone(), node_id.clone(), link.clone());
    if !settings.pusher.apps.is_empty() {
        tracker.spawn(presence.clone().run(stop.clone()));
        tracker.spawn(occupancy.clone().run(stop.clone()));
        tracker.spawn(counts.clone().run(stop.clone()));
        if let Some(link) = &link {
            tracker.spawn(link.clone().keep_library_loaded("pushnode_presence", presence::LIBRARY, stop.clone()));
        }
    }
    let inbox = Inbox::new(&settings.inbox, link, hub.clone(), names.clone());
    tracker.spawn(inbox.clone().run(stop.clone()));
    let session_context = Arc::new(SessionContext::new(
        &settings,
        hub.clone(),
        names.clone(),
        Some(inbox.clone()),
        Services {
            apps: apps.clone(),
            broker: broker.clone(),
            presence: presence.clone(),
            occupancy,
            webhooks: webhooks.clone(),
        },
    ));
    tracker.spawn(heartbeat::sweep(
        hub.clone(),
        settings.session.heartbeat_interval,
        settings.session.heartbeat_timeout,
        stop.clone(),
    ));
    let node = Node::new(Parts {
        settings,
        hub,
        broker,
        inbox,
        auth,
        names,
        apps,
        presence,
        counts,
        webhooks,
        session_context,
        metrics,
        tracker: tracker.clone(),
        max_sessions: budget.sessions,
    });

    tracker.spawn(sample_memory(node.clone(), stop.clone()));

    let public_addr = listeners.public.local_addr()?;
    let internal_addr = listeners.internal.local_addr()?;
    let server = &node.settings().server;
    let public_limits = acceptor::Limits {
        name: "public",
        max_connections: budget.pending,
        shared: Some(acceptor::Shared { sessions: node.admitted(), total: budget.public }),
        header_timeout: server.header_timeout,
        keepalive_timeout: server.keepalive_timeout,
    };
    let internal_limits =
        acceptor::Limits { name: "internal", max_connections: budget.internal, shared: None, ..public_limits.clone() };
    let public =
        tokio::spawn(acceptor::serve(listeners.public, gateway::router(node.clone()), public_limits, stop.clone()));
    let internal =
        tokio::spawn(acceptor::serve(listeners.internal, api::router(node.clone()), internal_limits, stop.clone()));
    info!(node = %node_id, %public_addr, %internal_addr, subscriber_connections = lanes, "pushnode listening");

    shutdown.cancelled().await;
    drain(&node).await;
    // Anything still open (or stuck writing) is told once more; a stalled write gives up on it.
    for session in node.hub().all_sessions() {
        session.outbox.close(CloseReason::ServerShutdown { reconnect_after_ms: 0 });
    }
    stop.cancel();
    tracker.close();
    // One grace for everything left: sessions, background tasks, and the listeners' in-flight
    // plain HTTP requests (they stop accepting at `stop`). The worst case after the signal is
    // so drain_period + min(1 s, grace) + grace, which the Helm chart's termination grace adds up.
    let deadline = Instant::now() + node.settings().server.shutdown_grace;
    if timeout_at(deadline, tracker.wait()).await.is_err() {
        warn!(open = node.hub().session_count(), "shutdown grace elapsed; dropping what is left");
    }
    for listener in [public, internal] {
        if timeout_at(deadline, listener).await.is_err() {
            warn!("listener did not stop within the grace period");
        }
    }
    info!("pushnode stopped");
    Ok(())
}

/// Closes every session, evenly spread over the drain period, each with its own reconnect
/// delay, so clients do not come back all at once.
async fn drain(node: &Node) {
    node.start_draining();
    let sessions = node.hub().all_sessions();
    let period = node.settings().server.drain_period;
    let jitter_ms = node.settings().server.reconnect_jitter.as_millis() as u64;
    info!(sessions = sessions.len(), period = ?period, "draining");
    let start = Instant::now();
    let count = sessions.len().max(1) as u32;
    for (i, session) in sessions.iter().enumerate() {
        sleep_until(start + period * i as u32 / count).await;
        let reconnect_after_ms = fastrand::u64(0..=jitter_ms);
        session.outbox.close(CloseReason::ServerShutdown { reconnect_after_ms });
    }
    // Let the last closes leave before the hard stop.
    let deadline = Instant::now() + Duration::from_secs(1).min(node.settings().server.shutdown_grace);
    while node.hub().session_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Samples resident memory for admission control every second.
async fn sample_memory(node: Node, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(resident) = metrics::resident_bytes() {
                    node.sample_memory(resident);
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

async fn upkeep(handle: metrics_exporter_prometheus::PrometheusHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(metrics::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            () = stop.cancelled() => return,
        }
    }
}
