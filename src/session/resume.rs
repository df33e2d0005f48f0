//! What a session remembers to deliver persisted notifications at least once, without gaps:
//! the highest inbox id it wrote (`high`), the broker subscription generation its live frames
//! come from, and, after a broker gap, the id to replay from.
//!
//! Rules, which the tests hold it to:
//! - a live persisted notification at or below `high` was already written (by a replay): skip;
//! - a live frame from a newer generation, a generation change, or an interruption of the
//!   session's own channel means the subscription was lost in between: everything after `high`
//!   as it was then must be replayed from the inbox once the channel is subscribed again;
//! - while a gap is pending, no live persisted notification is written: it is in the inbox
//!   after the gap's base, so the replay writes it, in order. Written live, it would put a newer
//!   id on the client before older missing ones, and a client resuming from its newest id (as
//!   `pushnode.js` does) would skip the gap for good. Frames without an id still pass;
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
            self.interrupt();
        }
    }

    /// The session's own channel was interrupted (its cluster slot moved) or is not subscribed
    /// yet at the welcome: messages may be missed after `high` until it is.
    pub(super) fn interrupt(&mut self) {
        self.gap.get_or_insert(self.high);
    }

    /// Whether a live frame should be written; updates the state for it.
    pub(super) fn admit_live(&mut self, id: Option<NoteId>, generation: u64) -> bool {
        self.on_generation(generation);
        match id {
            None => true,
            // The replay of the gap writes it (see the module's rules).
            Some(_) if self.gap.is_some() => false,
            Some(id) if self.high.is_some_and(|h| id <= h) => false,
            Some(id) => {
                self.high = Some(id);
                true
            }
        }
    }

    /// The broker generation the session's frames come from.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The id to replay after, if a gap is pending.
    pub(super) fn pending_gap(&self) -> Option<Option<NoteId>> {
        self.gap
    }

    /// The gap is being replayed (if that fails, [`Resume::reopen_gap`] puts it back).
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
        // Subscription lost and restored: 4 and 5 were missed, 6 arrives live first and waits
        // for the replay of the gap, which writes 4, 5 and 6 in order.
        assert!(!r.admit_live(Some(id(6)), 3));
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

    #[test]
    fn an_interruption_opens_a_gap_from_the_high_mark_without_a_new_generation() {
        let mut r = Resume::new(4);
        assert!(r.admit_live(Some(id(3)), 4));
        r.interrupt();
        assert_eq!(r.pending_gap(), Some(Some(id(3))));
        assert!(!r.admit_live(Some(id(7)), 4), "a persisted frame waits for the gap's replay");
        assert!(r.admit_live(None, 4), "frames without an id still pass");
        r.interrupt();
        assert_eq!(r.pending_gap(), Some(Some(id(3))), "the first base is kept until filled");
    }

    #[test]
    fn no_persisted_frame_newer_than_a_pending_gap_is_written() {
        let mut r = Resume::new(1);
        assert!(r.admit_live(Some(id(2)), 1));
        r.interrupt();
        for n in 3..10 {
            assert!(!r.admit_live(Some(id(n)), 1), "{n} arrived live while the gap after 2 is pending");
        }
        // The replay fails: the gap stays, and so does the rule.
        r.gap_filled();
        r.reopen_gap(Some(id(2)));
        assert!(!r.admit_live(Some(id(10)), 1));
        // The replay writes 3..=10; live duplicates of it are skipped, newer ones pass.
        r.gap_filled();
        r.advance(id(10));
        assert!(!r.admit_live(Some(id(10)), 1));
        assert!(r.admit_live(Some(id(11)), 1));
    }
}
