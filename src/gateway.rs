//! The public listener: the WebSocket upgrade (at `/ws` and `/`), the demo page, the browser
//! client `/pushnode.js`, the demo helper routes when `demo.enabled`, and with Pusher apps
//! configured the Pusher WebSocket (`/app/<key>`) and, by `pusher.api_listener`, the Pusher
//! HTTP API.
//!
//! Every check happens before the 101: draining (503), origin (403), authentication (401), the
//! node's connection limit (503) and the user's (429). Only then is the connection upgraded
//! and handed to a [`session`](crate::session) task on the node's tracker.
//!
//! The upgrade is written here rather than taken from axum's `WebSocketUpgrade` for three
//! reasons: the session task must be spawned on the node's `TaskTracker` (axum spawns the
//! upgraded connection where graceful shutdown cannot wait for it); the stream needs our
//! frame meter ([`session::Metered`]) underneath tungstenite; and the task's future must stay
//! small, since every idle connection pays its size.

use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, error};

use crate::acceptor::Watched;
use crate::auth::{AuthError, bearer};
use crate::channel::valid_name;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{CloseReason, Format, NoteId};
use crate::session;
use crate::wire::{Wire, WireIo};

const DEMO_PAGE: &str = include_str!("assets/demo.html");
const INDEX_PAGE: &str = include_str!("assets/index.html");
const CLIENT_JS: &str = include_str!("assets/pushnode.js");
/// Lifetime of tokens minted by the demo route.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(3600);

pub fn router(node: Node) -> Router {
    let mut router =
        Router::new().route("/", get(index)).route("/ws", get(upgrade)).route("/pushnode.js", get(client_js));
    if node.settings().demo.enabled {
        router = router.route("/demo/token", get(demo_token)).route("/demo/send", post(demo_send));
    }
    if node.apps().is_enabled() {
        router = router.route("/app/{key}", get(pusher_upgrade));
    }
    let pusher_api = node.apps().is_enabled() && node.settings().pusher.api_listener.public();
    let router = router.with_state(node.clone());
    if pusher_api { router.merge(crate::pusher::api::router(node)) } else { router }
}

/// Connection parameters in the upgrade URL.
#[derive(Debug, Deserialize, Default)]
pub struct ConnectQuery {
    token: Option<String>,
    /// Insecure mode only.
    uid: Option<String>,
    /// `json` (default from `session.default_format`) or `raw`.
    format: Option<String>,
    /// The newest inbox id the client already has: it gets everything after it.
    last_id: Option<String>,
}

async fn index(node: State<Node>, query: Query<ConnectQuery>, req: Request) -> Response {
    if is_upgrade(req.headers()) {
        return upgrade(node, query, req).await;
    }
    if node.settings().demo.enabled { Html(DEMO_PAGE).into_response() } else { Html(INDEX_PAGE).into_response() }
}

async fn client_js() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], CLIENT_JS)
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    let has = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

