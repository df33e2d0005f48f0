//! `Session`: one WebSocket connection, from the first frame after the 101 to the close.
//!
//! A session is one task that owns its socket. It waits on two things at once: its [`Outbox`]
//! (frames queued by fan-out, heartbeat pings, close requests) and the client's frames. It
//! writes queued frames in batches (one flush per batch) and answers client frames. Every
//! write has a timeout, and a write stalled by a client that stopped reading is abandoned as
//! soon as fan-out marks the outbox closing. There is no timer per connection: the node's
//! heartbeat sweep ([`crate::hub::heartbeat::sweep`]) queues pings and closes sessions that
//! stay silent.
//!
//! The session's place in the [`Hub`] is a [`Registration`] guard that also records the
//! channels it joins: dropping it leaves them all and unregisters, so no exit path (an early
//! return, a panic, a task dropped unpolled) leaves the session behind. It never touches the
//! broker (the hub reports interest changes to it).
//!
//! With an inbox (JSON sessions), the session subscribes first, then replays from the inbox
//! (unread notifications, or everything after the client's `last_id`), then goes live,
//! de-duplicating by id ([`resume`]). When the broker's subscription was interrupted it replays
//! the gap once the channel is subscribed again.

mod inbox;
mod meter;
mod pusher;
mod rate;
mod resume;

pub use self::meter::{FrameFlood, Metered};

/// Test-only behaviour, compiled in with the `test-hooks` feature (the test suite enables it;
/// release builds never have it).
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    /// Subscribing to this topic panics the session task, so a test can show that nothing of
    /// the session stays behind in the hub, the broker or the per-user limit.
    pub const PANIC_TOPIC: &str = "test-hook.panic";
    /// A session of a user whose id starts with this starts 300 ms after its upgrade, which
    /// widens the window between the per-user limit's check at the upgrade and the session's
    /// registration, so a test can race two connects into it (close code 4004).
    pub const SLOW_START_USER: &str = "test-hook.slow-start";
}

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{Instrument, debug, info_span, trace};

use self::pusher::PusherSession;
use self::resume::Resume;
use crate::auth::Identity;
use crate::broker::Broker;
use crate::channel::{ChannelKind, ChannelNames, granted, valid_name};
use crate::hub::{Hub, LocalSession, Registration, TooManySessions};
use crate::inbox::Inbox;
use crate::metrics as m;
use crate::outbox::{Direct, Outbox, Outgoing};
use crate::presence::Presence;
use crate::protocol::{ClientFrame, CloseReason, ErrorCode, Format, NoteId, ServerFrame, WireFrame, now_micros};
use crate::pusher::{AppSlot, Apps};
use crate::settings::Settings;
use crate::webhooks::Webhooks;
use crate::wire::{MAX_HEADER, Wire, put_frame};

/// How long a close frame may take to leave before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// After a broker gap, sessions replay at a random moment within this window, so that a node
/// with many sessions does not query the inbox for all of them at once.
const RESYNC_SPREAD: Duration = Duration::from_millis(500);
/// While a gap waits for the channel to be subscribed again, check this often (plus up to
/// [`RESYNC_SPREAD`]). Every waiting session has this timer: during a Redis outage that is
/// every JSON session of the node, so it is not short. Live frames arriving once the channel
/// is back trigger the replay at once anyway.
const RESYNC_RECHECK: Duration = Duration::from_millis(500);

/// The node's parts a session uses beside the hub and the inbox (the Pusher front end's, and
/// the webhooks').
#[derive(Debug)]
pub struct Services {
    pub apps: Apps,
    pub broker: Broker,
    pub presence: Presence,
    pub occupancy: Presence,
    pub webhooks: Webhooks,
}

