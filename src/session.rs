//! `Session`: one WebSocket connection, from the first frame after the 101 to the close.
//!
//! A session is one task that owns its socket. It waits on three things at once: its
//! [`Outbox`] (frames queued by fan-out), the client's frames, and the heartbeat. It writes
//! queued frames in batches (one flush per batch), answers client frames, pings on an interval
//! and closes a client that stays silent. Every write has a timeout, and a write stalled by a
//! client that stopped reading is abandoned as soon as fan-out marks the outbox closing.
//!
//! The session registers itself in the [`Hub`] and leaves it on every exit path; it never
//! touches the broker (the hub reports interest changes to it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, trace};

use crate::auth::Identity;
use crate::channel::{ChannelNames, granted, valid_name};
use crate::hub::{Hub, Subscriber};
use crate::metrics as m;
use crate::outbox::{Outbox, Outgoing};
use crate::protocol::{
    ClientFrame, CloseReason, ErrorCode, Format, PROTOCOL_VERSION, ServerFrame, WireFrame, now_micros,
};
use crate::settings::Settings;

/// How long a close frame may take to leave before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every session of a node shares: settings, the hub, channel naming, metric handles.
#[derive(Debug)]
pub struct SessionContext {
    pub hub: Hub,
    pub names: ChannelNames,
    pub node_id: Arc<str>,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
    write_timeout: Duration,
    outbox_capacity: usize,
    max_per_user: usize,
    max_topics: usize,
    frames_per_second: f64,
    subscribe_wait: Duration,
    /// Hard stop: set after the drain; every session still open ends at once.
    stop: CancellationToken,
    delivered: metrics::Counter,
    latency: metrics::Histogram,
}

impl SessionContext {
    pub fn new(settings: &Settings, hub: Hub, names: ChannelNames, stop: CancellationToken) -> Self {
        Self {
            node_id: hub.node_id().into(),
            hub,
            names,
            heartbeat_interval: settings.session.heartbeat_interval,
            heartbeat_timeout: settings.session.heartbeat_timeout,
            write_timeout: settings.session.write_timeout,
            outbox_capacity: settings.session.outbox_capacity,
            max_per_user: settings.limits.max_connections_per_user,
            max_topics: settings.limits.max_topics_per_session,
            frames_per_second: f64::from(settings.limits.client_frames_per_second),
            subscribe_wait: settings.broker.subscribe_wait,
            stop,
            delivered: metrics::counter!(m::MESSAGES_DELIVERED),
            latency: metrics::histogram!(m::DELIVERY_LATENCY),
        }
    }
}

/// Runs one session to its end. `ws` has completed the handshake; `identity` was
/// authenticated before it.
pub async fn run<S>(ws: WebSocketStream<S>, ctx: Arc<SessionContext>, identity: Identity, format: Format)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let subscriber = Arc::new(Subscriber {
        id: ctx.hub.next_session_id(),
        user: identity.user.clone(),
        format,
        outbox: Outbox::new(ctx.outbox_capacity),
    });
    let span = info_span!("session", id = subscriber.id, user = %identity.user);
    let mut session = Session {
        ws,
        user_channel: ctx.names.user(&identity.user),
        ctx,
        subscriber,
        identity,
        topics: Vec::new(),
        bucket: TokenBucket::default(),
        batch: Vec::new(),
    };
    async move {
        let reason = session.run().await;
        debug!(reason = reason.label(), "session closed");
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => reason.label()).increment(1);
    }
    .instrument(span)
    .await;
}

