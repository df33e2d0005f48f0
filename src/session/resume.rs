//! What a session remembers to deliver persisted notifications at least once, without gaps:
//! the highest inbox id it wrote (`high`), the broker subscription generation its live frames
//! come from, and, after a broker gap, the id to replay from.
//!
//! Rules, which the tests hold it to:
//! - a live persisted notification at or below `high` was already written (by a replay): skip;
//! - a live frame from a newer generation, or a generation change, means the subscription was
//!   lost in between: everything after `high` as it was then must be replayed from the inbox
//!   once the channel is subscribed again;
//! - a replay writes every id after its base, even below `high` (those are the gap).

use crate::protocol::NoteId;

#[derive(Debug, Default)]
pub(super) struct Resume {
    /// Highest persisted id written to this client.
    high: Option<NoteId>,
    /// Generation of the subscription the session's frames come from.
    generation: u64,
    /// A gap to replay: everything after this id (`None` inside: from the oldest).
    gap: Option<Option<NoteId>>,
}

impl Resume {
    pub(super) fn new(generation: u64) -> Self {
        Self { high: None, generation, gap: None }
    }

    /// Records that ids up to `id` were accounted for (written, or deliberately not: read).
    pub(super) fn advance(&mut self, id: NoteId) {
        self.high = self.high.max(Some(id));
    }

    /// The broker generation changed: messages may have been missed since `high`.
    pub(super) fn on_generation(&mut self, generation: u64) {
        if generation > self.generation {
            self.generation = generation;
            self.gap.get_or_insert(self.high);
        }
    }

    /// Whether a live frame should be written; updates the state for it.
    pub(super) fn admit_live(&mut self, id: Option<NoteId>, generation: u64) -> bool {
        self.on_generation(generation);
        match id {
            None => true,
            Some(id) if self.high.is_some_and(|h| id <= h) => false,
            Some(id) => {
                self.high = Some(id);
                true
            }
        }
    }

    /// The id to replay after, if a gap is pending.
    pub(super) fn pending_gap(&self) -> Option<Option<NoteId>> {
        self.gap
    }

    /// The gap was replayed.
    pub(super) fn gap_filled(&mut self) {
        self.gap = None;
    }

    /// A replay after `base` could not be done (inbox unreachable); it stays pending.
    pub(super) fn reopen_gap(&mut self, base: Option<NoteId>) {
        let base = match self.gap {
            Some(pending) => pending.min(base),
            None => base,
        };
        self.gap = Some(base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> NoteId {
        NoteId { ms: n, seq: 0 }
    }

    #[test]
    fn live_duplicates_of_a_replay_are_skipped() {
        let mut r = Resume::new(1);
        r.advance(id(5));
        assert!(!r.admit_live(Some(id(4)), 1));
        assert!(!r.admit_live(Some(id(5)), 1));
        assert!(r.admit_live(Some(id(6)), 1));
        assert!(r.admit_live(None, 1), "non-persisted frames always pass");
        assert_eq!(r.pending_gap(), None);
    }

    #[test]
    fn a_frame_from_a_new_generation_opens_a_gap_from_the_old_high_mark() {
        let mut r = Resume::new(1);
        assert!(r.admit_live(Some(id(3)), 1));
        // Subscription lost and restored: 4 and 5 were missed, 6 arrives live first.
        assert!(r.admit_live(Some(id(6)), 3));
        assert_eq!(r.pending_gap(), Some(Some(id(3))));
        r.gap_filled();
        assert_eq!(r.pending_gap(), None);
    }

    #[test]
    fn a_generation_change_without_frames_opens_a_gap_once() {
        let mut r = Resume::new(1);
        r.advance(id(2));
        r.on_generation(2);
        r.advance(id(9));
        r.on_generation(3);
        assert_eq!(r.pending_gap(), Some(Some(id(2))), "the first base is kept until filled");
    }
}
