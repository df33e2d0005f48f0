//! The internal HTTP API, for the application server and the platform: publish, health,
//! readiness and metrics. It holds no state of its own.
//!
//! Every `/api/*` call needs `Authorization: Bearer <api key>` (401 otherwise). Errors are JSON
//! `{"error": "...", "field": "..."}` with a 4xx status naming what was wrong.

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, middleware};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::channel::{ChannelKind, NAME_RULE, valid_name};
use crate::inbox::{InboxError, ReadScope, ScopeError};
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::{Envelope, NoteId, json};

/// Longest `event` name accepted.
const MAX_EVENT_LEN: usize = 128;

pub fn router(node: Node) -> Router {
    let api = Router::new()
        .route("/api/publish", post(publish))
        .route("/api/users/{user}/notifications", get(notifications))
        .route("/api/users/{user}/unread", get(unread))
        .route("/api/users/{user}/read", post(read))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_api_key));
    let pusher_api = node.apps().is_enabled() && node.settings().pusher.api_listener.internal();
    let router = Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(node.clone());
    // Signed with the apps' secrets, not the API keys (see `pusher::api`).
    if pusher_api { router.merge(crate::pusher::api::router(node)) } else { router }
}

/// An API error: status, message, and the request field at fault if there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), field: None }
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), field: Some(field.into()) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.field {
            Some(field) => json!({ "error": self.message, "field": field }),
            None => json!({ "error": self.message }),
        };
        (self.status, Json(body)).into_response()
    }
}

async fn require_api_key(State(node): State<Node>, req: Request, next: Next) -> Response {
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match node.auth().check_api_key(authorization) {
        Ok(()) => next.run(req).await,
        Err(e) => ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()).into_response(),
    }
}

/// `POST /api/publish` body: exactly one of `user`, `users`, `channel`, plus `data`. The
/// `pushnode publish` command sends this type too, so the two cannot drift apart.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<String>>,
    /// A topic channel name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Any JSON; delivered as is.
    pub data: Box<RawValue>,
    /// Optional event name, carried in the notification frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Keep it in each user's inbox until read (user targets only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persist: bool,
    /// With `persist`: a retried publish with the same key notifies each user once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

impl PublishRequest {
    /// Parses a publish body. `data` is stored and relayed as it is, so it must also pass
    /// [`json::check`]: it then becomes a value anywhere (here, in Redis, in a browser).
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let request: Self = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))?;
        json::check(request.data.get()).map_err(|e| ApiError::field("data", format!("not acceptable JSON: {e}")))?;
        Ok(request)
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishResponse {
    /// The notification id clients will see (for a persisted publish to several users, the
    /// first user's; each has its own in `notifications`).
    pub id: String,
    /// Broker channels published to (one per user, or one topic).
    pub channels: usize,
    /// Persisted publishes: per user, the inbox id, the new unread count, and whether the
    /// idempotency key had been seen already (then nothing new was sent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notifications: Vec<PersistedNotification>,
    /// With status 503 only: the targets that were not published (the others were, and are
    /// counted in `channels` and listed in `notifications`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<FailedTarget>,
    /// With status 503 only: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A target a publish did not reach.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedTarget {
    /// The user, for user targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The topic, for a channel target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub error: String,
}

impl PublishResponse {
    /// 200 when every target was published; 503 (with `Retry-After`) naming the targets that
    /// were not, when any was not.
    fn into_response(mut self) -> Response {
        if self.failed.is_empty() {
            return Json(self).into_response();
        }
        let failed = self.failed.len();
        let first = &self.failed[0].error;
        self.error = Some(format!("{failed} of {} targets not published; first: {first}", failed + self.channels));
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(self)).into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }
}

/// Where one publish goes: a broker channel, and the user or topic it stands for.
#[derive(Debug)]
struct Target {
    channel: std::sync::Arc<str>,
    user: Option<String>,
    topic: Option<String>,
}