struct Session<S> {
    ws: WebSocketStream<S>,
    ctx: Arc<SessionContext>,
    subscriber: Arc<Subscriber>,
    identity: Identity,
    user_channel: Arc<str>,
    /// Joined topic channels: (broker channel, topic name).
    topics: Vec<(Arc<str>, Arc<str>)>,
    bucket: TokenBucket,
    /// Reused between batches so a busy session does not allocate per batch.
    batch: Vec<Outgoing>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(&mut self) -> CloseReason {
        if self.ctx.hub.register(self.subscriber.clone(), self.ctx.max_per_user).is_err() {
            // Raced past the pre-upgrade check; refuse with a close code instead.
            self.close(CloseReason::TooManyConnections).await;
            return CloseReason::TooManyConnections;
        }
        metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
        self.ctx.hub.join(&self.user_channel, None, &self.subscriber);
        // The welcome means "what is published from now on reaches you": wait (bounded) for
        // the broker to confirm the subscription. Frames queued meanwhile are kept.
        self.ctx.hub.wait_live(&self.user_channel, self.ctx.subscribe_wait).await;

        let reason = self.serve().await;
        self.close(reason).await;

        for (channel, _) in self.topics.drain(..) {
            self.ctx.hub.leave(&channel, self.subscriber.id);
        }
        self.ctx.hub.leave(&self.user_channel, self.subscriber.id);
        self.ctx.hub.unregister(&self.subscriber);
        reason
    }

