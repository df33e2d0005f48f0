//! The Pusher HTTP API, as Pusher server SDKs call it, each request signed with the app's
//! secret: `POST /apps/<id>/events` and `/batch_events`; `GET /apps/<id>/channels`,
//! `/channels/<name>` and `/channels/<name>/users` (counts and members across the cluster);
//! `POST /apps/<id>/users/<user>/terminate_connections`.
//!
//! Signing (Pusher's): the query carries `auth_key`, `auth_timestamp` (seconds; accepted
//! within [`MAX_CLOCK_SKEW`] of the node's clock), `auth_version=1.0`, `body_md5` (hex MD5 of
//! a non-empty body) and `auth_signature`, the hex HMAC-SHA256 of
//! `METHOD\nPATH\n<the other parameters, keys lower-cased, sorted, k=v joined by &>`. Any
//! mismatch is a 401 naming what was wrong, and nothing is published.
//!
//! An event reaches every subscriber of its channels on every node, except the socket named
//! by `socket_id` (Echo's `toOthers()`). Errors are JSON `{"error": "..."}`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::metrics as m;
use crate::node::Node;
use crate::protocol::pusher::{self, MAX_EVENT_LEN, parse_socket_id, valid_channel};
use crate::protocol::{Envelope, json};

use super::{App, counts};
use crate::presence::ChannelRef;

/// How far `auth_timestamp` may be from the node's clock (Pusher's rule).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);
/// Most channels one event may go to (Pusher's limit).
pub const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Most events in one batch (Pusher's limit).
pub const MAX_BATCH: usize = 10;

pub fn router(node: Node) -> Router {
    Router::new()
        .route("/apps/{app}/events", post(events))
        .route("/apps/{app}/batch_events", post(batch_events))
        .route("/apps/{app}/channels", get(channels))
        .route("/apps/{app}/channels/{channel}", get(channel))
        .route("/apps/{app}/channels/{channel}/users", get(users))
        .route("/apps/{app}/users/{user}/terminate_connections", post(terminate))
        .with_state(node)
}

/// A refused request.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    metrics::counter!(m::CLIENT_ERRORS, "code" => "pusher_api_unauthorized").increment(1);
    ApiError(StatusCode::UNAUTHORIZED, message.into())
}

