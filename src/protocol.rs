//! Protocol v1: the frames a client and the node exchange, the envelope that carries a
//! notification between nodes, and the close codes.
//!
//! Everything here is plain data and encoding; it depends on nothing else in the crate, so it
//! can be tested and benchmarked without sockets or Redis. `docs/protocol.md` is the prose
//! version of this file and must change with it.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

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
}

/// The cross-node envelope of a notification, as published on a broker channel.
///
/// Anything published on a channel that is not an envelope (a plain `Redis::publish` from an
/// application) is delivered as a foreign payload: see [`Delivery::decode`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// Marks the payload as a pushnode envelope and carries its version.
    pub pushnode: u32,
    /// `Cow`: borrowed unless the JSON string has escapes (event names like `App\\Events\\X`).
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub event: Option<Cow<'a, str>>,
    /// Publish time, microseconds since the Unix epoch; the delivery latency is measured from it.
    pub ts: u64,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

impl<'a> Envelope<'a> {
    pub fn new(id: &'a str, event: Option<&'a str>, data: &'a RawValue) -> Self {
        Self {
            pushnode: PROTOCOL_VERSION,
            id: Cow::Borrowed(id),
            event: event.map(Cow::Borrowed),
            ts: now_micros(),
            data,
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// What Laravel's `redis` broadcaster publishes: `{"event": ..., "data": ..., "socket": ...}`.
#[derive(Debug, Deserialize)]
struct LaravelBroadcast<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    // `socket` (the sender's socket id, to skip it) has no meaning here and is ignored.
}

/// The `notification` frame as written to JSON-format sessions.
#[derive(Debug, Serialize)]
struct Notification<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
    /// Publish time in milliseconds since the Unix epoch (JavaScript's `Date` unit).
    time: u64,
}

/// A frame ready for the socket: text or binary, cheap to clone (reference-counted bytes), so
/// one encoding is shared by every session that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireFrame {
    /// Validated UTF-8, so no session checks it again.
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl WireFrame {
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn text(s: String) -> Self {
        Self::Text(Utf8Bytes::from(s))
    }
}

/// One message arriving on one channel, encoded at most once per [`Format`] on this node.
#[derive(Debug)]
pub struct Delivery {
    /// Publish time in microseconds since the Unix epoch.
    pub ts: u64,
    json: WireFrame,
    raw: WireFrame,
}

impl Delivery {
    /// Decodes a broker payload. `topic` is the topic name when the channel is a topic channel
    /// (it goes into the frame's `channel` field), `None` for a user channel. `fallback_id`
    /// names foreign payloads, which carry no id of their own.
    pub fn decode(payload: &Bytes, topic: Option<&str>, fallback_id: impl FnOnce() -> String) -> Self {
        if let Ok(env) = serde_json::from_slice::<Envelope<'_>>(payload)
            && env.pushnode == PROTOCOL_VERSION
        {
            let json = encode_notification(&env.id, topic, env.event.as_deref(), env.data, env.ts);
            // The raw form is the published `data`, byte for byte.
            let raw = text_or_binary(payload.slice_ref(env.data.get().as_bytes()));
            return Self { ts: env.ts, json, raw };
        }
        let ts = now_micros();
        let id = fallback_id();
        if let Ok(laravel) = serde_json::from_slice::<LaravelBroadcast<'_>>(payload) {
            // A Laravel broadcast: its event name and data become the notification's.
            let json = encode_notification(&id, topic, Some(&laravel.event), laravel.data, ts);
            return Self { ts, json, raw: text_or_binary(payload.clone()) };
        }
        let json = match serde_json::from_slice::<&RawValue>(payload) {
            Ok(data) => encode_notification(&id, topic, None, data, ts),
            Err(_) => {
                // Not JSON: carry it as a JSON string so the JSON frame stays valid.
                let text = String::from_utf8_lossy(payload);
                let quoted = serde_json::to_string(&text).unwrap_or_default();
                let data = RawValue::from_string(quoted).unwrap_or_else(|_| null_value());
                encode_notification(&id, topic, None, &data, ts)
            }
        };
        Self { ts, json, raw: text_or_binary(payload.clone()) }
    }

    pub fn frame(&self, format: Format) -> &WireFrame {
        match format {
            Format::Json => &self.json,
            Format::Raw => &self.raw,
        }
    }
}

fn null_value() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_default()
}

