//! The bounded queue between fan-out and one session's socket writer.
//!
//! Fan-out pushes without ever waiting ([`Outbox::push`]); the session's writer drains it in
//! batches. When the queue is full the pusher closes the session as a slow consumer instead of
//! waiting: one client that stops reading never slows the others or the broker reader.
//!
//! A session parked with nothing queued opens its outbox to fan-out's direct writes
//! ([`Outbox::open_direct`]): then [`Outbox::offer`] writes a frame straight into the socket
//! when the socket takes it at once, and the session's task is not woken at all. Anything else
//! (a queue that is not empty, a session busy with its own writes, a full socket, a frame the
//! session must look at first) is queued, so frames still leave in the order fan-out handed
//! them over.
//!
//! An idle outbox allocates nothing beyond its handle: the queue starts empty and every drain
//! takes its memory with the frames, which matters at tens of thousands of idle connections per
//! node (a queue kept at the size of its largest burst was ~300 bytes per session on average in
//! a soak, and grew for as long as sessions met larger bursts).

use std::collections::VecDeque;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;

use crate::protocol::{CloseReason, NoteId, WireFrame};
use crate::wire::{Sent, Wire};

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
    /// Set while the session is parked with nothing in flight: which frames fan-out may write
    /// itself. Cleared whenever the session takes frames or wakes for anything else.
    direct: Option<Direct>,
}

/// Which frames fan-out may write straight into a parked session's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    /// Frames from at most this broker generation: a newer one means a gap the session must
    /// see before anything else is written.
    pub generation: u64,
    /// Whether persisted notifications may go too (not when the session de-duplicates them by
    /// id: it must see each one).
    pub persisted: bool,
}

impl Direct {
    /// Any frame (a session that neither resumes nor de-duplicates).
    pub const ANY: Self = Self { generation: u64::MAX, persisted: true };

    fn admits(self, out: &Outgoing) -> bool {
        out.generation <= self.generation && (self.persisted || out.persisted.is_none())
    }
}

