//! Protocol v1: the frames a client and the node exchange, the envelope that carries a
//! notification between nodes, and the close codes.
//!
//! `delivery` holds the decoding of broker payloads and the notification frames.
//! Everything here is plain data and encoding; it depends on nothing else in the crate, so it
//! can be tested and benchmarked without sockets or Redis. `docs/protocol.md` is the prose
//! version of this file and must change with it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Utf8Bytes;

mod delivery;
pub mod json;
pub mod pusher;

pub use delivery::{Delivery, Envelope, NoteId, UnreadUpdate, encode_stored, now_micros, unread_frame};

/// The protocol version announced in the welcome frame.
pub const PROTOCOL_VERSION: u32 = 1;

/// How a session wants notifications written to its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A `notification` frame (JSON) around the published data.
    #[default]
    Json,
    /// Exactly the bytes that were published as `data` (or, for a plain Redis `PUBLISH`, the
    /// whole payload): the classic demo client's `JSON.parse(event.data).cnt` works unchanged.
    Raw,
    /// A Pusher protocol session ([`pusher`]): events as `{"event","channel","data"}` frames.
    /// Set by the `/app/{key}` endpoint, never chosen by `format=` or in the settings.
    #[serde(skip)]
    Pusher,
}

impl Format {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "json" => Some(Self::Json),
            "raw" => Some(Self::Raw),
            _ => None,
        }
    }
}

/// A frame sent by a client. Unknown types and malformed JSON are answered with an
/// [`ErrorCode::BadFrame`] error frame; the session stays open.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Join a topic channel the token grants.
    Subscribe { channel: String },
    /// Leave a topic channel.
    Unsubscribe { channel: String },
    /// Application-level ping for clients that cannot see WebSocket pings (browsers).
    Ping {},
    /// Mark inbox notifications read: `ids`, everything `up_to` an id, or `all`.
    Read {
        #[serde(default)]
        ids: Vec<String>,
        #[serde(default)]
        up_to: Option<String>,
        #[serde(default)]
        all: bool,
    },
}

impl ClientFrame {
    pub fn decode(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// A frame sent by the node, other than notifications (see [`Notification`]).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of every session (JSON format only).
    Welcome {
        protocol: u32,
        node: String,
        session: String,
        user: String,
        /// Heartbeat interval in seconds: the node pings this often and closes a session that
        /// stays silent for the heartbeat timeout.
        heartbeat: u64,
        format: Format,
        /// Topic channels the token grants (exact names or `prefix*`).
        channels: Vec<String>,
        /// The user's unread inbox notifications.
        unread: u64,
        /// The newest inbox id (resume from it with `last_id`), `null` for an empty inbox.
        last_id: Option<String>,
    },
    Subscribed {
        channel: String,
    },
    Unsubscribed {
        channel: String,
    },
    Pong {},
    Error {
        code: ErrorCode,
        message: String,
    },
}

impl ServerFrame {
    pub fn encode(&self) -> String {
        // Serialising these plain structs cannot fail: every field is a string, number or list.
        serde_json::to_string(self).unwrap_or_else(|_| String::from(r#"{"type":"error"}"#))
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, message: message.into() }
    }
}

/// Machine-readable error codes carried by `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON or not a known client frame.
    BadFrame,
    /// Binary frames are not part of the protocol.
    Unsupported,
    /// The token does not grant the channel.
    NotAllowed,
    /// The channel name is not valid.
    BadChannel,
    /// The session already holds the maximum number of topic channels.
    TooManyChannels,
    /// A notification id that is not `<ms>-<seq>`.
    BadId,
    /// The inbox (Redis) could not be reached; retry.
    InboxUnavailable,
}

impl ErrorCode {
    /// Bounded label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::BadFrame => "bad_frame",
            Self::Unsupported => "unsupported",
            Self::NotAllowed => "not_allowed",
            Self::BadChannel => "bad_channel",
            Self::TooManyChannels => "too_many_channels",
            Self::BadId => "bad_id",
            Self::InboxUnavailable => "inbox_unavailable",
        }
    }
}

/// A frame ready for the socket: text or binary, cheap to clone (reference-counted bytes), so
/// one encoding is shared by every session that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFrame {
    /// Validated UTF-8, so no session checks it again.
    Text(Utf8Bytes),
    Binary(Bytes),
    /// A WebSocket ping (the heartbeat).
    Ping,
}

impl WireFrame {
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) => b.len(),
            Self::Ping => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn text(s: String) -> Self {
        Self::Text(Utf8Bytes::from(s))
    }
}

