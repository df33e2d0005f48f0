//! Broker payloads and notification frames: what travels on a channel between nodes, and what
//! a session writes for it.
//!
//! A channel carries, in order of recognition:
//! 1. a pushnode envelope `{"pushnode":1,"id":…,"ts":…,"data":…}` (from the API or the inbox;
//!    `"persisted":true` and `"unread":N` for inbox notifications);
//! 2. an unread-count update `{"pushnode":1,"type":"unread","unread":N}` (after a mark-read);
//! 3. a Laravel broadcast `{"event":…,"data":…,"socket":…}`;
//! 4. anything else, delivered as the notification's `data` (raw sessions get it verbatim).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{Format, PROTOCOL_VERSION, WireFrame, json, pusher};

/// Id of a persisted notification: `<ms>-<seq>` (a Redis stream id), ordered per user. Each
/// part is at most [`NoteId::MAX_PART`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NoteId {
    pub ms: u64,
    pub seq: u64,
}

impl NoteId {
    /// Largest part accepted: 2^53 - 1, exact in JavaScript (where clients keep ids) and in the
    /// inbox functions' Lua numbers and sorted-set scores. Ids the inbox makes are
    /// milliseconds and counters, far below it; anything larger is a forged or corrupt id, and
    /// the largest stream id would even make Redis refuse "everything after it".
    pub const MAX_PART: u64 = (1 << 53) - 1;
}

impl FromStr for NoteId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 16 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            p.parse::<u64>().ok().filter(|n| *n <= Self::MAX_PART).ok_or(())
        };
        Ok(Self { ms: part(ms)?, seq: part(seq)? })
    }
}

impl fmt::Display for NoteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The cross-node envelope of a notification, as published on a broker channel.
///
/// `pushnode` must stay the first field (serde writes fields in declaration order): the fast
/// path that tells our payloads from foreign ones ([`starts_like_ours`]) looks for
/// `{"pushnode"` at the start, and the inbox's Lua functions write envelopes the same way.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// Marks the payload as a pushnode envelope and carries its version. First, see above.
    pub pushnode: u32,
    /// `Cow`: borrowed unless the JSON string has escapes (event names like `App\\Events\\X`).
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub event: Option<Cow<'a, str>>,
    /// Publish time, microseconds since the Unix epoch; the delivery latency is measured from it.
    pub ts: u64,
    /// Kept in the user's inbox; `id` is then a [`NoteId`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persisted: bool,
    /// The user's unread count right after this notification (persisted only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<u64>,
    /// A Pusher socket id (`<node>.<session>`) that must not get this message: the sender of a
    /// client event, or the `socket_id` of a Pusher API publish (Echo's `toOthers()`).
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub socket: Option<Cow<'a, str>>,
    /// The sender's user id of a client event on a Pusher presence channel (its JSON).
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    pub user_id: Option<&'a RawValue>,
    /// Not a message: every session on the channel is to be closed (Pusher's
    /// `terminate_connections`, on a signed-in user's channel).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminate: bool,
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
            persisted: false,
            unread: None,
            socket: None,
            user_id: None,
            terminate: false,
            data,
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// A user's new unread count, published after notifications were marked read. Like
/// [`Envelope`], it must serialise `pushnode` first (the Lua `pushnode_read` writes it so too).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnreadUpdate {
    /// First, see above.
    pub pushnode: u32,
    #[serde(rename = "type")]
    pub kind: UnreadKind,
    pub unread: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UnreadKind {
    Unread,
}