/// What every session of a node shares: settings, the hub, channel naming, metric handles.
#[derive(Debug)]
pub struct SessionContext {
    pub hub: Hub,
    pub names: ChannelNames,
    pub node_id: Arc<str>,
    heartbeat_interval: Duration,
    write_timeout: Duration,
    /// A batch's frames are written in pieces of about this many bytes.
    write_buffer_bytes: usize,
    outbox_capacity: usize,
    max_per_user: usize,
    max_topics: usize,
    subscribe_wait: Duration,
    inbox: Option<Inbox>,
    replay_limit: usize,
    /// The Pusher front end's apps, and the broker its client events are published on.
    apps: Apps,
    broker: Broker,
    presence: Presence,
    occupancy: Presence,
    webhooks: Webhooks,
    delivered: metrics::Counter,
    latency: metrics::Histogram,
}

impl SessionContext {
    pub fn new(settings: &Settings, hub: Hub, names: ChannelNames, inbox: Option<Inbox>, services: Services) -> Self {
        let Services { apps, broker, presence, occupancy, webhooks } = services;
        Self {
            node_id: hub.node_id().into(),
            hub,
            names,
            heartbeat_interval: settings.session.heartbeat_interval,
            write_timeout: settings.session.write_timeout,
            write_buffer_bytes: settings.session.write_buffer_bytes,
            outbox_capacity: settings.session.outbox_capacity,
            max_per_user: settings.limits.max_connections_per_user,
            max_topics: settings.limits.max_topics_per_session,
            subscribe_wait: settings.broker.subscribe_wait,
            inbox,
            replay_limit: settings.inbox.replay_limit,
            apps,
            broker,
            presence,
            occupancy,
            webhooks,
            delivered: metrics::counter!(m::MESSAGES_DELIVERED),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }
}

/// Runs one session to its end. `ws` has completed the handshake; `identity` was
/// authenticated before it. `last_id` is the newest inbox id the client already has.
///
/// Not an `async fn`: the session is built first and the returned future owns it in place, so
/// the socket is not stored twice in the task (the future's size is the per-connection cost).
///
/// `wire` is the socket under `ws`: fan-out writes frames into it itself while the session is
/// parked (see [`crate::wire`]).
pub fn run<S>(
    ws: WebSocketStream<S>,
    wire: Arc<Wire>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    format: Format,
    last_id: Option<NoteId>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    start(ws, wire, ctx, identity, format, last_id, None)
}

/// Runs one Pusher protocol session of the app holding `app` to its end. The socket has no
/// user (the hub does not count it as one) until it signs in.
pub fn run_pusher<S>(
    ws: WebSocketStream<S>,
    wire: Arc<Wire>,
    ctx: Arc<SessionContext>,
    app: AppSlot,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let identity = Identity { user: "".into(), channels: Vec::new() };
    start(ws, wire, ctx, identity, Format::Pusher, None, Some(app))
}

/// Refuses a Pusher connection after its upgrade, the way pusher-js understands: a
/// `pusher:error` with the code, then the close frame with it (4001 unknown app: pusher-js
/// gives up; 4100 over capacity: it retries after a back-off).
pub async fn refuse_pusher<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocketStream<S>, reason: CloseReason) {
    metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    // Boxed: the connection task holds this future or a session's, whichever is larger, for
    // the connection's whole life, and the close (its linger buffer) is larger than a session.
    Box::pin(close(&mut ws, reason, Format::Pusher)).await;
}

fn start<S>(
    ws: WebSocketStream<S>,
    wire: Arc<Wire>,
    ctx: Arc<SessionContext>,
    identity: Identity,
    format: Format,
    last_id: Option<NoteId>,
    app: Option<AppSlot>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let local = Arc::new(
        LocalSession::new(ctx.hub.next_session_id(), identity.user.clone(), format, Outbox::new(ctx.outbox_capacity))
            .with_wire(wire),
    );
    let pusher = app.map(|app| Box::new(PusherSession::new(app)));
    let span = info_span!("session", id = local.id, user = %identity.user);
    // Registered here, before the task first runs: the guard is in the hub's books from now
    // on, and whatever becomes of the task (it ends, panics, or is dropped unpolled) dropping
    // the guard takes the session out again.
    let mut session = match ctx.hub.register(local, ctx.max_per_user) {
        Ok(registration) => Ok(Session {
            ws,
            user_channel: ctx.names.user(&identity.user),
            ctx,
            registration,
            identity,
            batch: Vec::new(),
            resume: Resume::default(),
            resync_at: None,
            last_id,
            replay_failures: 0,
            pusher,
        }),
        Err(TooManySessions) => Err(ws),
    };
    async move {
        // Borrowed, not moved out: a binding moved out of `session` would be a second copy of
        // the session in this future, whose size every connection pays (~900 bytes).
        let reason = match &mut session {
            Ok(session) => session.run().await,
            Err(ws) => {
                // Raced past the pre-upgrade check; refuse with a close code instead.
                Box::pin(close(ws, CloseReason::TooManyConnections, format)).await;
                CloseReason::TooManyConnections
            }
        };
        debug!(reason = reason.label(), "session closed");
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    }
    .instrument(span)
}

