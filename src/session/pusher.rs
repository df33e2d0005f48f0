//! A session speaking the Pusher protocol: the same session engine (outbox, batching,
//! heartbeat, limits, hub registration) with Pusher frames in and out.
//!
//! A Pusher socket has no user: it joins channels by name, each a topic on the broker channel
//! [`Apps::broker_channel`](crate::pusher::Apps::broker_channel) names. Private and encrypted
//! channels need the app's signature over `socket_id:channel`; a refused subscription answers
//! a channel-scoped `pusher:subscription_error` and the connection stays. Presence channels
//! also take the signed `channel_data` and hold a [`Seat`] in [`crate::presence`] while
//! subscribed; the seat goes with the subscription or the session. Client events
//! (`client-*`) are published on the channel's broker channel with the sender's socket id, so
//! the hub on every node skips the sender.

use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;

use super::Session;
use super::rate::TokenBucket;
use crate::inbox::ReadScope;
use crate::metrics as m;
use crate::presence::{ChannelRef, PresenceError, Seat};
use crate::protocol::pusher::{self, ChannelClass, ClientFrame};
use crate::protocol::{CloseReason, Envelope, json};
use crate::pusher::AppSlot;

/// Client events a socket may send per second (Pusher's limit); past it they are dropped with
/// a 4301 error.
pub(super) const CLIENT_EVENTS_PER_SECOND: f64 = 10.0;

/// The event that tells a user's sockets its unread count of kept notifications.
const UNREAD_EVENT: &str = "pushnode:unread";

