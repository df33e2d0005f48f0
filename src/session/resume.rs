//! What a session remembers to deliver persisted notifications at least once, without gaps:
//! the highest inbox id it wrote (`high`), the broker subscription generation its live frames
//! come from, and, after a broker gap, the id to replay from.
//!
//! Rules, which the tests hold it to:
//! - a live persisted notification at or below `high` was already written (by a replay): skip;
//! - a live frame from a newer generation, a generation change, or an interruption of the
//!   session's own channel means the subscription was lost in between: everything after `high`
//!   as it was then must be replayed from the inbox once the channel is subscribed again;
//! - a replay writes every id after its base, even below `high` (those are the gap), except the
//!   ones written live while the gap was pending (the new subscription can deliver before the
//!   replay runs); past [`LIVE_DURING_GAP`] of those, duplicates are possible (ids tell).

use crate::protocol::NoteId;

/// Live persisted ids remembered while a gap is pending, so the replay skips them. A bound, not
/// a target: a gap is normally replayed within a second, before many arrive.
const LIVE_DURING_GAP: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Resume {
    /// Highest persisted id written to this client.
    high: Option<NoteId>,
    /// Generation of the subscription the session's frames come from.
    generation: u64,
    /// A gap to replay: everything after this id (`None` inside: from the oldest).
    gap: Option<Option<NoteId>>,
    /// Persisted ids written live while the gap was pending (at most [`LIVE_DURING_GAP`]).
    live_during_gap: Vec<NoteId>,
}

impl Resume {
    pub(super) fn new(generation: u64) -> Self {
        Self { high: None, generation, gap: None, live_during_gap: Vec::new() }
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
            Some(id) if self.high.is_some_and(|h| id <= h) => false,
            Some(id) => {
                self.high = Some(id);
                if self.gap.is_some() && self.live_during_gap.len() < LIVE_DURING_GAP {
                    self.live_during_gap.push(id);
                }
                true
            }
        }
    }

    /// The id to replay after, if a gap is pending.
    pub(super) fn pending_gap(&self) -> Option<Option<NoteId>> {
        self.gap
    }

    /// The gap is being replayed: returns the ids already written live meanwhile, which the
    /// replay skips.
    pub(super) fn gap_filled(&mut self) -> Vec<NoteId> {
        self.gap = None;
        std::mem::take(&mut self.live_during_gap)
    }

    /// A replay that was to skip `written` could not be done: they stay skipped for the retry.
    pub(super) fn still_written(&mut self, written: &[NoteId]) {
        let room = LIVE_DURING_GAP.saturating_sub(self.live_during_gap.len());
        self.live_during_gap.extend(written.iter().take(room));
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

    #[test]
    fn an_interruption_opens_a_gap_from_the_high_mark_without_a_new_generation() {
        let mut r = Resume::new(4);
        assert!(r.admit_live(Some(id(3)), 4));
        r.interrupt();
        assert_eq!(r.pending_gap(), Some(Some(id(3))));
        assert!(r.admit_live(Some(id(7)), 4), "frames of the same generation still pass");
        r.interrupt();
        assert_eq!(r.pending_gap(), Some(Some(id(3))), "the first base is kept until filled");
    }

    #[test]
    fn ids_written_live_while_a_gap_is_pending_are_not_replayed_again() {
        let mut r = Resume::new(1);
        assert!(r.admit_live(Some(id(2)), 1));
        r.interrupt();
        // The new subscription delivers 5 before the replay of the gap after 2 runs.
        assert!(r.admit_live(Some(id(5)), 1));
        assert_eq!(r.pending_gap(), Some(Some(id(2))));
        assert_eq!(r.gap_filled(), vec![id(5)], "the replay must skip 5");
        assert!(r.admit_live(Some(id(6)), 1));
        r.interrupt();
        assert_eq!(r.gap_filled(), Vec::<NoteId>::new(), "a new gap starts with nothing to skip");
    }
}