struct Session<S> {
    ws: WebSocketStream<S>,
    ctx: Arc<SessionContext>,
    /// This session in the hub, and the channels it joined: dropped with the session.
    registration: Registration,
    identity: Identity,
    user_channel: Arc<str>,
    /// The frames taken from the outbox, until they are written. Allocated per batch and let
    /// go after it: kept, it would hold the size of the session's largest batch for good.
    batch: Vec<Outgoing>,
    resume: Resume,
    /// When to replay a pending gap.
    resync_at: Option<tokio::time::Instant>,
    /// The client's `last_id` at connect.
    last_id: Option<NoteId>,
    /// Inbox replays that failed in a row (for the retry backoff).
    replay_failures: u32,
    /// Pusher sessions only.
    pusher: Option<Box<PusherSession>>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Serves the session and closes it. Leaving the hub is the registration's job, done
    /// when the session is dropped.
    async fn run(&mut self) -> CloseReason {
        metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
        if self.pusher.is_none() {
            self.registration.join_user(self.user_channel.clone());
            // The welcome means "what is published from now on reaches you": wait (bounded)
            // for the broker to confirm the subscription. Frames queued meanwhile are kept.
            self.ctx.hub.wait_live(&self.user_channel, self.ctx.subscribe_wait).await;
        }

        let reason = self.serve().await;
        Box::pin(close(&mut self.ws, reason, self.registration.format)).await;
        reason
    }

    async fn serve(&mut self) -> CloseReason {
        let greeted = match self.registration.format {
            Format::Json => Box::pin(self.welcome()).await,
            Format::Pusher => Box::pin(self.connection_established()).await,
            Format::Raw => Ok(()),
        };
        if let Err(reason) = greeted {
            return reason;
        }

        loop {
            // Drain before waiting: a wake-up may have been consumed while a write was stalled.
            if let Some(reason) = self.registration.outbox.drain_into(&mut self.batch) {
                if reason == CloseReason::SlowConsumer {
                    self.batch.clear();
                    return reason;
                }
                // Queued frames still go out before the close frame.
                return Box::pin(self.write_batch()).await.err().unwrap_or(reason);
            }
            // A frame fan-out wrote in part has its rest sent by the flush of an empty batch.
            if !self.batch.is_empty() || self.registration.wire().is_some_and(|wire| wire.has_tail()) {
                if let Err(reason) = Box::pin(self.write_batch()).await {
                    return reason;
                }
                continue;
            }

            // The hub wakes every session when the broker's subscription generation changes.
            if self.resumes() {
                self.on_generation(self.ctx.hub.generation_of(&self.user_channel));
            }
            // Parking with nothing in flight: fan-out may write the next frames itself (no
            // wake-up), unless one was queued in the meantime.
            if let Some(direct) = self.direct() {
                if let Some(wire) = self.registration.wire() {
                    wire.parked();
                }
                if !self.registration.outbox.open_direct(direct) {
                    continue;
                }
            }
            // The resync timer only exists while a gap is pending (boxed: most sessions never
            // have one, and the session future stays small).
            let mut resync_timer = self.resync_at.map(|at| Box::pin(sleep_until(at)));
            tokio::select! {
                () = self.registration.outbox.ready() => {}
                () = async { if let Some(t) = resync_timer.as_mut() { t.await } }, if resync_timer.is_some() => {
                    self.registration.outbox.shut_direct();
                    if let Err(reason) = Box::pin(self.resync()).await {
                        return reason;
                    }
                }
                incoming = self.ws.next() => {
                    // What the session writes now (a reply, a replay) goes out in its order:
                    // live frames queue meanwhile.
                    self.registration.outbox.shut_direct();
                    self.registration.liveness.heard();
                    match incoming {
                        Some(Ok(message)) => {
                            // Client frames are rare: their handling lives on the heap.
                            if let Err(reason) = Box::pin(self.on_message(message)).await {
                                return reason;
                            }
                        }
                        Some(Err(e)) => return read_error(&e),
                        None => return CloseReason::Gone,
                    }
                }
            }
        }
    }

