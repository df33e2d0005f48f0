//! `Node`: the wired parts of one running node, shared by both listeners as a cheap-clone
//! handle. It holds no business logic; it answers "may one more session in?" and "are we
//! ready?", which both listeners need.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::channel::ChannelNames;
use crate::hub::Hub;
use crate::inbox::Inbox;
use crate::presence::Presence;
use crate::pusher::Apps;
use crate::pusher::counts::ChannelCounts;
use crate::session::SessionContext;
use crate::settings::Settings;
use crate::webhooks::Webhooks;

#[derive(Clone, Debug)]
pub struct Node {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    hub: Hub,
    broker: Broker,
    inbox: Inbox,
    auth: Authenticator,
    names: ChannelNames,
    apps: Apps,
    presence: Presence,
    counts: ChannelCounts,
    webhooks: Webhooks,
    session_context: Arc<SessionContext>,
    metrics: PrometheusHandle,
    tracker: TaskTracker,
    draining: AtomicBool,
    /// Resident memory as last sampled ([`Node::sample_memory`]).
    resident_bytes: AtomicU64,
    /// Sessions admitted (upgrade accepted, not yet ended). Counted from the 101 on, so the
    /// connection limit holds even while sessions are still registering.
    admitted: Arc<AtomicUsize>,
    /// The admission limit: `limits.max_connections`, or less to fit the descriptor limit.
    max_sessions: usize,
}

/// Why readiness fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    Draining,
    Broker,
    Full,
    Memory,
}

impl NotReady {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Broker => "broker",
            Self::Full => "connection_limit",
            Self::Memory => "memory_limit",
        }
    }
}

/// One admitted session's place under the connection limit; released on drop.
#[derive(Debug)]
pub struct Admission {
    admitted: Arc<AtomicUsize>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The parts a node is built from (see [`crate::server::run`]).
#[derive(Debug)]
pub struct Parts {
    pub settings: Settings,
    pub hub: Hub,
    pub broker: Broker,
    pub inbox: Inbox,
    pub auth: Authenticator,
    pub names: ChannelNames,
    pub apps: Apps,
    pub presence: Presence,
    pub counts: ChannelCounts,
    pub webhooks: Webhooks,
    pub session_context: Arc<SessionContext>,
    pub metrics: PrometheusHandle,
    pub tracker: TaskTracker,
    /// See [`crate::fd_budget::FdBudget::sessions`].
    pub max_sessions: usize,
}

impl Node {
    pub fn new(parts: Parts) -> Self {
        let Parts {
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
            tracker,
            max_sessions,
        } = parts;
        Self {
            inner: Arc::new(Inner {
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
                tracker,
                draining: AtomicBool::new(false),
                resident_bytes: AtomicU64::new(0),
                admitted: Arc::new(AtomicUsize::new(0)),
                max_sessions,
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }
    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }
    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }
    pub fn names(&self) -> &ChannelNames {
        &self.inner.names
    }
    /// What every session of this node shares.
    /// The Pusher apps (none when the Pusher front end is off).
    pub fn apps(&self) -> &Apps {
        &self.inner.apps
    }

    /// Presence members of Pusher presence channels, cluster-wide.
    pub fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    /// Subscription counts of Pusher channels, cluster-wide.
    pub fn counts(&self) -> &ChannelCounts {
        &self.inner.counts
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.inner.webhooks
    }

    pub fn session_context(&self) -> &Arc<SessionContext> {
        &self.inner.session_context
    }
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }
    pub fn tracker(&self) -> &TaskTracker {
        &self.inner.tracker
    }

    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Records the process's resident memory (sampled periodically by the server).
    pub fn sample_memory(&self, resident_bytes: u64) {
        self.inner.resident_bytes.store(resident_bytes, Ordering::Release);
    }

    fn over_memory(&self) -> bool {
        let max = self.inner.settings.limits.max_memory_bytes;
        max > 0 && self.inner.resident_bytes.load(Ordering::Acquire) >= max
    }

    /// Reserves a place for one more session, or `None` at the connection or memory limit.
    pub fn admit(&self) -> Option<Admission> {
        if self.over_memory() {
            return None;
        }
        let max = self.inner.max_sessions;
        let admitted = &self.inner.admitted;
        admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Admission { admitted: admitted.clone() })
    }

    /// The count of admitted sessions, which the public listener's pool shares its descriptor
    /// budget with.
    pub fn admitted(&self) -> Arc<AtomicUsize> {
        self.inner.admitted.clone()
    }

    /// Readiness: not draining, broker ready, below the connection and memory limits.
    pub fn readiness(&self) -> Vec<NotReady> {
        let mut reasons = Vec::new();
        if self.is_draining() {
            reasons.push(NotReady::Draining);
        }
        let broker = self.inner.broker.status();
        let grace = self.inner.settings.broker.unready_after;
        if !broker.ready && broker.healthy_ago.is_none_or(|ago| ago >= grace) {
            reasons.push(NotReady::Broker);
        }
        if self.inner.admitted.load(Ordering::Acquire) >= self.inner.max_sessions {
            reasons.push(NotReady::Full);
        }
        if self.over_memory() {
            reasons.push(NotReady::Memory);
        }
        reasons
    }

    /// What is wrong while the node still counts as ready: its broker is down, but for less
    /// than `broker.unready_after` (see [`Node::readiness`]).
    pub fn degraded(&self) -> Vec<&'static str> {
        let broker = self.inner.broker.status();
        let grace = self.inner.settings.broker.unready_after;
        let within_grace = broker.healthy_ago.is_some_and(|ago| ago < grace);
        if !broker.ready && within_grace { vec![NotReady::Broker.label()] } else { Vec::new() }
    }
}
