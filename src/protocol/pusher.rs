//! The Pusher protocol 7 front end's wire format: the frames pusher-js (and Laravel Echo on it)
//! exchanges with a server, the Pusher close codes, channel names and the HMAC signatures that
//! authorise private and presence channels.
//!
//! Every Pusher frame is a JSON object `{"event": …, "channel": …, "data": …}`. The server
//! writes `data` as a JSON **string** (pusher-js parses it when it can); clients send it as an
//! object or as a string holding an object, and both are accepted. `docs/pusher.md` is the
//! prose version of this file.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::Sha256;

use super::{CloseReason, WireFrame};

/// Longest channel name Pusher accepts, in bytes.
pub const MAX_CHANNEL_LEN: usize = 164;
/// Longest event name accepted (Pusher's limit).
pub const MAX_EVENT_LEN: usize = 200;

/// The protocol version spoken (the `protocol` query parameter pusher-js sends).
pub const PROTOCOL: u32 = 7;

/// What a channel's name makes of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelClass {
    Public,
    Private,
    /// `private-encrypted-`: authorised like private; payloads are end-to-end encrypted by the
    /// application and relayed untouched.
    Encrypted,
    Presence,
    /// `#server-to-user-<id>`: the events sent to a signed-in user (`sendToUser`); only that
    /// user's sockets may subscribe.
    User,
}

/// The prefix of a user's channel (Pusher's name for it).
pub const USER_CHANNEL_PREFIX: &str = "#server-to-user-";

impl ChannelClass {
    /// Classifies a valid channel name (see [`valid_channel`]).
    pub fn of(channel: &str) -> Self {
        if channel.starts_with(USER_CHANNEL_PREFIX) {
            Self::User
        } else if channel.starts_with("private-encrypted-") {
            Self::Encrypted
        } else if channel.starts_with("private-") {
            Self::Private
        } else if channel.starts_with("presence-") {
            Self::Presence
        } else {
            Self::Public
        }
    }

    /// Whether subscribing needs a signature.
    pub fn needs_auth(self) -> bool {
        matches!(self, Self::Private | Self::Encrypted | Self::Presence)
    }
}

/// Pusher's channel name rule: 1 to [`MAX_CHANNEL_LEN`] bytes of `A-Z a-z 0-9 _ - = @ , . ;`,
/// or a user's channel `#server-to-user-<id>` (see [`valid_user_id`]). Braces are in neither
/// alphabet, so a name never breaks a Redis Cluster hash tag.
pub fn valid_channel(name: &str) -> bool {
    if let Some(user) = name.strip_prefix(USER_CHANNEL_PREFIX) {
        return valid_user_id(user);
    }
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';'))
}

/// A signed-in user's id: 1 to [`MAX_USER_ID_LEN`] bytes of `A-Z a-z 0-9 _ - = @ , . ; :`.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';' | b':'))
}

/// A socket id as Pusher server SDKs require it: `<digits>.<digits>`. The first part names the
/// node (random per process), the second the session on it.
pub fn socket_id(node: u32, session: u64) -> String {
    format!("{node}.{session}")
}

/// Splits a socket id into its node and session parts; `None` unless it is `<u32>.<u64>`.
pub fn parse_socket_id(id: &str) -> Option<(u32, u64)> {
    let (node, session) = id.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(node) || !digits(session) {
        return None;
    }
    Some((node.parse().ok()?, session.parse().ok()?))
}

/// A frame from a pusher-js client.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Ping,
    Pong,
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    /// `pushnode:read` on a user's notification channel: marks kept notifications read.
    /// `data` (JSON text) is `{"ids": […]}`, `{"up_to": id}` or `{"all": true}`.
    Read {
        channel: String,
        data: String,
    },
    /// `pusher:signin`: `user_data` (a JSON object with a string `id`) signed by the app.
    Signin {
        auth: String,
        user_data: String,
    },
    /// `client-*` on a channel: relayed to the channel's other subscribers. `data` is the JSON
    /// text as sent.
    ClientEvent {
        event: String,
        channel: String,
        data: String,
    },
    /// Any other event (`pusher:` events this server does not take, say): answered
    /// with an error, the connection stays.
    Other {
        event: String,
    },
}