/// How [`Outbox::offer`] handed a frame over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handed {
    /// Written into the socket (whole, or its rest left for the session's next flush).
    Written,
    /// Queued for the session's task.
    Queued,
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
        self.push_locked(self.state(), frame)
    }

    /// Hands `frame` to the session: written straight into `wire` if the session is parked
    /// with nothing queued, admits the frame ([`Direct`]) and the socket takes it now; queued as
    /// by [`Outbox::push`] otherwise. Never waits.
    ///
    /// The outbox's lock is held over the write, so the session cannot take frames (and write
    /// them) while fan-out writes: order is kept.
    pub fn offer(&self, frame: Outgoing, wire: &Wire) -> Result<Handed, PushError> {
        let mut state = self.state();
        if let Some(direct) = state.direct
            && state.frames.is_empty()
            && direct.admits(&frame)
        {
            match wire.try_frame(&frame.frame) {
                Sent::All => return Ok(Handed::Written),
                Sent::Part => {
                    // The session must send the rest before anything else: wake it, and write
                    // nothing more until it parks again.
                    state.direct = None;
                    drop(state);
                    self.ready.notify_one();
                    return Ok(Handed::Written);
                }
                Sent::Nothing => {}
            }
        }
        self.push_locked(state, frame).map(|()| Handed::Queued)
    }

    fn push_locked(&self, mut state: MutexGuard<'_, State>, frame: Outgoing) -> Result<(), PushError> {
        if state.closing.is_some() {
            return Err(PushError::Closed);
        }
        if state.frames.len() >= self.capacity {
            state.closing = Some(CloseReason::SlowConsumer);
            state.direct = None;
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
        state.direct = None;
        drop(state);
        self.ready.notify_one();
    }

    pub fn closing(&self) -> Option<CloseReason> {
        self.state().closing
    }

    /// Wakes the writer without queueing anything (it re-checks its state: a new broker
    /// generation, an interrupted channel). Fan-out queues until it has, and parks again.
    pub fn wake(&self) {
        self.state().direct = None;
        self.ready.notify_one();
    }

    /// Waits until there is something to do: frames to write, or a close.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// The session is parked with nothing in flight: fan-out may write frames that `direct`
    /// admits itself until the session next takes frames or calls [`Outbox::shut_direct`].
    /// Refused (`false`) when frames are queued or the session is closing: it has work first.
    pub fn open_direct(&self, direct: Direct) -> bool {
        let mut state = self.state();
        let open = state.frames.is_empty() && state.closing.is_none();
        state.direct = open.then_some(direct);
        open
    }

    /// The session woke for something of its own (a client frame, a timer): frames queue
    /// until it parks again.
    pub fn shut_direct(&self) {
        self.state().direct = None;
    }

    /// Moves every queued frame into `batch` and returns the close reason if one was set. The
    /// session is busy from now on: fan-out queues until it parks again. The queue's memory goes
    /// with its frames (into an empty `batch` as it is, without a copy): most frames are written
    /// directly, so a queue is the exception, and one allocation per queued batch costs less than
    /// a queue kept per session.
    pub fn drain_into(&self, batch: &mut Vec<Outgoing>) -> Option<CloseReason> {
        let mut state = self.state();
        state.direct = None;
        let frames = std::mem::take(&mut state.frames);
        let closing = state.closing;
        drop(state);
        if batch.is_empty() {
            *batch = Vec::from(frames);
        } else {
            batch.extend(frames);
        }
        closing
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

    #[test]
    fn a_drained_queue_keeps_no_memory() {
        let outbox = Outbox::new(64);
        for burst in [1, 3, 16, 40] {
            for _ in 0..burst {
                outbox.push(frame()).unwrap();
            }
            assert!(outbox.state().frames.capacity() >= burst);
            let mut batch = Vec::new();
            assert_eq!(outbox.drain_into(&mut batch), None);
            assert_eq!(batch.len(), burst);
            assert_eq!(outbox.state().frames.capacity(), 0, "after a burst of {burst}");
        }
    }

    /// A wire over a real loopback socket, and the peer's end to read what reached it.
    async fn wire() -> (std::sync::Arc<Wire>, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (Wire::new(accepted.unwrap().0), client.unwrap())
    }

    fn live(generation: u64, persisted: Option<u64>) -> Outgoing {
        Outgoing {
            frame: WireFrame::text("{}".to_owned()),
            published_us: 1,
            persisted: persisted.map(|ms| NoteId { ms, seq: 0 }),
            generation,
        }
    }

    #[tokio::test]
    async fn a_parked_session_has_frames_written_for_it_and_a_busy_one_has_them_queued() {
        let (wire, mut peer) = wire().await;
        let outbox = Outbox::new(8);
        assert_eq!(outbox.offer(live(1, None), &wire), Ok(Handed::Queued), "not parked yet");
        assert!(!outbox.open_direct(Direct::ANY), "frames are queued: the session writes them first");
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        assert!(outbox.open_direct(Direct::ANY));
        assert_eq!(outbox.offer(live(1, None), &wire), Ok(Handed::Written));
        assert_eq!(outbox.offer(live(1, Some(5)), &wire), Ok(Handed::Written));
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got).await.unwrap();
        assert_eq!(&got, &[0x81, 2, b'{', b'}'], "a whole text frame");
        // Taking frames, or waking for anything else, ends it until the session parks again.
        outbox.wake();
        assert_eq!(outbox.offer(live(1, None), &wire), Ok(Handed::Queued), "woken to re-check its state");
        outbox.drain_into(&mut batch);
        assert!(outbox.open_direct(Direct::ANY));
        outbox.shut_direct();
        assert_eq!(outbox.offer(live(1, None), &wire), Ok(Handed::Queued));
        assert!(!outbox.open_direct(Direct::ANY), "the queued frame goes first");
        outbox.close(CloseReason::Normal);
        assert_eq!(outbox.offer(live(1, None), &wire), Err(PushError::Closed), "closing: neither");
        assert!(!outbox.open_direct(Direct::ANY));
    }

    #[tokio::test]
    async fn frames_the_session_must_see_are_queued_even_when_it_is_parked() {
        let (wire, _peer) = wire().await;
        let outbox = Outbox::new(8);
        let resuming = Direct { generation: 3, persisted: false };
        assert!(outbox.open_direct(resuming));
        assert_eq!(outbox.offer(live(3, Some(7)), &wire), Ok(Handed::Queued), "an inbox id to de-duplicate by");
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        assert!(outbox.open_direct(resuming));
        assert_eq!(outbox.offer(live(4, None), &wire), Ok(Handed::Queued), "a new generation: a gap to replay");
        outbox.drain_into(&mut batch);
        assert!(outbox.open_direct(resuming));
        assert_eq!(outbox.offer(live(3, None), &wire), Ok(Handed::Written));
        assert_eq!(outbox.offer(live(0, None), &wire), Ok(Handed::Written), "a topic's frame");
        // Once one frame is queued, later ones queue behind it: order is kept.
        assert_eq!(outbox.offer(live(4, None), &wire), Ok(Handed::Queued));
        assert_eq!(outbox.offer(live(3, None), &wire), Ok(Handed::Queued));
        assert_eq!(outbox.len(), 2);
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