/// One event of a request: `data` is a string in Pusher's API (an object is accepted too).
#[derive(Debug, Deserialize)]
struct Event {
    name: String,
    data: Box<RawValue>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    /// Attributes to return per channel: `subscription_count`, `user_count`.
    #[serde(default)]
    info: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Batch {
    batch: Vec<Event>,
}

async fn events(State(node): State<Node>, Path(app): Path<String>, req: Request) -> Response {
    match signed_body(&node, &app, req).await {
        Ok((app, body)) => match serde_json::from_slice::<Event>(&body) {
            Ok(event) => match publish(&node, &app, &event).await {
                Ok(()) => match event.info.as_deref() {
                    None => Json(json!({})).into_response(),
                    Some(info) => {
                        match channel_infos(&node, &app, &check(&node, &event).unwrap_or_default(), info).await {
                            Ok(channels) => Json(json!({ "channels": channels })).into_response(),
                            Err(e) => e.into_response(),
                        }
                    }
                },
                Err(e) => e.into_response(),
            },
            Err(e) => bad(format!("invalid body: {e}")).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn batch_events(State(node): State<Node>, Path(app): Path<String>, req: Request) -> Response {
    let (app, body) = match signed_body(&node, &app, req).await {
        Ok(signed) => signed,
        Err(e) => return e.into_response(),
    };
    let batch = match serde_json::from_slice::<Batch>(&body) {
        Ok(batch) => batch.batch,
        Err(e) => return bad(format!("invalid body: {e}")).into_response(),
    };
    if batch.len() > MAX_BATCH {
        return bad(format!("at most {MAX_BATCH} events per batch")).into_response();
    }
    // Every event is checked before any is published: a bad one refuses the whole batch.
    for (i, event) in batch.iter().enumerate() {
        if let Err(ApiError(status, message)) = check(&node, event) {
            return ApiError(status, format!("batch[{i}]: {message}")).into_response();
        }
    }
    for event in &batch {
        if let Err(e) = publish(&node, &app, event).await {
            return e.into_response();
        }
    }
    let mut answers = Vec::with_capacity(batch.len());
    for event in &batch {
        let answer = match (event.info.as_deref(), &event.channel) {
            (Some(info), Some(channel)) => match channel_info(&node, &app, channel, info).await {
                Ok(attributes) => attributes,
                Err(e) => return e.into_response(),
            },
            _ => json!({}),
        };
        answers.push(answer);
    }
    Json(json!({ "batch": answers })).into_response()
}

/// Query parameters of the channel queries (the signature's parameters come along).
#[derive(Debug, Deserialize)]
struct ChannelQuery {
    #[serde(default)]
    info: Option<String>,
    #[serde(default)]
    filter_by_prefix: Option<String>,
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `GET /apps/<id>/channels[?filter_by_prefix=…][&info=user_count]`: the occupied channels.
async fn channels(
    State(node): State<Node>,
    Path(app): Path<String>,
    Query(query): Query<ChannelQuery>,
    req: Request,
) -> Response {
    let (app, _) = match signed_body(&node, &app, req).await {
        Ok(signed) => signed,
        Err(e) => return e.into_response(),
    };
    let prefix = query.filter_by_prefix.unwrap_or_default();
    let user_count = counts::wants(query.info.as_deref(), "user_count");
    if user_count && !prefix.starts_with("presence-") {
        return bad("info=user_count needs filter_by_prefix=presence-").into_response();
    }
    let all = match node.counts().all(&app.settings.id).await {
        Ok(all) => all,
        Err(e) => return unavailable(e).into_response(),
    };
    let mut channels = serde_json::Map::new();
    for (name, _) in all.into_iter().filter(|(name, _)| name.starts_with(&prefix)) {
        let mut attributes = serde_json::Map::new();
        if user_count {
            match node.presence().members(&presence_ref(&node, &app, &name)).await {
                Ok(members) => {
                    attributes.insert("user_count".into(), members.len().into());
                }
                Err(e) => return unavailable(e).into_response(),
            }
        }
        channels.insert(name, attributes.into());
    }
    Json(json!({ "channels": channels })).into_response()
}

/// `GET /apps/<id>/channels/<name>[?info=subscription_count,user_count]`.
async fn channel(
    State(node): State<Node>,
    Path((app, channel)): Path<(String, String)>,
    Query(query): Query<ChannelQuery>,
    req: Request,
) -> Response {
    let (app, _) = match signed_body(&node, &app, req).await {
        Ok(signed) => signed,
        Err(e) => return e.into_response(),
    };
    if !valid_channel(&channel) {
        return bad("invalid channel name").into_response();
    }
    match channel_info(&node, &app, &channel, query.info.as_deref().unwrap_or_default()).await {
        Ok(info) => Json(info).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `occupied` and the asked-for counts of one channel, across the cluster.
async fn channel_info(node: &Node, app: &App, channel: &str, info: &str) -> Result<serde_json::Value, ApiError> {
    let subscriptions = node.counts().subscription_count(&app.settings.id, channel).await.map_err(unavailable)?;
    let mut out = serde_json::Map::new();
    let mut occupied = subscriptions > 0;
    if counts::has_users(channel) {
        let members = node.presence().members(&presence_ref(node, app, channel)).await.map_err(unavailable)?;
        occupied |= !members.is_empty();
        if counts::wants(Some(info), "user_count") {
            out.insert("user_count".into(), members.len().into());
        }
    } else if counts::wants(Some(info), "user_count") {
        return Err(bad("user_count is only for presence channels"));
    }
    if counts::wants(Some(info), "subscription_count") {
        out.insert("subscription_count".into(), subscriptions.into());
    }
    out.insert("occupied".into(), occupied.into());
    Ok(out.into())
}

/// The `channels` object of a publish's `info` answer.
async fn channel_infos(node: &Node, app: &App, channels: &[&str], info: &str) -> Result<serde_json::Value, ApiError> {
    let mut out = serde_json::Map::new();
    for channel in channels {
        let mut attributes = channel_info(node, app, channel, info).await?;
        if let Some(map) = attributes.as_object_mut() {
            map.remove("occupied");
        }
        out.insert((*channel).to_owned(), attributes);
    }
    Ok(out.into())
}

/// `GET /apps/<id>/channels/<presence channel>/users`: the members, from every node.
async fn users(State(node): State<Node>, Path((app, channel)): Path<(String, String)>, req: Request) -> Response {
    let (app, _) = match signed_body(&node, &app, req).await {
        Ok(signed) => signed,
        Err(e) => return e.into_response(),
    };
    if !valid_channel(&channel) || !counts::has_users(&channel) {
        return bad("users are listed for presence channels only").into_response();
    }
    match node.presence().members(&presence_ref(&node, &app, &channel)).await {
        Ok(members) => {
            let users: Vec<serde_json::Value> = members
                .iter()
                .map(|m| {
                    // Ids are listed as strings, as Pusher does.
                    let id = match serde_json::from_str::<serde_json::Value>(&m.user_id) {
                        Ok(serde_json::Value::String(s)) => s,
                        _ => m.user_id.clone(),
                    };
                    json!({ "id": id })
                })
                .collect();
            Json(json!({ "users": users })).into_response()
        }
        Err(e) => unavailable(e).into_response(),
    }
}

/// `POST /apps/<id>/users/<user>/terminate_connections`: closes every socket signed in as the
/// user, on every node (4009; pusher-js does not reconnect).
async fn terminate(State(node): State<Node>, Path((app, user)): Path<(String, String)>, req: Request) -> Response {
    let (app, _) = match signed_body(&node, &app, req).await {
        Ok(signed) => signed,
        Err(e) => return e.into_response(),
    };
    if !pusher::valid_user_id(&user) {
        return bad("invalid user id").into_response();
    }
    let channel = format!("{}{user}", pusher::USER_CHANNEL_PREFIX);
    let id = node.hub().next_message_id();
    let empty = serde_json::value::to_raw_value(&json!({})).unwrap_or_default();
    let mut envelope = Envelope::new(&id, None, &empty);
    envelope.terminate = true;
    let broker_channel = node.apps().broker_channel(&app.settings.id, &channel);
    match node.broker().publish(&broker_channel, envelope.encode()).await {
        Ok(()) => Json(json!({})).into_response(),
        Err(e) => unavailable(e).into_response(),
    }
}

fn presence_ref(node: &Node, app: &App, channel: &str) -> ChannelRef {
    ChannelRef {
        app_id: app.settings.id.as_str().into(),
        name: channel.into(),
        broker_channel: node.apps().broker_channel(&app.settings.id, channel),
    }
}

/// The event's channels, checked with the rest of it.
fn check<'a>(node: &Node, event: &'a Event) -> Result<Vec<&'a str>, ApiError> {
    if event.name.is_empty() || event.name.len() > MAX_EVENT_LEN {
        return Err(bad(format!("name must be 1 to {MAX_EVENT_LEN} bytes")));
    }
    // The protocol's own events are the server's to send.
    if event.name.starts_with("pusher:") || event.name.starts_with("pusher_internal:") {
        return Err(bad("event names starting with pusher: or pusher_internal: are reserved"));
    }
    let channels: Vec<&str> = match (&event.channels, &event.channel) {
        (Some(list), None) => list.iter().map(String::as_str).collect(),
        (None, Some(one)) => vec![one.as_str()],
        _ => return Err(bad("give exactly one of channels and channel")),
    };
    if channels.is_empty() || channels.len() > MAX_CHANNELS_PER_EVENT {
        return Err(bad(format!("1 to {MAX_CHANNELS_PER_EVENT} channels")));
    }
    if let Some(bad_name) = channels.iter().find(|c| !valid_channel(c)) {
        return Err(bad(format!("invalid channel name {bad_name:?}")));
    }
    let limit = node.settings().limits.max_publish_bytes;
    if event.data.get().len() > limit {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("data larger than {limit} bytes (limits.max_publish_bytes)"),
        ));
    }
    json::check(event.data.get()).map_err(|e| bad(format!("data is not acceptable JSON: {e}")))?;
    if let Some(socket) = &event.socket_id
        && parse_socket_id(socket).is_none()
    {
        return Err(bad("socket_id must be <digits>.<digits>"));
    }
    Ok(channels)
}

/// Publishes one event on each of its channels; stops at the first channel the broker refuses.
/// A Laravel notification on a user's notification channel (with
/// `pusher.persist_notifications`) is first kept in the user's inbox, and goes out tagged
/// with its inbox id and the unread count.
async fn publish(node: &Node, app: &App, event: &Event) -> Result<(), ApiError> {
    let channels = check(node, event)?;
    let id = node.hub().next_message_id();
    let mut envelope = Envelope::new(&id, Some(&event.name), &event.data);
    envelope.socket = event.socket_id.as_deref().map(Into::into);
    let payload = envelope.encode();
    for channel in channels {
        let broker_channel = node.apps().broker_channel(&app.settings.id, channel);
        let kept = node.apps().notifications.as_ref().and_then(|n| n.kept(&event.name, channel));
        let payload = match kept {
            None => payload.clone(),
            Some(user) => {
                let appended =
                    node.inbox().append(user, Some(&event.name), &event.data, None).await.map_err(unavailable)?;
                let data = super::tag_notification(&event.data, &appended.id.to_string(), Some(appended.unread));
                let mut envelope = Envelope::new(&id, Some(&event.name), &data);
                envelope.socket = event.socket_id.as_deref().map(Into::into);
                envelope.encode()
            }
        };
        node.broker().publish(&broker_channel, payload).await.map_err(unavailable)?;
        metrics::counter!(m::MESSAGES_PUBLISHED).increment(1);
    }
    Ok(())
}

/// Reads the body of a request to app `app_id` and checks its signature.
async fn signed_body(node: &Node, app_id: &str, req: Request) -> Result<(std::sync::Arc<App>, bytes::Bytes), ApiError> {
    let app =
        node.apps().by_id(app_id).cloned().ok_or_else(|| ApiError(StatusCode::NOT_FOUND, "unknown app".into()))?;
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    if method == Method::POST && !is_json(&req) {
        return Err(ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json".into()));
    }
    // A batch holds up to MAX_BATCH events of up to max_publish_bytes each.
    let limit = node.settings().limits.max_publish_bytes * MAX_BATCH + 64 * 1024;
    let body = match tokio::time::timeout(node.settings().server.header_timeout, to_bytes(req.into_body(), limit)).await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return Err(ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("body larger than {limit} bytes"))),
        Err(_) => return Err(ApiError(StatusCode::REQUEST_TIMEOUT, "body not received in time".into())),
    };
    verify_request(&app, method.as_str(), &path, &query, &body, unix_now())?;
    Ok((app, body))
}

/// The signed query of a request as Pusher server SDKs make it (for clients of this API: the
/// load generator, scripts): `auth_key`, `auth_timestamp`, `auth_version`, `body_md5` and
/// `auth_signature`.
pub fn signed_query(key: &str, secret: &str, method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
    let md5 = hex::encode(Md5::digest(body));
    let query = format!("auth_key={key}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}");
    let signature = pusher::sign(secret, &format!("{method}\n{path}\n{query}"));
    format!("{query}&auth_signature={signature}")
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks a request's Pusher signature (see the module documentation).
fn verify_request(app: &App, method: &str, path: &str, query: &str, body: &[u8], now: u64) -> Result<(), ApiError> {
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.to_lowercase(), v.into_owned())).collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let signature = param("auth_signature").ok_or_else(|| unauthorized("missing auth_signature"))?.to_owned();
    if param("auth_key") != Some(app.settings.key.as_str()) {
        return Err(unauthorized("auth_key does not match the app"));
    }
    if param("auth_version") != Some("1.0") {
        return Err(unauthorized("auth_version must be 1.0"));
    }
    let timestamp: u64 =
        param("auth_timestamp").and_then(|t| t.parse().ok()).ok_or_else(|| unauthorized("missing auth_timestamp"))?;
    if now.abs_diff(timestamp) > MAX_CLOCK_SKEW.as_secs() {
        return Err(unauthorized(format!(
            "auth_timestamp is {}s from the server's time; at most {}s is accepted",
            now.abs_diff(timestamp),
            MAX_CLOCK_SKEW.as_secs()
        )));
    }
    if !body.is_empty() {
        let md5 = hex::encode(Md5::digest(body));
        if param("body_md5") != Some(md5.as_str()) {
            return Err(unauthorized("body_md5 does not match the body"));
        }
    }
    params.retain(|(k, _)| k != "auth_signature");
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let to_sign = format!("{method}\n{path}\n{}", query.join("&"));
    if !pusher::verify(&app.settings.secret, &to_sign, &signature) {
        return Err(unauthorized("invalid auth_signature"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::PusherApp;

    fn app() -> App {
        App {
            settings: PusherApp {
                id: "3".into(),
                key: "3ad3fa5b3b4b3dc6f2e8".into(),
                secret: "7ad3773142a6692b25b8".into(),
                enable_client_messages: false,
                max_connections: 0,
            },
            connections: Default::default(),
        }
    }

    /// Signs like a Pusher server SDK.
    fn signed_query(app: &App, method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
        let md5 = hex::encode(Md5::digest(body));
        let query = format!("auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}", app.settings.key);
        let signature = pusher::sign(&app.settings.secret, &format!("{method}\n{path}\n{query}"));
        format!("{query}&auth_signature={signature}")
    }

    #[test]
    fn a_signed_request_passes_and_any_change_fails() {
        let app = app();
        let body = br#"{"name":"e","channel":"c","data":"{}"}"#;
        let now = 1_700_000_000;
        let query = signed_query(&app, "POST", "/apps/3/events", body, now);
        // The public signer (for the load generator) signs the same way.
        assert_eq!(
            super::signed_query(&app.settings.key, &app.settings.secret, "POST", "/apps/3/events", body, now),
            query
        );
        assert!(verify_request(&app, "POST", "/apps/3/events", &query, body, now).is_ok());
        assert!(verify_request(&app, "POST", "/apps/3/events", &query, body, now + 600).is_ok());

        let status = |r: Result<(), ApiError>| r.err().map(|e| e.0);
        let unauthorized = Some(StatusCode::UNAUTHORIZED);
        assert_eq!(status(verify_request(&app, "POST", "/apps/3/events", &query, b"{}", now)), unauthorized);
        assert_eq!(status(verify_request(&app, "POST", "/apps/4/events", &query, body, now)), unauthorized);
        assert_eq!(status(verify_request(&app, "GET", "/apps/3/events", &query, body, now)), unauthorized);
        assert_eq!(status(verify_request(&app, "POST", "/apps/3/events", &query, body, now + 601)), unauthorized);
        let forged = query.replace("auth_signature=", "auth_signature=0");
        assert_eq!(status(verify_request(&app, "POST", "/apps/3/events", &forged, body, now)), unauthorized);
        let unsigned = query.split("&auth_signature").next().unwrap_or_default().to_owned();
        assert_eq!(status(verify_request(&app, "POST", "/apps/3/events", &unsigned, body, now)), unauthorized);
    }
}