    /// Which frames fan-out may write itself while the session is parked: any, unless the
    /// session replays and de-duplicates persisted notifications. Then only frames without an
    /// inbox id, from the broker generation it has seen, and none while a gap waits for its
    /// replay (a live frame is what triggers that replay).
    fn direct(&self) -> Option<Direct> {
        if !self.resumes() {
            return Some(Direct::ANY);
        }
        if self.resume.pending_gap().is_some() {
            return None;
        }
        Some(Direct { generation: self.resume.generation(), persisted: false })
    }

    /// Handles one client message. `Err` ends the session with that reason.
    async fn on_message(&mut self, message: Message) -> Result<(), CloseReason> {
        match message {
            // Every frame, of any kind, was counted against the frame budget as it arrived
            // ([`Metered`]).
            Message::Text(text) if self.pusher.is_some() => self.on_pusher_text(&text).await,
            Message::Text(text) => self.on_text(&text).await,
            Message::Binary(_) if self.pusher.is_some() => {
                self.pusher_error(None, "binary frames are not part of the protocol").await
            }
            Message::Binary(_) => {
                self.reply_error(ErrorCode::Unsupported, "binary frames are not part of the protocol").await
            }
            // tungstenite answers pings itself; any frame counts as a sign of life.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
            Message::Close(_) => Err(CloseReason::Normal),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), CloseReason> {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => return self.reply_error(ErrorCode::BadFrame, e.to_string()).await,
        };
        trace!(?frame, "client frame");
        match frame {
            ClientFrame::Ping {} => self.send(&ServerFrame::Pong {}).await,
            ClientFrame::Subscribe { channel } => self.subscribe(channel).await,
            ClientFrame::Read { ids, up_to, all } => self.mark_read(ids, up_to, all).await,
            ClientFrame::Unsubscribe { channel } => {
                self.registration.leave_topic(&channel);
                // Unsubscribing from a channel one is not in is not an error: the end state holds.
                self.send(&ServerFrame::Unsubscribed { channel }).await
            }
        }
    }

    async fn subscribe(&mut self, topic: String) -> Result<(), CloseReason> {
        if !valid_name(&topic) {
            return self.reply_error(ErrorCode::BadChannel, "invalid channel name").await;
        }
        if !granted(&self.identity.channels, &topic) {
            return self.reply_error(ErrorCode::NotAllowed, format!("token does not grant {topic:?}")).await;
        }
        #[cfg(feature = "test-hooks")]
        if topic == test_hooks::PANIC_TOPIC {
            panic!("session task panics on purpose (test hook)");
        }
        if !self.registration.has_topic(&topic) {
            if self.registration.topic_count() >= self.ctx.max_topics {
                return self.reply_error(ErrorCode::TooManyChannels, "topic channel limit reached").await;
            }
            let topic: Arc<str> = topic.as_str().into();
            let channel = self.ctx.names.topic(&topic);
            // Settings validation rules this out; kept so that no grant and no setting change
            // can ever subscribe a session to another user's channel.
            if matches!(self.ctx.names.parse(&channel), Some(ChannelKind::User(_))) {
                return self.reply_error(ErrorCode::NotAllowed, "channel is a user's channel").await;
            }
            self.registration.join_topic(channel.clone(), topic);
            self.ctx.hub.wait_live(&channel, self.ctx.subscribe_wait).await;
        }
        self.send(&ServerFrame::Subscribed { channel: topic }).await
    }