fn encode_notification(id: &str, channel: Option<&str>, event: Option<&str>, data: &RawValue, ts: u64) -> WireFrame {
    let frame = Notification { kind: "notification", id, channel, event, data, time: ts / 1000 };
    WireFrame::text(serde_json::to_string(&frame).unwrap_or_default())
}

fn text_or_binary(bytes: Bytes) -> WireFrame {
    match Utf8Bytes::try_from(bytes.clone()) {
        Ok(text) => WireFrame::Text(text),
        Err(_) => WireFrame::Binary(bytes),
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Why the node closes a session. Each reason has a WebSocket close code (documented in
/// `docs/protocol.md`) and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the session ended normally.
    Normal,
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
    /// Writing to the socket failed or timed out.
    WriteFailed,
}

impl CloseReason {
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::ProtocolError => 1002,
            Self::MessageTooBig => 1009,
            Self::WriteFailed => 1011,
            Self::ServerShutdown { .. } => 4000,
            Self::SlowConsumer => 4001,
            Self::HeartbeatTimeout => 4002,
            Self::RateLimited => 4003,
            Self::TooManyConnections => 4004,
        }
    }

    /// Bounded label for metrics and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::ServerShutdown { .. } => "shutdown",
            Self::SlowConsumer => "slow_consumer",
            Self::HeartbeatTimeout => "heartbeat_timeout",
            Self::RateLimited => "rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::MessageTooBig => "message_too_big",
            Self::ProtocolError => "protocol_error",
            Self::WriteFailed => "write_failed",
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
            Self::Normal => String::new(),
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
    fn envelope_becomes_notification_and_raw_is_the_published_data() {
        let data = RawValue::from_string(r#"{"cnt":5}"#.into()).unwrap();
        let payload = Envelope::new("n-1", Some("App\\Events\\Comment"), &data).encode();
        let d = Delivery::decode(&payload, None, || unreachable!("envelope has an id"));
        let WireFrame::Text(json) = d.frame(Format::Json) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["type"], "notification");
        assert_eq!(v["id"], "n-1");
        assert_eq!(v["event"], "App\\Events\\Comment");
        assert_eq!(v["data"]["cnt"], 5);
        assert!(v.get("channel").is_none());
        assert_eq!(d.frame(Format::Raw), &WireFrame::Text(Utf8Bytes::from_static(r#"{"cnt":5}"#)));
    }

    #[test]
    fn foreign_payload_is_delivered_verbatim_in_raw_and_wrapped_in_json() {
        let payload = Bytes::from_static(br#"{"cnt":7}"#);
        let d = Delivery::decode(&payload, Some("news"), || "f-1".to_owned());
        assert_eq!(d.frame(Format::Raw), &WireFrame::Text(Utf8Bytes::from_static(r#"{"cnt":7}"#)));
        let WireFrame::Text(json) = d.frame(Format::Json) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["id"], "f-1");
        assert_eq!(v["channel"], "news");
        assert_eq!(v["data"]["cnt"], 7);

        let plain = Bytes::from_static(b"hello");
        let d = Delivery::decode(&plain, None, || "f-2".to_owned());
        let WireFrame::Text(json) = d.frame(Format::Json) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["data"], "hello");

        let binary = Bytes::from_static(&[0xff, 0x00]);
        let d = Delivery::decode(&binary, None, || "f-3".to_owned());
        assert_eq!(d.frame(Format::Raw), &WireFrame::Binary(binary.clone()));
    }

    #[test]
    fn a_laravel_broadcast_carries_its_event_and_data() {
        let payload = Bytes::from_static(br#"{"event":"App\\Events\\OrderShipped","data":{"order":7},"socket":null}"#);
        let d = Delivery::decode(&payload, None, || "l-1".to_owned());
        let WireFrame::Text(json) = d.frame(Format::Json) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["event"], "App\\Events\\OrderShipped");
        assert_eq!(v["data"], serde_json::json!({ "order": 7 }));
    }

    #[test]
    fn close_texts_fit_in_a_close_frame() {
        let reasons = [
            CloseReason::Normal,
            CloseReason::ServerShutdown { reconnect_after_ms: u64::MAX },
            CloseReason::SlowConsumer,
            CloseReason::HeartbeatTimeout,
            CloseReason::RateLimited,
            CloseReason::TooManyConnections,
            CloseReason::MessageTooBig,
            CloseReason::ProtocolError,
            CloseReason::WriteFailed,
        ];
        for r in reasons {
            assert!(r.text().len() <= 123, "{r:?}");
        }
    }
}