impl Target {
    fn failed(&self, error: String) -> FailedTarget {
        FailedTarget { user: self.user.clone(), channel: self.topic.clone(), error }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PersistedNotification {
    pub user: String,
    pub id: String,
    pub unread: u64,
    pub duplicate: bool,
}

/// Publishes to every target, one after the other. A target Redis refuses is reported and the
/// others still go out; once Redis is out of reach, the remaining targets are reported as not
/// published without trying each (each try would wait for the connect timeout).
async fn publish(State(node): State<Node>, req: Request) -> Result<Response, ApiError> {
    let body = read_json_body(&node, req).await?;
    let request = PublishRequest::parse(&body)?;
    let targets = targets(&node, &request)?;
    if let Some(event) = &request.event
        && (event.is_empty() || event.len() > MAX_EVENT_LEN)
    {
        return Err(ApiError::field("event", format!("must be 1 to {MAX_EVENT_LEN} bytes")));
    }
    if let Some(key) = &request.idempotency_key {
        if !request.persist {
            return Err(ApiError::field("idempotency_key", "only with persist: true"));
        }
        if key.is_empty() || key.len() > MAX_EVENT_LEN {
            return Err(ApiError::field("idempotency_key", format!("must be 1 to {MAX_EVENT_LEN} bytes")));
        }
    }
    if request.persist {
        return persist(&node, &request, &targets).await;
    }

    let id = node.hub().next_message_id();
    let payload = Envelope::new(&id, request.event.as_deref(), &request.data).encode();
    let mut response = PublishResponse { id, channels: 0, notifications: Vec::new(), failed: Vec::new(), error: None };
    let mut unavailable: Option<String> = None;
    for target in &targets {
        if let Some(error) = &unavailable {
            response.failed.push(target.failed(error.clone()));
            continue;
        }
        match node.broker().publish(&target.channel, payload.clone()).await {
            Ok(()) => response.channels += 1,
            Err(e) => {
                if e.is_unavailable() {
                    unavailable = Some(e.to_string());
                }
                response.failed.push(target.failed(e.to_string()));
            }
        }
    }
    metrics::counter!(m::MESSAGES_PUBLISHED).increment(response.channels as u64);
    Ok(response.into_response())
}

/// Persisted publish: each user's inbox appends and publishes atomically, and the idempotency
/// key is kept per user, so a retry of a partly failed publish notifies each user once.
async fn persist(node: &Node, request: &PublishRequest, targets: &[Target]) -> Result<Response, ApiError> {
    if request.channel.is_some() {
        return Err(ApiError::field("persist", "persisted notifications go to user or users"));
    }
    let mut response =
        PublishResponse { id: String::new(), channels: 0, notifications: Vec::new(), failed: Vec::new(), error: None };
    let mut unavailable: Option<String> = None;
    for target in targets {
        let Some(user) = target.user.as_deref() else { continue };
        if let Some(error) = &unavailable {
            response.failed.push(target.failed(error.clone()));
            continue;
        }
        match node
            .inbox()
            .append(user, request.event.as_deref(), &request.data, request.idempotency_key.as_deref())
            .await
        {
            Ok(appended) => {
                if !appended.duplicate {
                    metrics::counter!(m::MESSAGES_PUBLISHED).increment(1);
                }
                response.channels += 1;
                response.notifications.push(PersistedNotification {
                    user: user.to_owned(),
                    id: appended.id.to_string(),
                    unread: appended.unread,
                    duplicate: appended.duplicate,
                });
            }
            Err(e) => {
                if e.is_unavailable() {
                    unavailable = Some(e.to_string());
                }
                response.failed.push(target.failed(e.to_string()));
            }
        }
    }
    response.id = response.notifications.first().map(|n| n.id.clone()).unwrap_or_default();
    Ok(response.into_response())
}

/// `GET /api/users/{user}/notifications?unread=true&after=<id>&limit=N`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    unread: bool,
    after: Option<String>,
    limit: Option<usize>,
}

/// Largest page of `GET /api/users/{user}/notifications`.
const MAX_PAGE: usize = 500;

async fn notifications(
    State(node): State<Node>,
    Path(user): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_name("user", &user)?;
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let after = match query.after.as_deref() {
        None | Some("") => None,
        Some(id) => Some(id.parse::<NoteId>().map_err(|()| ApiError::field("after", "must be <ms>-<seq>"))?),
    };
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::field("limit", format!("must be 1 to {MAX_PAGE}")));
    }
    let stored = node.inbox().list(&user, after, limit, query.unread).await.map_err(unavailable)?;
    let next = (stored.len() == limit).then(|| stored.last().map(|s| s.id.to_string())).flatten();
    // Serialised field by field: stored `data` is written as it is kept, never converted.
    let notifications = stored
        .iter()
        .map(|s| ListedNotification {
            id: s.id.to_string(),
            time: s.ts_us / 1000,
            event: s.event.as_deref(),
            data: &s.data,
            read: s.read,
        })
        .collect();
    Ok(Json(NotificationPage { notifications, next }).into_response())
}

/// `GET /api/users/{user}/notifications` answer.
#[derive(Debug, Serialize)]
struct NotificationPage<'a> {
    notifications: Vec<ListedNotification<'a>>,
    next: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListedNotification<'a> {
    id: String,
    time: u64,
    event: Option<&'a str>,
    data: &'a RawValue,
    read: bool,
}