    async fn reply_error(&mut self, code: ErrorCode, message: impl Into<String>) -> Result<(), CloseReason> {
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.label()).increment(1);
        self.send(&ServerFrame::error(code, message)).await
    }

    async fn send(&mut self, frame: &ServerFrame) -> Result<(), CloseReason> {
        self.write(Message::Text(frame.encode().into())).await
    }

    /// Writes one control or reply message, bounded by the write timeout.
    async fn write(&mut self, message: Message) -> Result<(), CloseReason> {
        let mut frame = Vec::new();
        match &message {
            Message::Text(text) => put_frame(&mut frame, OpCode::Data(Data::Text), text.as_bytes()),
            Message::Binary(bytes) => put_frame(&mut frame, OpCode::Data(Data::Binary), bytes),
            _ => {}
        }
        let written = if frame.is_empty() {
            timeout(self.ctx.write_timeout, self.ws.send(message)).await
        } else {
            timeout(self.ctx.write_timeout, write_encoded(&mut self.ws, &frame)).await
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(CloseReason::WriteFailed),
        }
    }

    /// Writes the queued live frames. Frames from a new broker subscription mean a gap: it is
    /// replayed from the inbox first, so the client sees persisted ids in order and its
    /// `last_id` is always safe to resume from.
    async fn write_batch(&mut self) -> Result<(), CloseReason> {
        if self.resumes() {
            if let Some(newest) = self.batch.iter().map(|o| o.generation).max() {
                self.on_generation(newest);
            }
            // Replayed at once when the channel is back, unless replays have been failing:
            // then the retry waits for its backoff (live persisted frames wait with it).
            let retry_due =
                self.replay_failures == 0 || self.resync_at.is_none_or(|at| at <= tokio::time::Instant::now());
            if self.resume.pending_gap().is_some() && retry_due && self.ctx.hub.is_live(&self.user_channel) {
                self.resync().await?;
            }
            let resume = &mut self.resume;
            self.batch.retain(|out| resume.admit_live(out.persisted, out.generation));
        }
        let mut batch = std::mem::take(&mut self.batch);
        self.write_frames(&mut batch).await
    }

    /// Writes `frames` with one flush. Gives up on the write timeout, or as soon as fan-out
    /// marks the outbox closing (a client that stopped reading would otherwise hold this task
    /// until the timeout).
    ///
    /// Most batches fit in the socket's send buffer and finish on their first poll; only a
    /// write that has to wait arms the timeout and the closing watch (a timer and a waiter
    /// registration saved per delivery).
    async fn write_frames(&mut self, frames: &mut Vec<Outgoing>) -> Result<(), CloseReason> {
        let Self { ws, registration, ctx, .. } = self;
        let format = registration.format;
        let count = frames.len();
        let newest_ts = frames.iter().map(|out| out.published_us).max().unwrap_or(0);
        let chunk = ctx.write_buffer_bytes;
        let write = async {
            // Gathered into one buffer for this batch, written every `chunk` bytes.
            let size: usize = frames.iter().map(|out| out.frame.len() + MAX_HEADER).sum();
            let mut bytes = Vec::with_capacity(size.min(chunk));
            for out in frames.drain(..) {
                let (opcode, payload): (_, &[u8]) = match &out.frame {
                    WireFrame::Text(text) => (OpCode::Data(Data::Text), text.as_bytes()),
                    WireFrame::Binary(payload) => (OpCode::Data(Data::Binary), payload),
                    // pusher-js cannot see WebSocket pings; it answers this one with pusher:pong.
                    WireFrame::Ping if format == Format::Pusher => {
                        (OpCode::Data(Data::Text), crate::protocol::pusher::PING.as_bytes())
                    }
                    WireFrame::Ping => (OpCode::Control(Control::Ping), &[]),
                };
                put_frame(&mut bytes, opcode, payload);
                if bytes.len() >= chunk {
                    write_encoded(ws, &bytes).await?;
                    bytes.clear();
                }
            }
            if !bytes.is_empty() {
                write_encoded(ws, &bytes).await?;
            }
            // Sends the rest of a frame fan-out wrote in part, if nothing else did.
            ws.flush().await
        };
        let mut write = std::pin::pin!(write);
        let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
        match first {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Err(CloseReason::WriteFailed),
            Poll::Pending => {
                let closed = async {
                    loop {
                        registration.outbox.ready().await;
                        if let Some(reason) = registration.outbox.closing() {
                            break reason;
                        }
                    }
                };
                tokio::select! {
                    result = timeout(ctx.write_timeout, write) => match result {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return Err(CloseReason::WriteFailed),
                    },
                    reason = closed => return Err(reason),
                }
            }
        }
        ctx.delivered.increment(count as u64);
        if newest_ts > 0 {
            // One sample per batch, for its newest frame: the latency of the batch's last write.
            let now = now_micros();
            ctx.latency.record(now.saturating_sub(newest_ts) as f64 / 1e6);
        }
        Ok(())
    }
}

