//! `FdBudget`: how the process's file descriptors are shared between WebSocket sessions, the
//! public listener's not-yet-upgraded connections and the internal listener, so that no pool
//! can starve another: whatever floods the public listener, there is room for sessions, the
//! API and `/metrics`.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit. After [`RESERVE`], the
//! internal listener gets its own pool (at most an eighth of what is left); the rest is the
//! public listener's, shared at run time: sessions plus not-yet-upgraded connections never
//! exceed it. Sessions may take all of it but [`PENDING_FLOOR`] (`limits.max_connections` is
//! lowered, and logged, if it does not fit), so new connections can always be accepted
//! and upgraded; when few sessions are open, a connect storm may use the room they leave.

use tracing::{info, warn};

use crate::settings;

/// Descriptors kept for everything that is not a client connection: the listeners, Redis
/// connections (a cluster has one per shard, twice), the runtime's epoll and eventfds, stdio,
/// `/proc` reads for metrics.
pub const RESERVE: usize = 64;
/// Public-listener descriptors sessions never take: room to accept (and upgrade, or refuse
/// with a status) new connections when the sessions are at their limit.
pub const PENDING_FLOOR: usize = 256;
/// Linux caps `RLIMIT_NOFILE` at `fs.nr_open` (1,048,576 by default) even when the hard
/// limit says unlimited.
const NR_OPEN: u64 = 1 << 20;

/// Connection bounds that fit the descriptor limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The descriptor limit they were sized from.
    pub nofile: u64,
    /// WebSocket sessions (the node's admission limit).
    pub sessions: usize,
    /// Public listener connections that are not sessions, at most (`limits.max_pending_connections`,
    /// or `public` if smaller).
    pub pending: usize,
    /// Sessions plus public-listener connections that are not sessions, at most.
    pub public: usize,
    /// Internal listener connections.
    pub internal: usize,
}

impl FdBudget {
    /// Raises the soft descriptor limit to the hard one, logs both, and sizes the bounds.
    pub fn for_this_process(limits: &settings::Limits) -> Self {
        let nofile = raise_nofile();
        let budget = Self::size(nofile, limits);
        if budget.sessions < limits.max_connections {
            // A warning when the operator asked for more; the default is only a ceiling.
            if limits.max_connections == settings::Limits::default().max_connections {
                info!(admitted = budget.sessions, nofile, "sessions limited by the file-descriptor limit");
            } else {
                warn!(
                    configured = limits.max_connections,
                    admitted = budget.sessions,
                    nofile,
                    "limits.max_connections lowered to fit the file-descriptor limit"
                );
            }
        }
        info!(
            nofile,
            sessions = budget.sessions,
            pending = budget.pending,
            public = budget.public,
            internal = budget.internal,
            "connection budget"
        );
        budget
    }

    /// The bounds for a descriptor limit of `nofile`.
    pub fn size(nofile: u64, limits: &settings::Limits) -> Self {
        let available = usize::try_from(nofile).unwrap_or(usize::MAX).saturating_sub(RESERVE).max(3);
        let internal = limits.max_internal_connections.min(available / 8).max(1);
        let public = available - internal;
        let floor = limits.max_pending_connections.min(PENDING_FLOOR).min(public / 4).max(1);
        let sessions = limits.max_connections.min(public - floor).max(1);
        let pending = limits.max_pending_connections.min(public);
        Self { nofile, sessions, pending, public, internal }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
fn raise_nofile() -> u64 {
    let (soft, hard) = match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the file-descriptor limit; assuming 1024");
            return 1024;
        }
    };
    let target = hard.min(NR_OPEN);
    if soft >= target {
        info!(soft, hard, "file-descriptor limit");
        return soft;
    }
    match rlimit::setrlimit(rlimit::Resource::NOFILE, target, hard) {
        Ok(()) => {
            info!(soft = target, hard, was = soft, "file-descriptor limit raised");
            target
        }
        Err(e) => {
            warn!(soft, hard, error = %e, "cannot raise the file-descriptor limit");
            soft
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_that_fit_are_kept() {
        let limits = settings::Limits { max_connections: 1000, ..Default::default() };
        let budget = FdBudget::size(1 << 20, &limits);
        assert_eq!((budget.sessions, budget.pending, budget.internal), (1000, 4096, 128));
        assert_eq!(budget.public, (1 << 20) - RESERVE - 128);
    }

    #[test]
    fn a_small_limit_shares_what_is_left_after_the_reserve() {
        let limits = settings::Limits::default();
        // This machine's limit: 19,000 sessions per node fit beside the floor.
        let budget = FdBudget::size(20_000, &limits);
        assert_eq!((budget.internal, budget.public), (128, 20_000 - RESERVE - 128));
        assert_eq!(budget.sessions, budget.public - PENDING_FLOOR);
        assert_eq!(budget.pending, 4096);
        let tiny = FdBudget::size(256, &limits);
        assert_eq!((tiny.sessions, tiny.pending, tiny.public, tiny.internal), (126, 168, 168, 24));
        assert!(tiny.public + tiny.internal + RESERVE <= 256);
        // Never zero, even for a nonsensical limit.
        let none = FdBudget::size(10, &limits);
        assert!(none.sessions >= 1 && none.pending >= 1 && none.internal >= 1);
        assert!(none.sessions < none.public);
    }
}
