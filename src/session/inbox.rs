//! The inbox side of a session: the welcome with the unread count, the replay of what the
//! client has not seen, gap resyncs after a broker interruption, and `read` frames.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::resume::Resume;
use super::{RESYNC_RECHECK, RESYNC_SPREAD, Session};
use crate::inbox::{InboxState, ReadScope, ScopeError};
use crate::metrics as m;
use crate::outbox::Outgoing;
use crate::protocol::{CloseReason, ErrorCode, Format, NoteId, PROTOCOL_VERSION, ServerFrame, encode_stored};

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Whether this session replays from the inbox and tracks broker gaps: JSON sessions on a
    /// node with an inbox. Raw sessions get live payloads only, never stored frames.
    pub(super) fn resumes(&self) -> bool {
        self.ctx.inbox.is_some() && self.registration.format == Format::Json
    }

    /// Sends the welcome and, with an inbox, replays what the client has not seen: the unread
    /// notifications, or everything after its `last_id`.
    pub(super) async fn welcome(&mut self) -> Result<(), CloseReason> {
        let mut state = InboxState::default();
        if let Some(inbox) = &self.ctx.inbox {
            self.resume = Resume::new(self.ctx.hub.generation_of(&self.user_channel));
            match inbox.state(&self.identity.user).await {
                Ok(s) => state = s,
                // Live delivery still works; the gap is replayed when the inbox answers again.
                // Debug, not warn: in an outage every session says it, and the broker's own
                // warning and pushnode_inbox_errors_total already tell the operator.
                Err(e) => {
                    debug!(error = %e, "inbox unavailable at connect");
                    self.resume.reopen_gap(self.last_id);
                    self.resync_at = Some(resync_deadline());
                }
            }
        }
        let welcome = ServerFrame::Welcome {
            protocol: PROTOCOL_VERSION,
            node: self.ctx.node_id.to_string(),
            session: self.registration.id.to_string(),
            user: self.identity.user.to_string(),
            heartbeat: self.ctx.heartbeat_interval.as_secs(),
            format: self.registration.format,
            channels: self.identity.channels.clone(),
            unread: state.unread,
            last_id: state.newest.map(|id| id.to_string()),
        };
        self.send(&welcome).await?;
        if self.ctx.inbox.is_some() && self.resync_at.is_none() {
            // Without last_id: the unread ones. With it: everything after it, read or not.
            let unread_only = self.last_id.is_none();
            self.replay(self.last_id, unread_only).await?;
            if let Some(newest) = state.newest {
                self.resume.advance(newest);
            }
        }
        // The channel is not subscribed yet (Redis slow, down, or refusing the SUBSCRIBE):
        // what is published until it is gets replayed once it is.
        if self.resumes() && !self.ctx.hub.is_live(&self.user_channel) {
            self.resume.interrupt();
            self.resync_at.get_or_insert_with(resync_deadline);
        }
        Ok(())
    }

    /// Writes one page (the replay limit) of inbox notifications after `after`, and records
    /// them. A full page may not be all: the rest is a gap, replayed next (live persisted
    /// frames wait meanwhile, so the client's newest id stays a safe resume point). A failed
    /// read keeps the gap and is retried with backoff (counted in
    /// `pushnode_inbox_errors_total{operation="list"}`).
    async fn replay(&mut self, after: Option<NoteId>, unread_only: bool) -> Result<(), CloseReason> {
        let Some(inbox) = self.ctx.inbox.clone() else { return Ok(()) };
        let stored = match inbox.list(&self.identity.user, after, self.ctx.replay_limit, unread_only).await {
            Ok(stored) => stored,
            Err(e) => {
                // Retried with a doubling, jittered delay: an inbox that keeps failing (Redis
                // down, or refusing this user's read) costs one call per session per
                // RESYNC_BACKOFF_MAX, not two a second for ever.
                self.replay_failures = self.replay_failures.saturating_add(1);
                let delay = retry_delay(self.replay_failures);
                debug!(error = %e, retry_in = ?delay, "inbox replay failed");
                self.resume.reopen_gap(after);
                self.resync_at = Some(tokio::time::Instant::now() + delay);
                return Ok(());
            }
        };
        self.replay_failures = 0;
        let page_end = (stored.len() >= self.ctx.replay_limit).then(|| stored.last().map(|note| note.id)).flatten();
        let mut frames = Vec::with_capacity(stored.len());
        for note in stored {
            let frame = encode_stored(note.id, note.ts_us, note.event.as_deref(), &note.data, note.read);
            frames.push(Outgoing::control(frame));
            self.resume.advance(note.id);
        }
        metrics::counter!(m::INBOX_REPLAYED).increment(frames.len() as u64);
        self.write_frames(&mut frames).await?;
        if let Some(end) = page_end {
            // The next page right away (still bounded: one page per pass of the session loop).
            self.resume.reopen_gap(Some(end));
            self.resync_at = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// Opens a gap when the broker's generation moved past the session's, or when the session's
    /// own channel was interrupted ([`crate::hub::Hub::interrupt`]).
    pub(super) fn on_generation(&mut self, generation: u64) {
        if !self.resumes() {
            return;
        }
        let before = self.resume.pending_gap();
        self.resume.on_generation(generation);
        if self.registration.take_interrupted() {
            self.resume.interrupt();
        }
        if before.is_none() && self.resume.pending_gap().is_some() {
            self.resync_at = Some(resync_deadline());
        }
    }

    /// Replays a pending gap once the user's channel is subscribed again.
    pub(super) async fn resync(&mut self) -> Result<(), CloseReason> {
        self.resync_at = None;
        let Some(base) = self.resume.pending_gap() else { return Ok(()) };
        if !self.ctx.hub.is_live(&self.user_channel) {
            self.resync_at = Some(resync_deadline() + RESYNC_RECHECK);
            return Ok(());
        }
        self.resume.gap_filled();
        debug!(after = ?base, "replaying a gap");
        self.replay(base, false).await
    }

    pub(super) async fn mark_read(
        &mut self,
        ids: Vec<String>,
        up_to: Option<String>,
        all: bool,
    ) -> Result<(), CloseReason> {
        let Some(inbox) = self.ctx.inbox.clone() else {
            return self.reply_error(ErrorCode::Unsupported, "this session has no inbox").await;
        };
        // The frame's `ids` defaults to empty: empty means absent.
        let ids = (!ids.is_empty()).then_some(ids.as_slice());
        let scope = match ReadScope::parse(ids, up_to.as_deref(), all) {
            Ok(scope) => scope,
            Err(e @ ScopeError::BadId { .. }) => return self.reply_error(ErrorCode::BadId, e.to_string()).await,
            Err(e @ ScopeError::NotOne) => return self.reply_error(ErrorCode::BadFrame, e.to_string()).await,
        };
        // The new count reaches every session of the user (this one too) through the broker.
        match inbox.mark_read(&self.identity.user, &scope).await {
            Ok(unread) => {
                self.ctx
                    .webhooks
                    .emit("native", crate::webhooks::read_event(&self.identity.user, &scope, unread))
                    .await;
                Ok(())
            }
            Err(e) => self.reply_error(ErrorCode::InboxUnavailable, e.to_string()).await,
        }
    }
}

/// Longest wait between two replay attempts of one session.
const RESYNC_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait before retry number `failures` (1 = the first retry): [`RESYNC_SPREAD`] doubled per
/// failure up to [`RESYNC_BACKOFF_MAX`], with jitter (half to all of it).
fn retry_delay(failures: u32) -> Duration {
    let full = RESYNC_SPREAD.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RESYNC_BACKOFF_MAX);
    let half = full / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}

fn resync_deadline() -> tokio::time::Instant {
    let spread = fastrand::u64(0..=RESYNC_SPREAD.as_millis() as u64);
    tokio::time::Instant::now() + Duration::from_millis(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_retries_back_off_to_a_cap() {
        for failures in 1..40 {
            let full = RESYNC_SPREAD.saturating_mul(1 << (failures - 1).min(16)).min(RESYNC_BACKOFF_MAX);
            let delay = retry_delay(failures);
            assert!(delay >= full / 2 && delay <= full, "{failures}: {delay:?}");
        }
        assert!(retry_delay(1) <= RESYNC_SPREAD);
        assert!(retry_delay(30) >= RESYNC_BACKOFF_MAX / 2);
    }
}