fn reject(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Response {
    metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason).increment(1);
    let mut response = (status, Json(json!({ "error": message.into() }))).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

async fn upgrade(State(node): State<Node>, Query(query): Query<ConnectQuery>, mut req: Request) -> Response {
    let started = Instant::now();
    let accept = match handshake(&node, req.headers()) {
        Ok(accept) => accept,
        Err(response) => return *response,
    };
    let headers = req.headers();
    let auth = node.auth();
    let header_token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let token = query.token.as_deref().or(header_token);
    let identity = match auth.authenticate(token, query.uid.as_deref()) {
        Ok(identity) => identity,
        Err(e @ AuthError::BadUser) => return reject(StatusCode::BAD_REQUEST, e.label(), e.to_string()),
        Err(e) => return reject(StatusCode::UNAUTHORIZED, e.label(), e.to_string()),
    };
    let format = match query.format.as_deref() {
        None => node.settings().session.default_format,
        Some(f) => match Format::parse(f) {
            Some(format) => format,
            None => return reject(StatusCode::BAD_REQUEST, "bad_format", "format must be json or raw"),
        },
    };
    let last_id = match query.last_id.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(id) => match id.parse::<NoteId>() {
            Ok(id) => Some(id),
            Err(()) => return reject(StatusCode::BAD_REQUEST, "bad_last_id", "last_id must be <ms>-<seq>"),
        },
    };
    let Some(admission) = node.admit() else {
        return reject(StatusCode::SERVICE_UNAVAILABLE, "node_full", "node at its connection or memory limit; retry");
    };
    if node.hub().sessions_of(&identity.user) >= node.settings().limits.max_connections_per_user {
        return reject(StatusCode::TOO_MANY_REQUESTS, "user_limit", "too many connections for this user");
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    // Boxed: what the task needs only until the session starts stays out of the task's
    // future, whose size is paid by every connection for its whole life.
    let start = Box::new(SessionStart {
        config: ws_config(&node),
        ctx: node.session_context().clone(),
        identity,
        format,
        last_id,
    });
    let frames_per_second = node.settings().limits.client_frames_per_second;
    node.tracker().spawn(async move {
        let _admission = admission;
        match on_upgrade.await {
            Ok(upgraded) => {
                let SessionStart { config, ctx, identity, format, last_id } = *start;
                #[cfg(feature = "test-hooks")]
                if identity.user.starts_with(session::test_hooks::SLOW_START_USER) {
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                let Some(io) = wire_io(upgraded) else { return };
                let wire = io.wire().clone();
                let io = session::Metered::new(io, frames_per_second);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                session::run(ws, wire, ctx, identity, format, last_id).await;
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });

    metrics::histogram!(m::HANDSHAKE_DURATION).record(started.elapsed().as_secs_f64());
    switching_protocols(&accept)
}

/// The Pusher front end's WebSocket: `/app/<key>?protocol=7&client=js&version=…`. The checks
/// that need no app (handshake, draining, origin, the node's limits) answer in HTTP as for
/// native sessions; an unknown key (4001) or an app at its connection cap (4100) is refused
/// after the upgrade, in the Pusher way, because pusher-js reads only close codes.
async fn pusher_upgrade(State(node): State<Node>, Path(key): Path<String>, mut req: Request) -> Response {
    let started = Instant::now();
    let accept = match handshake(&node, req.headers()) {
        Ok(accept) => accept,
        Err(response) => return *response,
    };
    let Some(admission) = node.admit() else {
        return reject(StatusCode::SERVICE_UNAVAILABLE, "node_full", "node at its connection or memory limit; retry");
    };
    let app = match node.apps().by_key(&key) {
        Some(app) => app.admit().ok_or(CloseReason::OverCapacity),
        None => Err(CloseReason::UnknownApp),
    };
    if let Err(reason) = app {
        metrics::counter!(m::CONNECTIONS_REJECTED, "reason" => reason.label()).increment(1);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let config = Box::new(ws_config(&node));
    let ctx = node.session_context().clone();
    let frames_per_second = node.settings().limits.client_frames_per_second;
    node.tracker().spawn(async move {
        let _admission = admission;
        match on_upgrade.await {
            Ok(upgraded) => {
                let Some(io) = wire_io(upgraded) else { return };
                let wire = io.wire().clone();
                let io = session::Metered::new(io, frames_per_second);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(*config)).await;
                match app {
                    Ok(app) => session::run_pusher(ws, wire, ctx, app).await,
                    Err(reason) => session::refuse_pusher(ws, reason).await,
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    metrics::histogram!(m::HANDSHAKE_DURATION).record(started.elapsed().as_secs_f64());
    switching_protocols(&accept)
}

/// The upgraded connection's TCP socket, shared by the session and fan-out ([`Wire`]), with
/// whatever the HTTP server had read past the request. Every connection comes from the
/// node's acceptor, whose sockets are [`Watched`] TCP streams; anything else is a bug, and the
/// connection is dropped rather than served without its guarantees.
fn wire_io(upgraded: Upgraded) -> Option<WireIo> {
    match upgraded.downcast::<TokioIo<Watched>>() {
        Ok(parts) => Some(WireIo::new(Wire::new(parts.io.into_inner().into_stream()), parts.read_buf)),
        Err(_) => {
            error!("an upgraded connection is not an acceptor's TCP socket; dropped");
            None
        }
    }
}

/// The checks every WebSocket upgrade passes, whatever its protocol: a valid handshake, a node
/// that is not draining, an allowed origin. `Ok` holds the `Sec-WebSocket-Accept` value.
fn handshake(node: &Node, headers: &HeaderMap) -> Result<String, Box<Response>> {
    if !is_upgrade(headers) {
        return Err(Box::new(reject(StatusCode::UPGRADE_REQUIRED, "not_websocket", "expected a WebSocket upgrade")));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Box::new(reject(StatusCode::BAD_REQUEST, "bad_handshake", "Sec-WebSocket-Version must be 13")));
    }
    // RFC 6455 4.2.1: the key is the base64 of 16 bytes, sent once.
    let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(key), None) if valid_websocket_key(key.as_bytes()) => key,
        _ => {
            return Err(Box::new(reject(
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                "Sec-WebSocket-Key must be one base64 value of 16 bytes",
            )));
        }
    };
    let accept = derive_accept_key(key.as_bytes());
    if node.is_draining() {
        return Err(Box::new(reject(StatusCode::SERVICE_UNAVAILABLE, "draining", "node is shutting down; retry")));
    }
    if let Err(e) = node.auth().check_origin(headers.get_all(header::ORIGIN).iter().map(HeaderValue::as_bytes)) {
        return Err(Box::new(reject(StatusCode::FORBIDDEN, e.label(), e.to_string())));
    }
    Ok(accept)
}

/// The 101 answer to an upgrade.
fn switching_protocols(accept: &str) -> Response {
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(value) = HeaderValue::from_str(accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// Whether a `Sec-WebSocket-Key` value is the base64 encoding of exactly 16 bytes.
pub fn valid_websocket_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    key.len() == 24 && base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|raw| raw.len() == 16)
}

/// Everything a session needs once the connection is upgraded.
struct SessionStart {
    config: WebSocketConfig,
    ctx: std::sync::Arc<session::SessionContext>,
    identity: crate::auth::Identity,
    format: Format,
    last_id: Option<NoteId>,
}

fn ws_config(node: &Node) -> WebSocketConfig {
    let session = &node.settings().session;
    let max_frame = node.settings().limits.max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(session.read_buffer_bytes)
        .write_buffer_size(session.write_buffer_bytes)
        // Past this, writes fail rather than buffer without bound.
        .max_write_buffer_size(session.write_buffer_bytes + node.settings().limits.max_publish_bytes * 2)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

#[derive(Debug, Deserialize)]
struct DemoUser {
    user: String,
}

/// Demo only: mints a token for any user, so the demo page can connect.
async fn demo_token(State(node): State<Node>, Query(q): Query<DemoUser>) -> Response {
    match node.auth().issue_demo(&q.user, DEMO_TOKEN_TTL, vec!["demo".into()]) {
        Ok(token) => Json(json!({ "user": q.user, "token": token })).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

/// Demo only: sends the user a persisted test notification (it waits in the inbox until read).
async fn demo_send(State(node): State<Node>, Json(q): Json<DemoUser>) -> Response {
    if !valid_name(&q.user) {
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": AuthError::BadUser.to_string() }))).into_response();
    }
    let data = json!({ "title": "Test notification", "body": format!("Hello, user {}!", q.user) });
    let data = serde_json::value::to_raw_value(&data).unwrap_or_default();
    match node.inbox().append(&q.user, Some("demo"), &data, None).await {
        Ok(appended) => Json(json!({ "id": appended.id.to_string(), "unread": appended.unread })).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}