/// Why a client frame was refused; the text is safe to send back in a `pusher:error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

#[derive(Deserialize)]
struct Incoming<'a> {
    event: String,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

#[derive(Deserialize)]
struct UnsubscribeData {
    channel: String,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

impl ClientFrame {
    pub fn decode(text: &str) -> Result<Self, FrameError> {
        let incoming: Incoming<'_> =
            serde_json::from_str(text).map_err(|e| FrameError(format!("invalid frame: {e}")))?;
        match incoming.event.as_str() {
            "pusher:ping" => Ok(Self::Ping),
            "pusher:pong" => Ok(Self::Pong),
            "pusher:subscribe" => {
                let data: SubscribeData = object_data(incoming.data)?;
                Ok(Self::Subscribe { channel: data.channel, auth: data.auth, channel_data: data.channel_data })
            }
            "pusher:unsubscribe" => {
                let data: UnsubscribeData = object_data(incoming.data)?;
                Ok(Self::Unsubscribe { channel: data.channel })
            }
            "pusher:signin" => {
                let data: SigninData = object_data(incoming.data)?;
                Ok(Self::Signin { auth: data.auth, user_data: data.user_data })
            }
            "pushnode:read" => {
                let channel = incoming.channel.ok_or_else(|| FrameError("pushnode:read without a channel".into()))?;
                let data = match incoming.data.map(|d| serde_json::from_str::<String>(d.get())) {
                    Some(Ok(inner)) => inner,
                    Some(Err(_)) => incoming.data.map_or_else(String::new, |d| d.get().to_owned()),
                    None => "{}".to_owned(),
                };
                Ok(Self::Read { channel, data })
            }
            event if event.starts_with("client-") => {
                let channel = incoming.channel.ok_or_else(|| FrameError("client event without a channel".into()))?;
                let data = incoming.data.map_or("{}", RawValue::get).to_owned();
                Ok(Self::ClientEvent { event: incoming.event, channel, data })
            }
            _ => Ok(Self::Other { event: incoming.event }),
        }
    }
}

/// A `data` field that must hold an object: given as an object, or as a string of one.
fn object_data<T: for<'de> Deserialize<'de>>(data: Option<&RawValue>) -> Result<T, FrameError> {
    let data = data.ok_or_else(|| FrameError("missing data".into()))?;
    let parsed = match serde_json::from_str::<String>(data.get()) {
        Ok(inner) => serde_json::from_str(&inner),
        Err(_) => serde_json::from_str(data.get()),
    };
    parsed.map_err(|e| FrameError(format!("invalid data: {e}")))
}

/// One server frame, `data` written as a JSON string.
#[derive(Serialize)]
struct Outgoing<'a> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: &'a str,
    /// The sender of a client event on a presence channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a RawValue>,
}

fn frame(event: &str, channel: Option<&str>, data: &str) -> String {
    serde_json::to_string(&Outgoing { event, channel, data, user_id: None }).unwrap_or_default()
}

/// An event frame for a delivery: `data` is the published JSON; a string is passed as it is,
/// anything else is written as a string holding it (what Pusher does). `user_id` names the
/// sender of a client event on a presence channel.
pub fn event_frame(event: &str, channel: &str, data: &RawValue, user_id: Option<&RawValue>) -> WireFrame {
    let text = data.get();
    let data = match serde_json::from_str::<String>(text) {
        Ok(string) => std::borrow::Cow::Owned(string),
        Err(_) => std::borrow::Cow::Borrowed(text),
    };
    let frame = Outgoing { event, channel: Some(channel), data: &data, user_id };
    WireFrame::text(serde_json::to_string(&frame).unwrap_or_default())
}

