//! `FdBudget`: how the process's file descriptors are shared between WebSocket sessions, the
//! public listener's not-yet-upgraded connections and the internal listener, so that no pool
//! can starve another: whatever floods the public listener, there is room for sessions, the
//! API and `/metrics`.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit. When the configured bounds
//! do not fit beside [`RESERVE`], the two connection pools are cut to at most an eighth and a
//! quarter of what is left, and sessions get the rest (`limits.max_connections` is lowered,
//! with a warning).

use tracing::{info, warn};

use crate::settings;

/// Descriptors kept for everything that is not a client connection: the listeners, Redis
/// connections (a cluster has one per shard, twice), the runtime's epoll and eventfds, stdio,
/// `/proc` reads for metrics.
pub const RESERVE: usize = 64;
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
    /// Public listener connections that are not sessions.
    pub pending: usize,
    /// Internal listener connections.
    pub internal: usize,
}

impl FdBudget {
    /// Raises the soft descriptor limit to the hard one, logs both, and sizes the bounds.
    pub fn for_this_process(limits: &settings::Limits) -> Self {
        let nofile = raise_nofile();
        let budget = Self::size(nofile, limits);
        if budget.sessions < limits.max_connections {
            warn!(
                configured = limits.max_connections,
                admitted = budget.sessions,
                nofile,
                "limits.max_connections lowered to fit the file-descriptor limit"
            );
        }
        info!(
            nofile,
            sessions = budget.sessions,
            pending = budget.pending,
            internal = budget.internal,
            "connection budget"
        );
        budget
    }

    /// The bounds for a descriptor limit of `nofile`.
    pub fn size(nofile: u64, limits: &settings::Limits) -> Self {
        let available = usize::try_from(nofile).unwrap_or(usize::MAX).saturating_sub(RESERVE).max(3);
        let wanted =
            limits.max_connections.saturating_add(limits.max_pending_connections + limits.max_internal_connections);
        if wanted <= available {
            return Self {
                nofile,
                sessions: limits.max_connections,
                pending: limits.max_pending_connections,
                internal: limits.max_internal_connections,
            };
        }
        let internal = limits.max_internal_connections.min(available / 8).max(1);
        let pending = limits.max_pending_connections.min(available / 4).max(1);
        let sessions = limits.max_connections.min(available - internal - pending).max(1);
        Self { nofile, sessions, pending, internal }
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
        assert_eq!((budget.sessions, budget.pending, budget.internal), (1000, 512, 128));
    }

    #[test]
    fn a_small_limit_shares_what_is_left_after_the_reserve() {
        let limits = settings::Limits::default();
        let budget = FdBudget::size(20_000, &limits);
        assert_eq!((budget.pending, budget.internal), (512, 128));
        assert_eq!(budget.sessions, 20_000 - RESERVE - 512 - 128);
        let tiny = FdBudget::size(256, &limits);
        assert_eq!((tiny.sessions, tiny.pending, tiny.internal), (120, 48, 24));
        assert!(tiny.sessions + tiny.pending + tiny.internal + RESERVE <= 256);
        // Never zero, even for a nonsensical limit.
        let none = FdBudget::size(10, &limits);
        assert!(none.sessions >= 1 && none.pending >= 1 && none.internal >= 1);
    }
}