    async fn serve(&mut self) -> CloseReason {
        if self.subscriber.format == Format::Json {
            let welcome = ServerFrame::Welcome {
                protocol: PROTOCOL_VERSION,
                node: self.ctx.node_id.to_string(),
                session: self.subscriber.id.to_string(),
                user: self.identity.user.to_string(),
                heartbeat: self.ctx.heartbeat_interval.as_secs(),
                format: self.subscriber.format,
                channels: self.identity.channels.clone(),
            };
            if let Err(reason) = self.send(&welcome).await {
                return reason;
            }
        }

        let period = self.ctx.heartbeat_interval;
        let mut heartbeat = interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();

        loop {
            // Drain before waiting: a wake-up may have been consumed while a write was stalled.
            if let Some(reason) = self.subscriber.outbox.drain_into(&mut self.batch) {
                if reason == CloseReason::SlowConsumer {
                    self.batch.clear();
                    return reason;
                }
                // Queued frames still go out before the close frame.
                return self.write_batch().await.err().unwrap_or(reason);
            }
            if !self.batch.is_empty() {
                if let Err(reason) = self.write_batch().await {
                    return reason;
                }
                continue;
            }

            tokio::select! {
                () = self.subscriber.outbox.ready() => {}
                incoming = self.ws.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        Some(Ok(message)) => {
                            if let Err(reason) = self.on_message(message).await {
                                return reason;
                            }
                        }
                        Some(Err(e)) => return read_error(&e),
                        None => return CloseReason::Normal,
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() >= self.ctx.heartbeat_timeout {
                        return CloseReason::HeartbeatTimeout;
                    }
                    if let Err(reason) = self.write(Message::Ping(Bytes::new())).await {
                        return reason;
                    }
                }
                () = self.ctx.stop.cancelled() => {
                    return CloseReason::ServerShutdown { reconnect_after_ms: 0 };
                }
            }
        }
    }

    /// Handles one client message. `Err` ends the session with that reason.
    async fn on_message(&mut self, message: Message) -> Result<(), CloseReason> {
        match message {
            Message::Text(text) => {
                self.take_token()?;
                self.on_text(&text).await
            }
            Message::Binary(_) => {
                self.take_token()?;
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
            ClientFrame::Unsubscribe { channel } => {
                if let Some(i) = self.topics.iter().position(|(_, topic)| **topic == *channel) {
                    let (broker_channel, _) = self.topics.swap_remove(i);
                    self.ctx.hub.leave(&broker_channel, self.subscriber.id);
                }
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
        if !self.topics.iter().any(|(_, t)| **t == *topic) {
            if self.topics.len() >= self.ctx.max_topics {
                return self.reply_error(ErrorCode::TooManyChannels, "topic channel limit reached").await;
            }
            let topic: Arc<str> = topic.as_str().into();
            let channel = self.ctx.names.topic(&topic);
            self.ctx.hub.join(&channel, Some(&topic), &self.subscriber);
            self.ctx.hub.wait_live(&channel, self.ctx.subscribe_wait).await;
            self.topics.push((channel, topic));
        }
        self.send(&ServerFrame::Subscribed { channel: topic }).await
    }

    async fn reply_error(&mut self, code: ErrorCode, message: impl Into<String>) -> Result<(), CloseReason> {
        let label = match code {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NotAllowed => "not_allowed",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::TooManyChannels => "too_many_channels",
        };
        metrics::counter!(m::CLIENT_ERRORS, "code" => label).increment(1);
        self.send(&ServerFrame::error(code, message)).await
    }

    /// One client frame costs one token; an empty bucket closes the session.
    fn take_token(&mut self) -> Result<(), CloseReason> {
        if self.bucket.take(self.ctx.frames_per_second) { Ok(()) } else { Err(CloseReason::RateLimited) }
    }

    async fn send(&mut self, frame: &ServerFrame) -> Result<(), CloseReason> {
        self.write(Message::Text(frame.encode().into())).await
    }

    /// Writes one control or reply message, bounded by the write timeout.
    async fn write(&mut self, message: Message) -> Result<(), CloseReason> {
        match timeout(self.ctx.write_timeout, self.ws.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(CloseReason::WriteFailed),
        }
    }

    /// Writes the queued batch with one flush. Gives up on the write timeout, or as soon as
    /// fan-out marks the outbox closing (a client that stopped reading would otherwise hold
    /// this task until the timeout).
    async fn write_batch(&mut self) -> Result<(), CloseReason> {
        let Self { ws, batch, subscriber, ctx, .. } = self;
        let count = batch.len();
        let mut newest_ts = 0;
        let write = async {
            for out in batch.drain(..) {
                newest_ts = newest_ts.max(out.published_us);
                let message = match out.frame {
                    WireFrame::Text(text) => Message::Text(text),
                    WireFrame::Binary(bytes) => Message::Binary(bytes),
                };
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        let closed = async {
            loop {
                subscriber.outbox.ready().await;
                if let Some(reason) = subscriber.outbox.closing() {
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
        ctx.delivered.increment(count as u64);
        if newest_ts > 0 {
            // One sample per batch, for its newest frame: the latency of the batch's last write.
            let now = now_micros();
            ctx.latency.record(now.saturating_sub(newest_ts) as f64 / 1e6);
        }
        batch.clear();
        Ok(())
    }

    /// Sends a close frame (best effort, bounded) and lets the socket go.
    async fn close(&mut self, reason: CloseReason) {
        if matches!(reason, CloseReason::WriteFailed) {
            return; // the socket is not writable; a close frame would only wait
        }
        let frame = CloseFrame { code: CloseCode::from(reason.code()), reason: Utf8Bytes::from(reason.text()) };
        let _ = timeout(CLOSE_TIMEOUT, self.ws.close(Some(frame))).await;
    }
}

fn read_error(error: &WsError) -> CloseReason {
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => CloseReason::MessageTooBig,
        WsError::Capacity(_) | WsError::Protocol(_) | WsError::Utf8(_) => CloseReason::ProtocolError,
        // The peer went away without a close handshake.
        _ => CloseReason::Normal,
    }
}

/// Client frame rate limit: `rate` tokens per second, burst of `rate`.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
    started: bool,
}

impl Default for TokenBucket {
    fn default() -> Self {
        Self { tokens: 0.0, last: Instant::now(), started: false }
    }
}

impl TokenBucket {
    fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        if self.started {
            let refill = now.duration_since(self.last).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(rate);
        } else {
            self.tokens = rate;
            self.started = true;
        }
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_refuses() {
        let mut bucket = TokenBucket::default();
        let allowed = (0..30).filter(|_| bucket.take(20.0)).count();
        assert_eq!(allowed, 20);
    }
}
