//! [`Members`]: the local sessions of one channel, in the shape fan-out wants (contiguous
//! iteration) and leaving needs (removal by id without scanning thousands).

use std::sync::Arc;

use indexmap::IndexMap;

use super::{LocalSession, SessionId};

/// Up to this many sessions a channel keeps a plain vector: removal scans at most this many
/// entries, and the common channel (one user's one or two tabs) costs one small allocation.
/// Past it the channel switches to an index map keyed by session id (removal by hash and
/// `swap_remove`, iteration over its dense entry vector); it switches back below half, so a
/// channel hovering at the boundary does not convert on every join and leave.
const INLINE_MAX: usize = 8;

#[derive(Debug)]
pub(super) enum Members {
    Few(Vec<Arc<LocalSession>>),
    /// Boxed: every user channel holds a `Members`, and few channels ever need the map; the
    /// enum stays the size of a vector.
    Many(Box<IndexMap<SessionId, Arc<LocalSession>>>),
}

impl Default for Members {
    fn default() -> Self {
        Self::Few(Vec::new())
    }
}

impl Members {
    /// Adds `session`; the caller does not add the same session twice.
    pub(super) fn insert(&mut self, session: Arc<LocalSession>) {
        match self {
            Self::Few(list) if list.len() < INLINE_MAX => list.push(session),
            Self::Few(list) => {
                let mut map: IndexMap<SessionId, Arc<LocalSession>> = list.drain(..).map(|s| (s.id, s)).collect();
                map.insert(session.id, session);
                *self = Self::Many(Box::new(map));
            }
            Self::Many(map) => {
                map.insert(session.id, session);
            }
        }
    }

    /// Removes session `id` if it is a member; constant time in the channel's size.
    pub(super) fn remove(&mut self, id: SessionId) {
        match self {
            Self::Few(list) => {
                if let Some(i) = list.iter().position(|s| s.id == id) {
                    list.swap_remove(i);
                }
            }
            Self::Many(map) => {
                map.swap_remove(&id);
                if map.len() <= INLINE_MAX / 2 {
                    *self = Self::Few(map.drain(..).map(|(_, s)| s).collect());
                }
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Self::Few(list) => list.len(),
            Self::Many(map) => map.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every member, in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<LocalSession>> {
        let (few, many) = match self {
            Self::Few(list) => (Some(list.iter()), None),
            Self::Many(map) => (None, Some(map.values())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use crate::protocol::Format;

    fn session(id: SessionId) -> Arc<LocalSession> {
        Arc::new(LocalSession::new(id, "u".into(), Format::Raw, Outbox::new(1)))
    }

    fn ids(members: &Members) -> Vec<SessionId> {
        let mut ids: Vec<SessionId> = members.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn grows_into_a_map_and_shrinks_back_keeping_every_member() {
        let mut members = Members::default();
        for id in 1..=20 {
            members.insert(session(id));
        }
        assert!(matches!(members, Members::Many(_)));
        assert_eq!(ids(&members), (1..=20).collect::<Vec<_>>());
        for id in (1..=20).filter(|id| id % 2 == 0) {
            members.remove(id);
        }
        members.remove(99); // not a member: nothing happens
        assert_eq!(ids(&members), (1..=20).filter(|id| id % 2 == 1).collect::<Vec<_>>());
        for id in [1, 3, 5, 7, 9, 11] {
            members.remove(id);
        }
        assert!(matches!(members, Members::Few(_)), "back to a vector below half the threshold");
        assert_eq!(ids(&members), vec![13, 15, 17, 19]);
        for id in [13, 15, 17, 19] {
            members.remove(id);
        }
        assert!(members.is_empty());
    }
}
