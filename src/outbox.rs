//! The bounded queue between fan-out and one session's socket writer.
//!
//! Fan-out pushes without ever waiting ([`Outbox::push`]); the session's writer drains it in
//! batches. When the queue is full the pusher closes the session as a slow consumer instead of
//! waiting: one client that stops reading never slows the others or the broker reader.
//!
//! An idle outbox allocates nothing beyond its handle (the `VecDeque` starts empty and is shrunk
//! after a burst), which matters at tens of thousands of idle connections per node.

use std::collections::VecDeque;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::protocol::{CloseReason, NoteId, WireFrame};

/// Capacity above which a drained queue gives its memory back.
const SHRINK_ABOVE: usize = 16;

/// A frame waiting for the socket, with the publish time its delivery latency is measured from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub frame: WireFrame,
    /// Publish time, microseconds since the Unix epoch; 0 for frames that are not notifications.
    pub published_us: u64,
    /// Inbox id of a persisted notification (the session de-duplicates by it).
    pub persisted: Option<NoteId>,
    /// The broker subscription generation it arrived on, for a user channel's frames (see
    /// [`crate::hub::Hub::generation_of`]); 0 for others.
    pub generation: u64,
}

impl Outgoing {
    /// A frame that is not a live notification (a ping, a replayed one): no publish time to
    /// measure latency from, no id to de-duplicate live frames by, no generation.
    pub fn control(frame: WireFrame) -> Self {
        Self { frame, published_us: 0, persisted: None, generation: 0 }
    }
}

#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    ready: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Outgoing>,
    closing: Option<CloseReason>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue was full; the session is now closing as a slow consumer.
    Full,
    /// The session is already closing.
    Closed,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self { state: Mutex::new(State::default()), ready: Notify::new(), capacity: capacity.max(1) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Queues a frame without waiting. On a full queue the session is marked closing as a slow
    /// consumer and its queued frames are dropped (it resumes from its last id on reconnect).
    pub fn push(&self, frame: Outgoing) -> Result<(), PushError> {
        let mut state = self.state();
        if state.closing.is_some() {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.capacity {
            state.closing = Some(CloseReason::SlowConsumer);
            state.frames = VecDeque::new();
            drop(state);
            self.ready.notify_one();
            return Err(PushError::Full);
        }
        state.frames.push_back(frame);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Asks the session to close with `reason`. The first reason wins; frames already queued are
    /// still written before the close frame, except after a slow-consumer close.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.state();
        if state.closing.is_none() {
            state.closing = Some(reason);
        }
        drop(state);
        self.ready.notify_one();
    }

    pub fn closing(&self) -> Option<CloseReason> {
        self.state().closing
    }

    /// Wakes the writer without queueing anything (it re-checks its state).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Waits until there is something to do: frames to write, or a close.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Moves every queued frame into `batch` and returns the close reason if one was set.
    pub fn drain_into(&self, batch: &mut Vec<Outgoing>) -> Option<CloseReason> {
        let mut state = self.state();
        batch.extend(state.frames.drain(..));
        if state.frames.capacity() > SHRINK_ABOVE {
            state.frames = VecDeque::new();
        }
        state.closing
    }

    pub fn len(&self) -> usize {
        self.state().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Outgoing {
        Outgoing::control(WireFrame::text("{}".to_owned()))
    }

    #[test]
    fn a_full_outbox_closes_as_slow_consumer_and_drops_its_frames() {
        let outbox = Outbox::new(2);
        assert_eq!(outbox.push(frame()), Ok(()));
        assert_eq!(outbox.push(frame()), Ok(()));
        assert_eq!(outbox.push(frame()), Err(PushError::Full));
        assert_eq!(outbox.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(outbox.len(), 0);
        assert_eq!(outbox.push(frame()), Err(PushError::Closed));
    }

    #[test]
    fn first_close_reason_wins_and_queued_frames_still_drain() {
        let outbox = Outbox::new(8);
        outbox.push(frame()).unwrap();
        outbox.close(CloseReason::HeartbeatTimeout);
        outbox.close(CloseReason::Normal);
        let mut batch = Vec::new();
        assert_eq!(outbox.drain_into(&mut batch), Some(CloseReason::HeartbeatTimeout));
        assert_eq!(batch.len(), 1);
    }

    #[tokio::test]
    async fn push_wakes_a_waiting_writer() {
        let outbox = std::sync::Arc::new(Outbox::new(8));
        let waiter = tokio::spawn({
            let outbox = outbox.clone();
            async move {
                outbox.ready().await;
                let mut batch = Vec::new();
                outbox.drain_into(&mut batch);
                batch.len()
            }
        });
        outbox.push(frame()).unwrap();
        assert_eq!(tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.unwrap().unwrap(), 1);
    }
}