/// Writes whole frames, encoded by the session, past tungstenite's write buffer: that buffer
/// keeps the capacity of the largest batch it ever held for the connection's life (up to
/// `session.write_buffer_bytes` and a frame), which a session that once had a replay or a
/// burst would carry idle from then on. What tungstenite has queued (a pong, a frame the
/// socket took in part) goes out first, so frames never interleave; `bytes` goes out whole
/// before the session does anything else.
async fn write_encoded<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    bytes: &[u8],
) -> Result<(), WsError> {
    ws.flush().await?;
    ws.get_mut().write_all(bytes).await?;
    Ok(())
}

/// Sends a close frame (best effort, bounded), then lingers so the client can read it. A
/// Pusher session with a Pusher code (4000 and up) first gets it in a `pusher:error` too.
async fn close<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, reason: CloseReason, format: Format) {
    if matches!(reason, CloseReason::WriteFailed | CloseReason::Gone) {
        return; // nobody to tell, or no way to: a close frame would only wait
    }
    if matches!(reason, CloseReason::Normal) {
        // The client closed: tungstenite queued the reply (echoing the client's code) when it
        // read the close frame. Send it, then let the client end the connection.
        let _ = timeout(CLOSE_TIMEOUT, ws.flush()).await;
        linger(ws.get_mut()).await;
        return;
    }
    let code = reason.code_for(format);
    if format == Format::Pusher && code >= 4000 {
        let error = crate::protocol::pusher::error(Some(code), &reason.text());
        let _ = timeout(CLOSE_TIMEOUT, ws.send(Message::Text(error.into()))).await;
    }
    let frame = CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason.text()) };
    if !matches!(timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await, Ok(Ok(()))) {
        return;
    }
    linger(ws.get_mut()).await;
}

/// How long a closed session keeps reading (and discarding) what the client still sends, and
/// how much of it at most.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// After the close frame: half-close the socket (the client reads the close frame, then the
/// end of the stream), then read and discard until the client closes too, for at most
/// [`LINGER`] and [`LINGER_BYTES`]. Dropping a socket with unread input makes the kernel send a
/// reset, and a reset can destroy the close frame before the client has read it: a flooding
/// client would see "connection reset" instead of 4003.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let deadline = tokio::time::Instant::now() + LINGER;
    if !matches!(tokio::time::timeout_at(deadline, io.shutdown()).await, Ok(Ok(()))) {
        return;
    }
    let mut scratch = [0u8; 1024];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, io.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

fn read_error(error: &WsError) -> CloseReason {
    match error {
        WsError::Io(e) if FrameFlood::is(e) => CloseReason::RateLimited,
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::MessageTooBig,
        // The peer went away without a close handshake: not a protocol mistake of the client's.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::Gone,
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) => CloseReason::ProtocolError,
        _ => CloseReason::Gone,
    }
}