async fn unread(State(node): State<Node>, Path(user): Path<String>) -> Result<Json<Value>, ApiError> {
    check_name("user", &user)?;
    let state = node.inbox().state(&user).await.map_err(unavailable)?;
    Ok(Json(json!({ "unread": state.unread, "last_id": state.newest.map(|id| id.to_string()) })))
}

/// `POST /api/users/{user}/read` body: `{"ids": [...]}`, `{"up_to": id}` or `{"all": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadRequest {
    ids: Option<Vec<String>>,
    up_to: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn read(State(node): State<Node>, Path(user): Path<String>, req: Request) -> Result<Json<Value>, ApiError> {
    check_name("user", &user)?;
    let body = read_json_body(&node, req).await?;
    let request: ReadRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))?;
    let scope =
        ReadScope::parse(request.ids.as_deref(), request.up_to.as_deref(), request.all).map_err(|e| match e {
            ScopeError::BadId { field } => ApiError::field(field, "must be <ms>-<seq>"),
            ScopeError::NotOne => ApiError::field("ids", e.to_string()),
        })?;
    let unread = node.inbox().mark_read(&user, &scope).await.map_err(unavailable)?;
    node.webhooks().emit("native", crate::webhooks::read_event(&user, &scope, unread)).await;
    Ok(Json(json!({ "unread": unread })))
}

fn unavailable(e: InboxError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// Reads a request body that must be JSON: `Content-Type: application/json` (415 otherwise: a
/// plain form post from any web page cannot make a browser send that header across origins
/// without a preflight), at most `limits.max_publish_bytes` (413), within
/// `server.header_timeout` (408).
async fn read_json_body(node: &Node, req: Request) -> Result<bytes::Bytes, ApiError> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json"));
    }
    let limit = node.settings().limits.max_publish_bytes;
    match tokio::time::timeout(node.settings().server.header_timeout, to_bytes(req.into_body(), limit)).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes (limits.max_publish_bytes)"),
        )),
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "body not received in time (server.header_timeout)")),
    }
}

/// Resolves the request's target to broker channels, naming the field at fault.
/// The request's targets, one per broker channel (a `users` list sorted and de-duplicated).
fn targets(node: &Node, request: &PublishRequest) -> Result<Vec<Target>, ApiError> {
    let names = node.names();
    let given = [request.user.is_some(), request.users.is_some(), request.channel.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ApiError::field("user", "give exactly one of user, users, channel"));
    }
    let for_user = |user: &str| Target { channel: names.user(user), user: Some(user.to_owned()), topic: None };
    if let Some(user) = &request.user {
        return check_name("user", user).map(|()| vec![for_user(user)]);
    }
    if let Some(channel) = &request.channel {
        check_name("channel", channel)?;
        let topic = names.topic(channel);
        // Settings validation makes this impossible; kept so that no setting change can turn a
        // topic publish into a notification for a user.
        if matches!(names.parse(&topic), Some(ChannelKind::User(_))) {
            return Err(ApiError::field("channel", "renders to a user's channel"));
        }
        return Ok(vec![Target { channel: topic, user: None, topic: Some(channel.clone()) }]);
    }
    let users = request.users.as_deref().unwrap_or_default();
    let max = node.settings().limits.max_publish_users;
    if users.is_empty() || users.len() > max {
        return Err(ApiError::field("users", format!("must name 1 to {max} users")));
    }
    let mut targets = Vec::with_capacity(users.len());
    for (i, user) in users.iter().enumerate() {
        check_name(&format!("users[{i}]"), user)?;
        targets.push(for_user(user));
    }
    targets.sort_unstable_by(|a, b| a.user.cmp(&b.user));
    targets.dedup_by(|a, b| a.user == b.user);
    Ok(targets)
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) { Ok(()) } else { Err(ApiError::field(field, format!("must be {NAME_RULE}"))) }
}

/// Liveness: the runtime answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when this node should get new connections, 503 with the reasons otherwise.
async fn readyz(State(node): State<Node>) -> Response {
    let reasons: Vec<&str> = node.readiness().into_iter().map(|r| r.label()).collect();
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let degraded = node.degraded();
    (status, Json(json!({ "ready": reasons.is_empty(), "reasons": reasons, "degraded": degraded }))).into_response()
}

async fn metrics_text(State(node): State<Node>) -> impl IntoResponse {
    // Sampled here: each of the broker's lanes hears its own probes; the gauge is the stalest
    // (0 until every lane heard one: a node that never completes a probe is stale for the
    // alert too, which an absent series would not be).
    let broker = node.broker();
    ::metrics::gauge!(m::BROKER_UP).set(if broker.status().ready { 1.0 } else { 0.0 });
    if let Some(at) = broker.probe_last_success() {
        ::metrics::gauge!(m::BROKER_PROBE_LAST_SUCCESS).set(at);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m::render(node.metrics()))
}