impl UnreadUpdate {
    pub fn encode(unread: u64) -> Bytes {
        let update = Self { pushnode: PROTOCOL_VERSION, kind: UnreadKind::Unread, unread };
        Bytes::from(serde_json::to_vec(&update).unwrap_or_default())
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    persisted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    unread: Option<u64>,
    /// Sent again from the inbox (on connect, resume, or after a broker gap).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replay: bool,
    /// Replayed notifications say whether they were read meanwhile (on any device).
    #[serde(skip_serializing_if = "Option::is_none")]
    read: Option<bool>,
    data: &'a RawValue,
    /// Publish time in milliseconds since the Unix epoch (JavaScript's `Date` unit).
    time: u64,
}

impl<'a> Notification<'a> {
    /// A live notification with nothing persisted about it; callers override what differs.
    fn new(id: &'a str, channel: Option<&'a str>, event: Option<&'a str>, data: &'a RawValue, ts_us: u64) -> Self {
        Self {
            kind: "notification",
            id,
            channel,
            event,
            persisted: false,
            unread: None,
            replay: false,
            read: None,
            data,
            time: ts_us / 1000,
        }
    }

    fn encode(&self) -> WireFrame {
        WireFrame::text(serde_json::to_string(self).unwrap_or_default())
    }
}

/// The `unread` frame: `{"type":"unread","unread":N}`.
pub fn unread_frame(unread: u64) -> WireFrame {
    WireFrame::text(format!(r#"{{"type":"unread","unread":{unread}}}"#))
}

/// One message arriving on one channel, encoded at most once per [`Format`] on this node, and
/// only for the formats some session of the channel uses.
#[derive(Debug)]
pub struct Delivery {
    /// Publish time in microseconds since the Unix epoch.
    pub ts: u64,
    /// Inbox id, for persisted notifications.
    pub persisted: Option<NoteId>,
    /// Built on first use for foreign payloads (raw-only channels never pay for it).
    json: OnceCell<WireFrame>,
    /// `None` for frames raw sessions do not get (unread-count updates).
    raw: Option<WireFrame>,
    /// Built on first use, for Pusher sessions.
    pusher: OnceCell<Option<WireFrame>>,
    /// The session (node part, session part of a Pusher socket id) that must not get it.
    pub except: Option<(u32, u64)>,
    /// Close every session of the channel instead of delivering (see [`Envelope::terminate`]).
    pub terminate: bool,
    payload: Bytes,
    topic: Option<Arc<str>>,
    /// An envelope whose `data` fails [`json::check`]: JSON sessions do not get it.
    invalid: bool,
    /// One of our envelopes (its frames are built from `payload` when not built at decode).
    envelope: bool,
}

/// Whether the payload looks like one of ours: envelopes and unread updates are written with
/// `pushnode` as their first key (by this node, the inbox functions, and the documented
/// format), so anything else skips two failing parses.
fn starts_like_ours(payload: &[u8]) -> bool {
    let trimmed = payload.trim_ascii_start();
    trimmed.starts_with(b"{\"pushnode\"")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Delivery {
    /// Decodes a broker payload. `topic` is the topic name when the channel is a topic channel
    /// (it goes into the frame's `channel` field), `None` for a user channel.
    pub fn decode(payload: &Bytes, topic: Option<&Arc<str>>) -> Self {
        Self::decode_for(payload, topic, Format::Json)
    }

    /// As [`Delivery::decode`], building at once the frame for `format`, the one the channel's
    /// sessions speak (a Pusher channel's, or a native one's): an envelope is parsed once and
    /// the frame made from it, the other formats' frames only if a session asks.
    pub fn decode_for(payload: &Bytes, topic: Option<&Arc<str>>, format: Format) -> Self {
        let json = OnceCell::new();
        let pusher_frame = OnceCell::new();
        let topic = topic.cloned();
        if starts_like_ours(payload) {
            if let Ok(env) = serde_json::from_slice::<Envelope<'_>>(payload)
                && env.pushnode == PROTOCOL_VERSION
            {
                let raw = text_or_binary(payload.slice_ref(env.data.get().as_bytes()));
                let except = env.socket.as_deref().and_then(pusher::parse_socket_id);
                let terminate = env.terminate;
                if json::check(env.data.get()).is_err() {
                    return Self {
                        ts: env.ts,
                        persisted: None,
                        json,
                        raw: Some(raw),
                        pusher: OnceCell::new(),
                        except,
                        terminate,
                        payload: Bytes::new(),
                        topic,
                        invalid: true,
                        envelope: true,
                    };
                }
                if format == Format::Pusher {
                    let _ = pusher_frame.set(envelope_pusher_frame(&env, topic.as_deref()));
                } else {
                    let _ = json.set(envelope_json(&env, topic.as_deref()));
                }
                // The raw form is the published `data`, byte for byte.
                let persisted = if env.persisted { env.id.parse().ok() } else { None };
                return Self {
                    ts: env.ts,
                    persisted,
                    json,
                    raw: Some(raw),
                    pusher: pusher_frame,
                    except,
                    terminate,
                    // Kept for the frames not built above, built if a session wants them.
                    payload: payload.clone(),
                    topic,
                    invalid: false,
                    envelope: true,
                };
            }
            if let Ok(update) = serde_json::from_slice::<UnreadUpdate>(payload) {
                let _ = json.set(unread_frame(update.unread));
                return Self {
                    ts: 0,
                    persisted: None,
                    json,
                    raw: None,
                    pusher: OnceCell::from(None),
                    except: None,
                    terminate: false,
                    payload: Bytes::new(),
                    topic,
                    invalid: false,
                    envelope: false,
                };
            }
        }
        Self {
            ts: now_micros(),
            persisted: None,
            json,
            raw: Some(text_or_binary(payload.clone())),
            pusher: OnceCell::new(),
            except: None,
            terminate: false,
            payload: payload.clone(),
            topic,
            invalid: false,
            envelope: false,
        }
    }

    /// Whether this is one of our envelopes with `data` that fails [`json::check`] (published
    /// straight into Redis by someone else): JSON sessions do not get it, raw sessions still do.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }

    /// The frame for a session of `format`, or `None` if such sessions do not get this one.
    /// `fallback_id` names foreign payloads, which carry no id, when their JSON frame is built.
    pub fn frame(&self, format: Format, fallback_id: &dyn Fn() -> String) -> Option<&WireFrame> {
        match format {
            Format::Json if self.invalid => None,
            Format::Json => Some(self.json.get_or_init(|| match self.parsed() {
                Some(env) => envelope_json(&env, self.topic.as_deref()),
                None => self.foreign_json(&fallback_id()),
            })),
            Format::Raw => self.raw.as_ref(),
            Format::Pusher if self.invalid => None,
            Format::Pusher => self.pusher.get_or_init(|| self.pusher_frame()).as_ref(),
        }
    }

    /// The Pusher event frame: the envelope's (or a Laravel broadcast's) event and data, on the
    /// channel's Pusher name. Payloads without an event name are not Pusher events: `None`.
    fn pusher_frame(&self) -> Option<WireFrame> {
        let channel = self.topic.as_deref()?;
        if self.envelope {
            return envelope_pusher_frame(&self.parsed()?, Some(channel));
        }
        let laravel = serde_json::from_slice::<LaravelBroadcast<'_>>(&self.payload).ok()?;
        json::check(laravel.data.get()).ok()?;
        Some(pusher::event_frame(&laravel.event, channel, laravel.data, None))
    }

    /// The envelope again, for a frame not built at decode.
    fn parsed(&self) -> Option<Envelope<'_>> {
        if !self.envelope {
            return None;
        }
        serde_json::from_slice(&self.payload).ok()
    }

    /// The notification frame around a payload that is not ours.
    fn foreign_json(&self, id: &str) -> WireFrame {
        let payload = &self.payload[..];
        let foreign = |event: Option<&str>, data: &RawValue| {
            Notification::new(id, self.topic.as_deref(), event, data, self.ts).encode()
        };
        // Only JSON that passes `json::check` is embedded as JSON; anything else is carried as a
        // string, so every frame a client gets parses.
        let checked = |raw: &RawValue| json::check(raw.get()).is_ok();
        if contains(payload, b"\"event\"")
            && let Ok(laravel) = serde_json::from_slice::<LaravelBroadcast<'_>>(payload)
            && checked(laravel.data)
        {
            // A Laravel broadcast: its event name and data become the notification's.
            return foreign(Some(&laravel.event), laravel.data);
        }
        if let Ok(data) = serde_json::from_slice::<&RawValue>(payload)
            && checked(data)
        {
            return foreign(None, data);
        }
        // Not JSON: carry it as a JSON string so the JSON frame stays valid.
        let quoted = serde_json::to_string(&String::from_utf8_lossy(payload)).unwrap_or_default();
        let data = RawValue::from_string(quoted).unwrap_or_else(|_| null_value());
        foreign(None, &data)
    }
}

/// The `notification` frame of an envelope.
fn envelope_json(env: &Envelope<'_>, topic: Option<&str>) -> WireFrame {
    Notification {
        persisted: env.persisted,
        unread: env.unread,
        ..Notification::new(&env.id, topic, env.event.as_deref(), env.data, env.ts)
    }
    .encode()
}

/// The Pusher event frame of an envelope: only envelopes with an event name on a named
/// channel are Pusher events.
fn envelope_pusher_frame(env: &Envelope<'_>, channel: Option<&str>) -> Option<WireFrame> {
    Some(pusher::event_frame(env.event.as_deref()?, channel?, env.data, env.user_id))
}

/// A replayed inbox notification, for JSON sessions.
pub fn encode_stored(id: NoteId, ts_us: u64, event: Option<&str>, data: &RawValue, read: bool) -> WireFrame {
    let id = id.to_string();
    Notification { persisted: true, replay: true, read: Some(read), ..Notification::new(&id, None, event, data, ts_us) }
        .encode()
}

fn null_value() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(d: &Delivery) -> serde_json::Value {
        let Some(WireFrame::Text(json)) = d.frame(Format::Json, &|| "fallback".to_owned()) else {
            panic!("text expected")
        };
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn note_ids_parse_print_and_order() {
        let a: NoteId = "1764136800123-0".parse().unwrap();
        let b: NoteId = "1764136800123-10".parse().unwrap();
        let c: NoteId = "1764136800124-2".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1764136800123-10");
        for bad in [
            "",
            "1-",
            "-1",
            "1-2-3",
            "x-1",
            "1 -2",
            "+1-2",
            "99999999999999999999999-1",
            "18446744073709551615-18446744073709551615",
            "9007199254740992-0",
            "0-9007199254740992",
        ] {
            assert!(bad.parse::<NoteId>().is_err(), "{bad:?}");
        }
        let max: NoteId = "9007199254740991-9007199254740991".parse().unwrap();
        assert_eq!((max.ms, max.seq), (NoteId::MAX_PART, NoteId::MAX_PART));
    }

    #[test]
    fn persisted_envelopes_carry_their_id_and_unread_count() {
        let payload = Bytes::from_static(
            br#"{"pushnode":1,"id":"1764136800123-4","ts":1764136800123456,"persisted":true,"unread":3,"data":{"a":1}}"#,
        );
        let d = Delivery::decode(&payload, None);
        assert_eq!(d.persisted, Some(NoteId { ms: 1764136800123, seq: 4 }));
        let v = json_of(&d);
        assert_eq!(
            (v["persisted"].as_bool(), v["unread"].as_u64(), v["time"].as_u64()),
            (Some(true), Some(3), Some(1764136800123))
        );
    }

    #[test]
    fn a_pusher_channels_delivery_builds_the_pusher_frame_first_and_the_others_on_demand() {
        let payload =
            Bytes::from_static(br#"{"pushnode":1,"id":"n1-7","event":"shipped","ts":5,"socket":"3.9","data":{"a":1}}"#);
        let topic = Arc::from("private-orders");
        let d = Delivery::decode_for(&payload, Some(&topic), Format::Pusher);
        assert_eq!(d.except, Some((3, 9)));
        assert_eq!(
            d.frame(Format::Pusher, &|| unreachable!()),
            Some(&WireFrame::text(r#"{"event":"shipped","channel":"private-orders","data":"{\"a\":1}"}"#.into()))
        );
        // A JSON session on the same channel (none do, but nothing breaks) gets the notification.
        let v = json_of(&d);
        assert_eq!(
            (v["id"].as_str(), v["event"].as_str(), v["channel"].as_str()),
            (Some("n1-7"), Some("shipped"), Some("private-orders"))
        );
        // Built either way round, the frames are the same.
        let native = Delivery::decode_for(&payload, Some(&topic), Format::Json);
        assert_eq!(native.frame(Format::Pusher, &|| unreachable!()), d.frame(Format::Pusher, &|| unreachable!()));
        assert_eq!(json_of(&native), v);
        // Without an event name an envelope is no Pusher event.
        let nameless = Bytes::from_static(br#"{"pushnode":1,"id":"x","ts":5,"data":{}}"#);
        assert!(
            Delivery::decode_for(&nameless, Some(&topic), Format::Pusher)
                .frame(Format::Pusher, &|| unreachable!())
                .is_none()
        );
    }

    #[test]
    fn unread_updates_reach_json_sessions_only() {
        let d = Delivery::decode(&UnreadUpdate::encode(2), None);
        assert_eq!(json_of(&d), serde_json::json!({ "type": "unread", "unread": 2 }));
        assert!(d.frame(Format::Raw, &|| unreachable!()).is_none());
    }

    #[test]
    fn stored_notifications_are_marked_as_replays() {
        let data = RawValue::from_string("[1]".into()).unwrap();
        let WireFrame::Text(t) = encode_stored(NoteId { ms: 5, seq: 1 }, 7_000, Some("e"), &data, true) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"notification","id":"5-1","event":"e","persisted":true,"replay":true,"read":true,"data":[1],"time":7})
        );
    }

    #[test]
    fn envelope_becomes_notification_and_raw_is_the_published_data() {
        let data = RawValue::from_string(r#"{"cnt":5}"#.into()).unwrap();
        let payload = Envelope::new("n-1", Some("App\\Events\\Comment"), &data).encode();
        let d = Delivery::decode(&payload, None);
        let id = || unreachable!("envelope has an id");
        let Some(WireFrame::Text(json)) = d.frame(Format::Json, &id) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["type"], "notification");
        assert_eq!(v["id"], "n-1");
        assert_eq!(v["event"], "App\\Events\\Comment");
        assert_eq!(v["data"]["cnt"], 5);
        assert!(v.get("channel").is_none());
        assert_eq!(d.frame(Format::Raw, &id), Some(&WireFrame::Text(Utf8Bytes::from_static(r#"{"cnt":5}"#))));
    }

    #[test]
    fn foreign_payload_is_delivered_verbatim_in_raw_and_wrapped_in_json() {
        let payload = Bytes::from_static(br#"{"cnt":7}"#);
        let d = Delivery::decode(&payload, Some(&Arc::from("news")));
        let id = || "f-1".to_owned();
        assert_eq!(d.frame(Format::Raw, &id), Some(&WireFrame::Text(Utf8Bytes::from_static(r#"{"cnt":7}"#))));
        let Some(WireFrame::Text(json)) = d.frame(Format::Json, &id) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["id"], "f-1");
        assert_eq!(v["channel"], "news");
        assert_eq!(v["data"]["cnt"], 7);

        let plain = Bytes::from_static(b"hello");
        let d = Delivery::decode(&plain, None);
        let id = || "f-2".to_owned();
        let Some(WireFrame::Text(json)) = d.frame(Format::Json, &id) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["data"], "hello");

        let binary = Bytes::from_static(&[0xff, 0x00]);
        let d = Delivery::decode(&binary, None);
        let id = || "f-3".to_owned();
        assert_eq!(d.frame(Format::Raw, &id), Some(&WireFrame::Binary(binary.clone())));
    }

    #[test]
    fn a_laravel_broadcast_carries_its_event_and_data() {
        let payload = Bytes::from_static(br#"{"event":"App\\Events\\OrderShipped","data":{"order":7},"socket":null}"#);
        let d = Delivery::decode(&payload, None);
        let id = || "l-1".to_owned();
        let Some(WireFrame::Text(json)) = d.frame(Format::Json, &id) else { panic!("text expected") };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["event"], "App\\Events\\OrderShipped");
        assert_eq!(v["data"], serde_json::json!({ "order": 7 }));
    }
}
