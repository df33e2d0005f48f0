//! The internal HTTP API, for the application server and the platform: publish, health,
//! readiness and metrics. It holds no state of its own.
//!
//! Every `/api/*` call needs `Authorization: Bearer <api key>` (401 otherwise). Errors are JSON
//! `{"error": "...", "field": "..."}` with a 4xx status naming what was wrong.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, middleware};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::channel::valid_name;
use crate::metrics as m;
use crate::node::Node;
use crate::protocol::Envelope;

/// Longest `event` name accepted.
const MAX_EVENT_LEN: usize = 128;

pub fn router(node: Node) -> Router {
    let api = Router::new()
        .route("/api/publish", post(publish))
        .route_layer(middleware::from_fn_with_state(node.clone(), require_api_key));
    Router::new()
        .merge(api)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(node)
}

/// An API error: status, message, and the request field at fault if there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
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

/// `POST /api/publish` body: exactly one of `user`, `users`, `channel`, plus `data`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub user: Option<String>,
    pub users: Option<Vec<String>>,
    /// A topic channel name.
    pub channel: Option<String>,
    /// Any JSON; delivered as is.
    pub data: Box<RawValue>,
    /// Optional event name, carried in the notification frame.
    pub event: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishResponse {
    /// The notification id clients will see.
    pub id: String,
    /// Broker channels published to (one per user, or one topic).
    pub channels: usize,
}

async fn publish(State(node): State<Node>, req: Request) -> Result<Json<PublishResponse>, ApiError> {
    let limit = node.settings().limits.max_publish_bytes;
    let body = read_body(req.into_body(), limit).await?;
    let request: PublishRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid body: {e}")))?;
    let channels = targets(&node, &request)?;
    if let Some(event) = &request.event
        && (event.is_empty() || event.len() > MAX_EVENT_LEN)
    {
        return Err(ApiError::field("event", format!("must be 1 to {MAX_EVENT_LEN} bytes")));
    }

    let id = node.hub().next_message_id();
    let payload = Envelope::new(&id, request.event.as_deref(), &request.data).encode();
    for channel in &channels {
        node.broker()
            .publish(channel, payload.clone())
            .await
            .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    }
    metrics::counter!(m::MESSAGES_PUBLISHED).increment(channels.len() as u64);
    Ok(Json(PublishResponse { id, channels: channels.len() }))
}

async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes (limits.max_publish_bytes)"),
        )
    })
}

/// Resolves the request's target to broker channels, naming the field at fault.
fn targets(node: &Node, request: &PublishRequest) -> Result<Vec<std::sync::Arc<str>>, ApiError> {
    let names = node.names();
    let given = [request.user.is_some(), request.users.is_some(), request.channel.is_some()];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ApiError::field("user", "give exactly one of user, users, channel"));
    }
    if let Some(user) = &request.user {
        return check_name("user", user).map(|()| vec![names.user(user)]);
    }
    if let Some(channel) = &request.channel {
        return check_name("channel", channel).map(|()| vec![names.topic(channel)]);
    }
    let users = request.users.as_deref().unwrap_or_default();
    let max = node.settings().limits.max_publish_users;
    if users.is_empty() || users.len() > max {
        return Err(ApiError::field("users", format!("must name 1 to {max} users")));
    }
    let mut channels = Vec::with_capacity(users.len());
    for (i, user) in users.iter().enumerate() {
        check_name(&format!("users[{i}]"), user)?;
        channels.push(names.user(user));
    }
    channels.sort_unstable();
    channels.dedup();
    Ok(channels)
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if valid_name(name) { Ok(()) } else { Err(ApiError::field(field, "must be 1 to 128 of A-Z a-z 0-9 _ - . : @ =")) }
}

/// Liveness: the runtime answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 when this node should get new connections, 503 with the reasons otherwise.
async fn readyz(State(node): State<Node>) -> Response {
    let reasons: Vec<&str> = node.readiness().into_iter().map(|r| r.label()).collect();
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": reasons.is_empty(), "reasons": reasons }))).into_response()
}

async fn metrics_text(State(node): State<Node>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], node.metrics().render())
}
