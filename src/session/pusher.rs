//! A session speaking the Pusher protocol: the same session engine (outbox, batching,
//! heartbeat, limits, hub registration) with Pusher frames in and out.
//!
//! A Pusher socket has no user: it joins channels by name, each a topic on the broker channel
//! [`Apps::broker_channel`](crate::pusher::Apps::broker_channel) names. Private and encrypted
//! channels need the app's signature over `socket_id:channel`; a refused subscription answers
//! a channel-scoped `pusher:subscription_error` and the connection stays. Client events
//! (`client-*`) are published on the channel's broker channel with the sender's socket id, so
//! the hub on every node skips the sender.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

use super::Session;
use super::rate::TokenBucket;
use crate::metrics as m;
use crate::protocol::pusher::{self, ChannelClass, ClientFrame};
use crate::protocol::{CloseReason, Envelope, json};
use crate::pusher::AppSlot;

/// Client events a socket may send per second (Pusher's limit); past it they are dropped with
/// a 4301 error.
pub(super) const CLIENT_EVENTS_PER_SECOND: f64 = 10.0;

/// The Pusher part of a session (boxed in the session: native sessions do not pay for it).
#[derive(Debug)]
pub(super) struct PusherSession {
    pub(super) app: AppSlot,
    pub(super) socket_id: String,
    client_events: TokenBucket,
}

impl PusherSession {
    pub(super) fn new(app: AppSlot, socket_id: String) -> Self {
        Self { app, socket_id, client_events: TokenBucket::new() }
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn pusher(&self) -> &PusherSession {
        // Only called on Pusher sessions, which always have it.
        self.pusher.as_deref().unwrap_or_else(|| unreachable!("a Pusher session without its Pusher state"))
    }

    pub(super) async fn connection_established(&mut self) -> Result<(), CloseReason> {
        let frame = pusher::connection_established(&self.pusher().socket_id, self.ctx.apps.activity_timeout);
        self.write(Message::Text(frame.into())).await
    }

    pub(super) async fn on_pusher_text(&mut self, text: &str) -> Result<(), CloseReason> {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(e) => return self.pusher_error(None, &e.to_string()).await,
        };
        match frame {
            ClientFrame::Ping => self.write(Message::Text(pusher::pong().into())).await,
            // Any frame counts as a sign of life; the pong needs nothing more.
            ClientFrame::Pong => Ok(()),
            ClientFrame::Subscribe { channel, auth, channel_data } => {
                self.pusher_subscribe(channel, auth, channel_data).await
            }
            ClientFrame::Unsubscribe { channel } => {
                self.registration.leave_topic(&channel);
                Ok(())
            }
            ClientFrame::ClientEvent { event, channel, data } => self.client_event(event, channel, data).await,
            ClientFrame::Other { event } => self.pusher_error(None, &format!("unsupported event {event:?}")).await,
        }
    }

    async fn pusher_subscribe(
        &mut self,
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    ) -> Result<(), CloseReason> {
        if !pusher::valid_channel(&channel) {
            return self.subscription_error(&channel, "InvalidChannel", "invalid channel name", 400).await;
        }
        let class = ChannelClass::of(&channel);
        if class == ChannelClass::Presence {
            return self
                .subscription_error(&channel, "UnsupportedChannel", "presence channels are not supported yet", 501)
                .await;
        }
        if class.needs_auth() {
            let app = &self.pusher().app.settings;
            let message = pusher::auth_message(&self.pusher().socket_id, &channel, channel_data.as_deref());
            let signed = auth.as_deref().is_some_and(|auth| pusher::check_auth(&app.key, &app.secret, auth, &message));
            if !signed {
                metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_auth").increment(1);
                return self
                    .subscription_error(&channel, "AuthError", "invalid signature for this socket and channel", 401)
                    .await;
            }
        }
        if !self.registration.has_topic(&channel) {
            if self.registration.topic_count() >= self.ctx.max_topics {
                return self
                    .subscription_error(&channel, "LimitReached", "channel limit of this connection reached", 400)
                    .await;
            }
            let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, &channel);
            self.registration.join_topic(broker_channel.clone(), channel.as_str().into());
            self.ctx.hub.wait_live(&broker_channel, self.ctx.subscribe_wait).await;
        }
        self.write(Message::Text(pusher::subscription_succeeded(&channel).into())).await
    }

    async fn client_event(&mut self, event: String, channel: String, data: String) -> Result<(), CloseReason> {
        if !self.pusher().app.settings.enable_client_messages {
            return self.pusher_error(None, "client events are not enabled for this app").await;
        }
        if !ChannelClass::of(&channel).needs_auth() || ChannelClass::of(&channel) == ChannelClass::Presence {
            // Presence channels will take them once presence is supported.
            return self.pusher_error(None, "client events go to private channels only").await;
        }
        if !self.registration.has_topic(&channel) {
            return self.pusher_error(None, &format!("not subscribed to {channel:?}")).await;
        }
        if event.len() > pusher::MAX_EVENT_LEN {
            return self.pusher_error(None, "event name too long").await;
        }
        let allowed =
            self.pusher.as_deref_mut().is_some_and(|p| p.client_events.take(CLIENT_EVENTS_PER_SECOND, Instant::now()));
        if !allowed {
            metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_client_event_rate").increment(1);
            return self.pusher_error(Some(4301), "client event rejected: more than 10 per second").await;
        }
        let Ok(data) = serde_json::value::RawValue::from_string(data) else {
            return self.pusher_error(None, "invalid data").await;
        };
        if let Err(e) = json::check(data.get()) {
            return self.pusher_error(None, &format!("invalid data: {e}")).await;
        }
        let id = self.ctx.hub.next_message_id();
        let mut envelope = Envelope::new(&id, Some(&event), &data);
        envelope.socket = Some(self.pusher().socket_id.as_str().into());
        let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, &channel);
        if let Err(e) = self.ctx.broker.publish(&broker_channel, envelope.encode()).await {
            return self.pusher_error(None, &format!("client event not sent: {e}")).await;
        }
        metrics::counter!(m::MESSAGES_PUBLISHED).increment(1);
        Ok(())
    }

    async fn subscription_error(
        &mut self,
        channel: &str,
        kind: &str,
        message: &str,
        status: u16,
    ) -> Result<(), CloseReason> {
        self.write(Message::Text(pusher::subscription_error(channel, kind, message, status).into())).await
    }

    pub(super) async fn pusher_error(&mut self, code: Option<u16>, message: &str) -> Result<(), CloseReason> {
        metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_error").increment(1);
        self.write(Message::Text(pusher::error(code, message).into())).await
    }
}