/// `pusher_internal:subscription_succeeded` for a presence channel: the members as pusher-js
/// wants them, `{"presence":{"ids":[…],"hash":{id: info},"count":n}}`. Each member is its
/// user id and user info as JSON texts; ids are keyed by their string form.
pub fn presence_succeeded<'a>(channel: &str, members: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut ids = Vec::new();
    let mut hash = serde_json::Map::new();
    for (user_id, user_info) in members {
        let id = match serde_json::from_str::<serde_json::Value>(user_id) {
            Ok(serde_json::Value::String(s)) => s,
            _ => user_id.to_owned(),
        };
        let info = serde_json::from_str(user_info).unwrap_or(serde_json::Value::Null);
        ids.push(serde_json::Value::String(id.clone()));
        hash.insert(id, info);
    }
    let count = ids.len();
    let data = serde_json::json!({ "presence": { "ids": ids, "hash": hash, "count": count } }).to_string();
    frame("pusher_internal:subscription_succeeded", Some(channel), &data)
}

/// A presence subscription's `channel_data`: `{"user_id": …, "user_info": …}`, the user id a
/// string or a number. Returns the id and info as JSON texts (info `null` when absent).
pub fn parse_channel_data(channel_data: &str) -> Result<(String, String), FrameError> {
    #[derive(Deserialize)]
    struct ChannelData<'a> {
        #[serde(borrow)]
        user_id: &'a RawValue,
        #[serde(default, borrow)]
        user_info: Option<&'a RawValue>,
    }
    let parsed: ChannelData<'_> =
        serde_json::from_str(channel_data).map_err(|e| FrameError(format!("invalid channel_data: {e}")))?;
    let user_id = match serde_json::from_str::<serde_json::Value>(parsed.user_id.get()) {
        Ok(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_USER_ID_LEN => {
            serde_json::to_string(&s).unwrap_or_default()
        }
        Ok(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err(FrameError(format!("user_id must be a string of 1 to {MAX_USER_ID_LEN} bytes or a number"))),
    };
    let user_info = parsed.user_info.map_or_else(|| "null".to_owned(), |i| i.get().to_owned());
    Ok((user_id, user_info))
}

/// Longest presence or signed-in user id accepted (Pusher's limit).
pub const MAX_USER_ID_LEN: usize = 128;

/// What a `pusher:signin`'s `auth` must sign.
pub fn signin_message(socket_id: &str, user_data: &str) -> String {
    format!("{socket_id}::user::{user_data}")
}

/// The user id of a signin's `user_data`, `{"id": "<string>", …}`.
pub fn signin_user(user_data: &str) -> Result<String, FrameError> {
    #[derive(Deserialize)]
    struct UserData {
        id: String,
    }
    let parsed: UserData =
        serde_json::from_str(user_data).map_err(|e| FrameError(format!("invalid user_data: {e}")))?;
    if !valid_user_id(&parsed.id) {
        return Err(FrameError(format!("user_data.id must be 1 to {MAX_USER_ID_LEN} of A-Z a-z 0-9 _ - = @ , . ; :")));
    }
    Ok(parsed.id)
}

/// `pusher:signin_success`, echoing the signed `user_data`.
pub fn signin_success(user_data: &str) -> String {
    let data = serde_json::json!({ "user_data": user_data }).to_string();
    frame("pusher:signin_success", None, &data)
}

/// `pusher:connection_established`: the socket id, and the seconds of silence after which the
/// client should send `pusher:ping`.
pub fn connection_established(socket_id: &str, activity_timeout: u64) -> String {
    let data = serde_json::json!({ "socket_id": socket_id, "activity_timeout": activity_timeout }).to_string();
    frame("pusher:connection_established", None, &data)
}

pub fn pong() -> String {
    frame("pusher:pong", None, "{}")
}

/// The node's own ping (the heartbeat, for Pusher sessions): pusher-js answers `pusher:pong`.
pub const PING: &str = r#"{"event":"pusher:ping","data":"{}"}"#;

/// `pusher:error`, connection-scoped. `code` `None` for errors that do not close.
pub fn error(code: Option<u16>, message: &str) -> String {
    let data = serde_json::json!({ "code": code, "message": message });
    // Pusher writes this one's data as an object; pusher-js accepts both.
    serde_json::json!({ "event": "pusher:error", "data": data }).to_string()
}

pub fn subscription_succeeded(channel: &str) -> String {
    frame("pusher_internal:subscription_succeeded", Some(channel), "{}")
}

/// A channel-scoped `pusher:subscription_error` (pusher-js emits `subscription_error` on the
/// channel, and Echo's `.error()` fires).
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> String {
    let data = serde_json::json!({ "type": kind, "error": message, "status": status }).to_string();
    frame("pusher:subscription_error", Some(channel), &data)
}

/// The close code a Pusher client gets for `reason`. pusher-js acts on the range: 4000–4099
/// do not reconnect, 4100–4199 reconnect after a back-off, 4200–4299 reconnect at once.
pub const fn close_code(reason: CloseReason) -> u16 {
    match reason {
        CloseReason::Normal => 1000,
        CloseReason::Gone => 1006,
        CloseReason::ProtocolError => 1002,
        CloseReason::MessageTooBig => 1009,
        CloseReason::WriteFailed => 1011,
        CloseReason::UnknownApp => 4001,
        CloseReason::Unauthorized => 4009,
        CloseReason::OverCapacity | CloseReason::SlowConsumer | CloseReason::TooManyConnections => 4100,
        // A draining node: reconnect at once (to another node).
        CloseReason::ServerShutdown { .. } => 4200,
        CloseReason::HeartbeatTimeout => 4201,
        CloseReason::RateLimited => 4301,
    }
}

/// Hex HMAC-SHA256 of `message` under `secret`: how applications sign channel authorisations.
pub fn sign(secret: &str, message: &str) -> String {
    let mut mac = hmac(secret);
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a hex HMAC-SHA256 `signature` of `message` in constant time.
pub fn verify(secret: &str, message: &str, signature: &str) -> bool {
    let Ok(signature) = hex::decode(signature) else { return false };
    let mut mac = hmac(secret);
    mac.update(message.as_bytes());
    mac.verify_slice(&signature).is_ok()
}

fn hmac(secret: &str) -> Hmac<Sha256> {
    // HMAC takes keys of any length; this cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!())
}

/// What a subscription's `auth` must sign: `socket_id:channel`, plus `:channel_data` on a
/// presence channel.
pub fn auth_message(socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    }
}

/// Checks a subscription's `auth` (`<app key>:<hex signature>`) for `key`/`secret`.
pub fn check_auth(key: &str, secret: &str, auth: &str, message: &str) -> bool {
    match auth.split_once(':') {
        Some((given_key, signature)) => given_key == key && verify(secret, message, signature),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_data_is_taken_as_an_object_or_a_string() {
        let object = r#"{"event":"pusher:subscribe","data":{"channel":"private-a","auth":"k:00"}}"#;
        let string = r#"{"event":"pusher:subscribe","data":"{\"channel\":\"private-a\",\"auth\":\"k:00\"}"}"#;
        let expected =
            ClientFrame::Subscribe { channel: "private-a".into(), auth: Some("k:00".into()), channel_data: None };
        assert_eq!(ClientFrame::decode(object), Ok(expected));
        assert_eq!(
            ClientFrame::decode(string),
            Ok(ClientFrame::Subscribe { channel: "private-a".into(), auth: Some("k:00".into()), channel_data: None })
        );
        assert!(ClientFrame::decode(r#"{"event":"pusher:subscribe","data":{}}"#).is_err());
        assert!(ClientFrame::decode(r#"{"event":"pusher:subscribe"}"#).is_err());
        assert!(ClientFrame::decode("[1]").is_err());
        assert_eq!(ClientFrame::decode(r#"{"event":"pusher:ping","data":{}}"#), Ok(ClientFrame::Ping));
    }

    #[test]
    fn server_data_is_a_json_string() {
        let established: serde_json::Value = serde_json::from_str(&connection_established("12.34", 30)).unwrap();
        let data: serde_json::Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "12.34");
        assert_eq!(data["activity_timeout"], 30);

        let object = RawValue::from_string(r#"{"a":1}"#.into()).unwrap();
        let string = RawValue::from_string(r#""already a string""#.into()).unwrap();
        assert_eq!(
            event_frame("e", "c", &object, None),
            WireFrame::text(r#"{"event":"e","channel":"c","data":"{\"a\":1}"}"#.into())
        );
        assert_eq!(
            event_frame("e", "c", &string, None),
            WireFrame::text(r#"{"event":"e","channel":"c","data":"already a string"}"#.into())
        );
        let user = RawValue::from_string("7".into()).unwrap();
        assert_eq!(
            event_frame("client-x", "presence-c", &object, Some(&user)),
            WireFrame::text(r#"{"event":"client-x","channel":"presence-c","data":"{\"a\":1}","user_id":7}"#.into())
        );
    }

    #[test]
    fn presence_members_and_channel_data() {
        assert_eq!(
            parse_channel_data(r#"{"user_id":7,"user_info":{"name":"A"}}"#),
            Ok(("7".into(), r#"{"name":"A"}"#.into()))
        );
        assert_eq!(parse_channel_data(r#"{"user_id":"u-1"}"#), Ok((r#""u-1""#.into(), "null".into())));
        assert!(parse_channel_data(r#"{"user_id":""}"#).is_err());
        assert!(parse_channel_data(r#"{"user_id":{"a":1}}"#).is_err());
        assert!(parse_channel_data("{}").is_err());
        let members = [("7", r#"{"name":"A"}"#), (r#""u-1""#, "null")];
        let frame: serde_json::Value =
            serde_json::from_str(&presence_succeeded("presence-r", members.into_iter())).unwrap();
        let data: serde_json::Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["presence"]["count"], 2);
        assert_eq!(data["presence"]["ids"], serde_json::json!(["7", "u-1"]));
        assert_eq!(data["presence"]["hash"]["7"]["name"], "A");
    }

    #[test]
    fn socket_ids_round_trip_and_reject_other_shapes() {
        assert_eq!(parse_socket_id(&socket_id(7, 42)), Some((7, 42)));
        for bad in ["", "1", "1.", ".1", "a.1", "1.2.3", "1.-2", "99999999999.1"] {
            assert_eq!(parse_socket_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn signatures_match_pusher_and_reject_tampering() {
        // The example from Pusher's channel authorization documentation.
        let message = auth_message("1234.1234", "private-foobar", None);
        let signature = sign("7ad3773142a6692b25b8", &message);
        assert_eq!(signature, "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4");
        assert!(check_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            &format!("278d425bdf160c739803:{signature}"),
            &message
        ));
        assert!(!check_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            &format!("other-key:{signature}"),
            &message
        ));
        assert!(!check_auth("278d425bdf160c739803", "7ad3773142a6692b25b8", "278d425bdf160c739803:00", &message));
        assert!(!check_auth("278d425bdf160c739803", "7ad3773142a6692b25b8", &signature, &message));
        assert!(!verify("7ad3773142a6692b25b8", "1234.1234:private-other", &signature));
    }

    #[test]
    fn channel_names_and_classes() {
        assert!(valid_channel("presence-room.1;a,b=c@d"));
        assert!(!valid_channel("a{b}"));
        assert!(!valid_channel(""));
        assert!(!valid_channel(&"x".repeat(MAX_CHANNEL_LEN + 1)));
        assert_eq!(ChannelClass::of("private-encrypted-x"), ChannelClass::Encrypted);
        assert_eq!(ChannelClass::of("private-x"), ChannelClass::Private);
        assert_eq!(ChannelClass::of("presence-x"), ChannelClass::Presence);
        assert_eq!(ChannelClass::of("news"), ChannelClass::Public);
    }
}