fn unread_frame(channel: &str, unread: u64) -> String {
    let data = RawValue::from_string(format!(r#"{{"unread":{unread}}}"#)).unwrap_or_else(|_| RawValue::NULL.to_owned());
    match pusher::event_frame(UNREAD_EVENT, channel, &data, None) {
        crate::protocol::WireFrame::Text(text) => text.to_string(),
        _ => String::new(),
    }
}

/// Longest presence `user_info` accepted, in bytes (Pusher's limit).
const MAX_USER_INFO_BYTES: usize = 1024;

/// The Pusher part of a session (boxed in the session: native sessions do not pay for it).
#[derive(Debug)]
pub(super) struct PusherSession {
    pub(super) app: AppSlot,
    client_events: TokenBucket,
    /// Presence channels joined: the seat, and the user id (JSON) the socket joined as.
    seats: Vec<(Seat, Arc<str>)>,
    /// The signed-in user's channel (`#server-to-user-<id>`), once signed in: the same string
    /// as the registration's topic name.
    user_channel: Option<Arc<str>>,
    /// With occupancy webhooks: the socket's share of each channel's occupancy.
    occupied: Vec<Seat>,
}

impl PusherSession {
    pub(super) fn new(app: AppSlot) -> Self {
        Self { app, client_events: TokenBucket::new(), seats: Vec::new(), user_channel: None, occupied: Vec::new() }
    }

    fn seat(&self, channel: &str) -> Option<&(Seat, Arc<str>)> {
        self.seats.iter().find(|(seat, _)| &*seat.channel().name == channel)
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// This socket's id, `<node>.<session>` (made when needed rather than kept: every idle
    /// connection would pay for the string).
    fn socket_id(&self) -> String {
        pusher::socket_id(self.ctx.hub.socket_node(), self.registration.id)
    }

    fn pusher(&self) -> &PusherSession {
        // Only called on Pusher sessions, which always have it.
        self.pusher.as_deref().unwrap_or_else(|| unreachable!("a Pusher session without its Pusher state"))
    }

    pub(super) async fn connection_established(&mut self) -> Result<(), CloseReason> {
        let frame = pusher::connection_established(&self.socket_id(), self.ctx.apps.activity_timeout);
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
                if let Some(pusher) = self.pusher.as_deref_mut() {
                    // Dropping the seat lets go of the member (once its last socket here has).
                    pusher.seats.retain(|(seat, _)| *seat.channel().name != *channel);
                    pusher.occupied.retain(|seat| *seat.channel().name != *channel);
                }
                Ok(())
            }
            ClientFrame::Signin { auth, user_data } => self.signin(&auth, &user_data).await,
            ClientFrame::Read { channel, data } => self.read_notifications(&channel, &data).await,
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
        if class == ChannelClass::User {
            // Joined at signin; pusher-js subscribes it after `pusher:signin_success`.
            if self.pusher().user_channel.as_deref() == Some(channel.as_str()) {
                return self.write(Message::Text(pusher::subscription_succeeded(&channel).into())).await;
            }
            return self.subscription_error(&channel, "AuthError", "sign in as this user first", 401).await;
        }
        let member = if class == ChannelClass::Presence {
            let parsed = match channel_data.as_deref() {
                None => Err("presence channels need channel_data".to_owned()),
                Some(data) => pusher::parse_channel_data(data).map_err(|e| e.to_string()),
            };
            match parsed {
                Ok((_, info)) if info.len() > MAX_USER_INFO_BYTES => {
                    let message = format!("user_info larger than {MAX_USER_INFO_BYTES} bytes");
                    return self.subscription_error(&channel, "InvalidChannelData", &message, 400).await;
                }
                Ok(member) => Some(member),
                Err(message) => return self.subscription_error(&channel, "InvalidChannelData", &message, 400).await,
            }
        } else {
            None
        };
        if class.needs_auth() {
            let app = &self.pusher().app.settings;
            let message = pusher::auth_message(&self.socket_id(), &channel, channel_data.as_deref());
            let signed = auth.as_deref().is_some_and(|auth| pusher::check_auth(&app.key, &app.secret, auth, &message));
            if !signed {
                metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_auth").increment(1);
                return self
                    .subscription_error(&channel, "AuthError", "invalid signature for this socket and channel", 401)
                    .await;
            }
        }
        let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, &channel);
        if self.registration.has_topic(&channel) {
            // Subscribed already: confirm again (with the members, on a presence channel).
            return self.confirm(&channel, class).await;
        }
        if self.registration.topic_count() >= self.ctx.max_topics {
            return self
                .subscription_error(&channel, "LimitReached", "channel limit of this connection reached", 400)
                .await;
        }
        self.registration.join_topic(broker_channel.clone(), channel.as_str().into());
        self.ctx.hub.wait_live(&broker_channel, self.ctx.subscribe_wait).await;
        let app = &self.pusher().app.settings.id;
        if self.ctx.webhooks.wants(app, "channel_occupied") || self.ctx.webhooks.wants(app, "channel_vacated") {
            let channel_ref = ChannelRef {
                app_id: app.as_str().into(),
                name: channel.as_str().into(),
                broker_channel: broker_channel.clone(),
            };
            let seat = self.ctx.occupancy.occupy(channel_ref);
            if let Some(pusher) = self.pusher.as_deref_mut() {
                pusher.occupied.push(seat);
            }
        }
        let Some((user_id, user_info)) = member else {
            self.write(Message::Text(pusher::subscription_succeeded(&channel).into())).await?;
            return self.replay_notifications(&channel).await;
        };
        let channel_ref = ChannelRef {
            app_id: self.pusher().app.settings.id.as_str().into(),
            name: channel.as_str().into(),
            broker_channel,
        };
        let user_id: Arc<str> = user_id.into();
        let socket: Arc<str> = self.socket_id().into();
        match self.ctx.presence.join(channel_ref, user_id.clone(), user_info.into(), socket).await {
            Ok((seat, members)) => {
                if let Some(pusher) = self.pusher.as_deref_mut() {
                    pusher.seats.push((seat, user_id));
                }
                let frame = pusher::presence_succeeded(&channel, members.iter().map(|m| (&*m.user_id, &*m.user_info)));
                self.write(Message::Text(frame.into())).await
            }
            Err(e) => {
                self.registration.leave_topic(&channel);
                if let Some(pusher) = self.pusher.as_deref_mut() {
                    pusher.occupied.retain(|seat| *seat.channel().name != *channel);
                }
                let (kind, status) = match e {
                    PresenceError::Full(_) => ("LimitReached", 400),
                    PresenceError::Unavailable(_) => ("PresenceUnavailable", 503),
                };
                self.subscription_error(&channel, kind, &e.to_string(), status).await
            }
        }
    }

    /// Confirms a subscription the socket already has.
    async fn confirm(&mut self, channel: &str, class: ChannelClass) -> Result<(), CloseReason> {
        let frame = match self.pusher().seat(channel) {
            Some((seat, _)) if class == ChannelClass::Presence => {
                let seat_channel = seat.channel().clone();
                match self.ctx.presence.members(&seat_channel).await {
                    Ok(members) => {
                        pusher::presence_succeeded(channel, members.iter().map(|m| (&*m.user_id, &*m.user_info)))
                    }
                    Err(e) => pusher::subscription_error(channel, "PresenceUnavailable", &e.to_string(), 503),
                }
            }
            _ => pusher::subscription_succeeded(channel),
        };
        self.write(Message::Text(frame.into())).await
    }

    /// The user's notification channel (with `pusher.persist_notifications`): what the socket
    /// subscribed it for. Its unread kept notifications, oldest first (at most
    /// `inbox.replay_limit`), as the events they were, then `pushnode:unread` with the count.
    /// Subscribed first, replayed second: one published meanwhile may come twice (its
    /// `pushnode.id` tells).
    async fn replay_notifications(&mut self, channel: &str) -> Result<(), CloseReason> {
        let (Some(notifications), Some(inbox)) = (self.ctx.apps.notifications.clone(), self.ctx.inbox.clone()) else {
            return Ok(());
        };
        let Some(user) = notifications.user_of(channel) else { return Ok(()) };
        let stored = match inbox.list(user, None, self.ctx.replay_limit, true).await {
            Ok(stored) => stored,
            Err(e) => return self.pusher_error(None, &format!("kept notifications not replayed: {e}")).await,
        };
        for note in &stored {
            let data = crate::pusher::tag_notification(&note.data, &note.id.to_string(), None);
            let event = note.event.as_deref().unwrap_or(&notifications.event);
            let crate::protocol::WireFrame::Text(frame) = pusher::event_frame(event, channel, &data, None) else {
                continue;
            };
            self.write(Message::Text(frame)).await?;
        }
        metrics::counter!(m::INBOX_REPLAYED).increment(stored.len() as u64);
        match inbox.state(user).await {
            Ok(state) => self.write(Message::Text(unread_frame(channel, state.unread).into())).await,
            Err(e) => self.pusher_error(None, &format!("unread count unavailable: {e}")).await,
        }
    }

    /// `pushnode:read` on a subscribed notification channel: marks kept notifications read,
    /// then tells every socket of the channel, on every node, the new count
    /// (`pushnode:unread`).
    async fn read_notifications(&mut self, channel: &str, data: &str) -> Result<(), CloseReason> {
        #[derive(serde::Deserialize)]
        struct Read {
            #[serde(default)]
            ids: Option<Vec<String>>,
            #[serde(default)]
            up_to: Option<String>,
            #[serde(default)]
            all: bool,
        }
        let (Some(notifications), Some(inbox)) = (self.ctx.apps.notifications.clone(), self.ctx.inbox.clone()) else {
            return self.pusher_error(None, "kept notifications are off (pusher.persist_notifications)").await;
        };
        let Some(user) = notifications.user_of(channel).filter(|_| self.registration.has_topic(channel)) else {
            return self.pusher_error(None, &format!("not subscribed to a notification channel {channel:?}")).await;
        };
        let read: Read = match serde_json::from_str(data) {
            Ok(read) => read,
            Err(e) => return self.pusher_error(None, &format!("invalid pushnode:read data: {e}")).await,
        };
        let scope = match ReadScope::parse(read.ids.as_deref(), read.up_to.as_deref(), read.all) {
            Ok(scope) => scope,
            Err(e) => return self.pusher_error(None, &e.to_string()).await,
        };
        let unread = match inbox.mark_read(user, &scope).await {
            Ok(unread) => unread,
            Err(e) => return self.pusher_error(None, &format!("not marked read: {e}")).await,
        };
        let app = self.pusher().app.settings.id.clone();
        self.ctx.webhooks.emit(&app, crate::webhooks::read_event(user, &scope, unread)).await;
        let id = self.ctx.hub.next_message_id();
        let data =
            RawValue::from_string(format!(r#"{{"unread":{unread}}}"#)).unwrap_or_else(|_| RawValue::NULL.to_owned());
        let envelope = Envelope::new(&id, Some(UNREAD_EVENT), &data);
        let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, channel);
        if self.ctx.broker.publish(&broker_channel, envelope.encode()).await.is_err() {
            // The others learn at their next replay; this socket learns now.
            return self.write(Message::Text(unread_frame(channel, unread).into())).await;
        }
        Ok(())
    }

    /// `pusher:signin`: checks the app's signature over `socket_id::user::user_data`, then
    /// joins the user's channel, where `sendToUser` events (and `terminate_connections`)
    /// reach every signed-in socket of the user on every node. A bad signature closes the
    /// connection with 4009, as Pusher does.
    async fn signin(&mut self, auth: &str, user_data: &str) -> Result<(), CloseReason> {
        let app = &self.pusher().app.settings;
        let message = pusher::signin_message(&self.socket_id(), user_data);
        if !pusher::check_auth(&app.key, &app.secret, auth, &message) {
            metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_signin").increment(1);
            return Err(CloseReason::Unauthorized);
        }
        let user = match pusher::signin_user(user_data) {
            Ok(user) => user,
            Err(e) => return self.pusher_error(None, &e.to_string()).await,
        };
        let channel: Arc<str> = format!("{}{user}", pusher::USER_CHANNEL_PREFIX).into();
        if let Some(previous) = self.pusher().user_channel.clone()
            && previous != channel
        {
            self.registration.leave_topic(&previous);
        }
        if !self.registration.has_topic(&channel) {
            let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, &channel);
            self.registration.join_topic(broker_channel.clone(), channel.clone());
            self.ctx.hub.wait_live(&broker_channel, self.ctx.subscribe_wait).await;
        }
        if let Some(pusher) = self.pusher.as_deref_mut() {
            pusher.user_channel = Some(channel);
        }
        self.write(Message::Text(pusher::signin_success(user_data).into())).await
    }

    async fn client_event(&mut self, event: String, channel: String, data: String) -> Result<(), CloseReason> {
        if !self.pusher().app.settings.enable_client_messages {
            return self.pusher_error(None, "client events are not enabled for this app").await;
        }
        if !ChannelClass::of(&channel).needs_auth() {
            return self.pusher_error(None, "client events go to private and presence channels only").await;
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
        let Ok(data) = RawValue::from_string(data) else {
            return self.pusher_error(None, "invalid data").await;
        };
        if let Err(e) = json::check(data.get()) {
            return self.pusher_error(None, &format!("invalid data: {e}")).await;
        }
        let id = self.ctx.hub.next_message_id();
        // On a presence channel, the other members learn who sent it.
        let user_id = self.pusher().seat(&channel).and_then(|(_, user)| RawValue::from_string(user.to_string()).ok());
        let mut envelope = Envelope::new(&id, Some(&event), &data);
        let socket_id = self.socket_id();
        envelope.socket = Some(socket_id.as_str().into());
        envelope.user_id = user_id.as_deref();
        let broker_channel = self.ctx.apps.broker_channel(&self.pusher().app.settings.id, &channel);
        if let Err(e) = self.ctx.broker.publish(&broker_channel, envelope.encode()).await {
            return self.pusher_error(None, &format!("client event not sent: {e}")).await;
        }
        metrics::counter!(m::MESSAGES_PUBLISHED).increment(1);
        let app = &self.pusher().app.settings.id;
        if self.ctx.webhooks.wants(app, "client_event") {
            let mut hook = serde_json::json!({
                "name": "client_event", "channel": channel, "event": event,
                "data": data.get(), "socket_id": socket_id,
            });
            if let Some(user) = self.pusher().seat(&channel).map(|(_, user)| user.clone()) {
                let id = serde_json::from_str::<String>(&user).unwrap_or_else(|_| user.to_string());
                hook["user_id"] = id.into();
            }
            let app = app.clone();
            self.ctx.webhooks.emit(&app, hook).await;
        }
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