/// Why the node closes a session. Each reason has a WebSocket close code (documented in
/// `docs/protocol.md`) and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the session ended normally.
    Normal,
    /// The client went away without a close handshake (nothing is sent; 1006 is what the
    /// client's library reports).
    Gone,
    /// The node is shutting down; reconnect after the given delay (jittered per session).
    ServerShutdown { reconnect_after_ms: u64 },
    /// The client did not read fast enough and its outbox filled up; it should reconnect.
    SlowConsumer,
    /// No frame (not even a pong) arrived within the heartbeat timeout.
    HeartbeatTimeout,
    /// The client sent more frames per second than allowed.
    RateLimited,
    /// The user already has the maximum number of sessions on this node.
    TooManyConnections,
    /// A client frame was larger than the configured limit.
    MessageTooBig,
    /// The client broke the WebSocket protocol (bad masking, invalid UTF-8, ...).
    ProtocolError,
    /// Pusher: the app key in the URL names no configured app.
    UnknownApp,
    /// Pusher: the app has its maximum number of connections.
    OverCapacity,
    /// Pusher: a signin with a bad signature, or the app terminated the user's connections.
    Unauthorized,
    /// Writing to the socket failed or timed out.
    WriteFailed,
}

impl CloseReason {
    /// The close code for a session speaking `format`.
    pub const fn code_for(self, format: Format) -> u16 {
        match format {
            Format::Pusher => pusher::close_code(self),
            Format::Json | Format::Raw => self.code(),
        }
    }

    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::Gone => 1006,
            Self::ProtocolError => 1002,
            Self::MessageTooBig => 1009,
            Self::WriteFailed => 1011,
            Self::ServerShutdown { .. } => 4000,
            Self::SlowConsumer => 4001,
            Self::HeartbeatTimeout => 4002,
            Self::RateLimited => 4003,
            Self::TooManyConnections => 4004,
            // Pusher-only reasons; a native session never gets them.
            Self::UnknownApp | Self::OverCapacity | Self::Unauthorized => 1008,
        }
    }

    /// Bounded label for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Gone => "gone",
            Self::ServerShutdown { .. } => "shutdown",
            Self::SlowConsumer => "slow_consumer",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::RateLimited => "rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::MessageTooBig => "message_too_big",
            Self::ProtocolError => "protocol_error",
            Self::WriteFailed => "write_failed",
            Self::UnknownApp => "unknown_app",
            Self::OverCapacity => "over_capacity",
            Self::Unauthorized => "unauthorized",
        }
    }

    /// The close frame's reason text (at most 123 bytes by RFC 6455).
    pub fn text(self) -> String {
        match self {
            Self::ServerShutdown { reconnect_after_ms } => {
                format!("server shutting down; reconnect after {reconnect_after_ms} ms")
            }
            Self::SlowConsumer => "slow consumer; reconnect and resume".to_owned(),
            Self::HeartbeatTimeout => "heartbeat timeout".to_owned(),
            Self::RateLimited => "too many frames per second".to_owned(),
            Self::TooManyConnections => "too many connections for this user".to_owned(),
            Self::MessageTooBig => "frame too large".to_owned(),
            Self::ProtocolError => "protocol error".to_owned(),
            Self::WriteFailed => "write failed".to_owned(),
            Self::UnknownApp => "unknown app key".to_owned(),
            Self::OverCapacity => "over capacity; reconnect later".to_owned(),
            Self::Unauthorized => "unauthorized".to_owned(),
            Self::Normal | Self::Gone => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_decode_and_reject_unknown_shapes() {
        assert_eq!(
            ClientFrame::decode(r#"{"type":"subscribe","channel":"news"}"#).ok(),
            Some(ClientFrame::Subscribe { channel: "news".into() })
        );
        assert_eq!(ClientFrame::decode(r#"{"type":"ping"}"#).ok(), Some(ClientFrame::Ping {}));
        assert!(ClientFrame::decode(r#"{"type":"shout"}"#).is_err());
        assert!(ClientFrame::decode(r#"{"type":"subscribe"}"#).is_err());
        assert!(ClientFrame::decode("not json").is_err());
    }

    #[test]
    fn close_texts_fit_in_a_close_frame() {
        let reasons = [
            CloseReason::Normal,
            CloseReason::Gone,
            CloseReason::ServerShutdown { reconnect_after_ms: u64::MAX },
            CloseReason::SlowConsumer,
            CloseReason::HeartbeatTimeout,
            CloseReason::RateLimited,
            CloseReason::TooManyConnections,
            CloseReason::MessageTooBig,
            CloseReason::ProtocolError,
            CloseReason::WriteFailed,
            CloseReason::UnknownApp,
            CloseReason::OverCapacity,
            CloseReason::Unauthorized,
        ];
        for r in reasons {
            assert!(r.text().len() <= 123, "{r:?}");
        }
    }
}
