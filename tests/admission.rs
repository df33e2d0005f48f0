//! Everything refused before the 101: bad tokens, origins, limits, insecure mode when off.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, SECRET, TestNode};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

#[tokio::test]
async fn missing_forged_expired_and_unsigned_tokens_get_401() {
    let node = TestNode::start().await;
    assert_eq!(node.refused(&node.ws_url(""), &[]).await, 401);

    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({ "sub": "1", "exp": 9_999_999_999u64 }),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    )
    .unwrap();
    assert_eq!(node.refused(&node.ws_url(&format!("token={forged}")), &[]).await, 401);

    let expired = jsonwebtoken::encode(
        &Header::default(),
        &json!({ "sub": "1", "exp": 1_000_000_000u64 }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(node.refused(&node.ws_url(&format!("token={expired}")), &[]).await, 401);

    let no_exp =
        jsonwebtoken::encode(&Header::default(), &json!({ "sub": "1" }), &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap();
    assert_eq!(node.refused(&node.ws_url(&format!("token={no_exp}")), &[]).await, 401);

    // {"alg":"none"} with the right claims and an empty signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIxIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    assert_eq!(node.refused(&node.ws_url(&format!("token={none}")), &[]).await, 401);

    assert_eq!(node.refused(&node.ws_url("token=garbage"), &[]).await, 401);
    node.stop().await;
}

#[tokio::test]
async fn a_bearer_header_works_like_the_query_token() {
    let node = TestNode::start().await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(node.ws_url("")).unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", node.token("5")).parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut client = Client { ws };
    assert_eq!(client.next_json().await["user"], "5");
    ws = client.ws;
    drop(ws);
    node.stop().await;
}

#[tokio::test]
async fn uid_without_insecure_mode_is_refused() {
    let node = TestNode::start().await;
    assert_eq!(node.refused(&format!("ws://{}/?uid=1", node.public), &[]).await, 401);
    node.stop().await;
}

#[tokio::test]
async fn origins_outside_the_allowlist_get_403() {
    let node = TestNode::with(|s| s.auth.allowed_origins = vec!["https://app.example".into()]).await;
    let url = node.ws_url(&format!("token={}", node.token("1")));
    assert_eq!(node.refused(&url, &[("origin", "https://evil.example")]).await, 403);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).unwrap();
    request.headers_mut().insert("origin", "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
    node.stop().await;
}

#[tokio::test]
async fn the_node_limit_answers_503_and_frees_up_when_a_session_leaves() {
    let node = TestNode::with(|s| s.limits.max_connections = 2).await;
    let first = node.connect("a").await;
    let _second = node.connect("b").await;
    let url = node.ws_url(&format!("token={}", node.token("c")));
    assert_eq!(node.refused(&url, &[]).await, 503);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connection_limit"));

    drop(first);
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        if let Ok(mut c) = Client::connect(&url).await {
            assert_eq!(c.next_json().await["user"], "c");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "place was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn the_per_user_limit_answers_429() {
    let node = TestNode::with(|s| s.limits.max_connections_per_user = 2).await;
    let _a = node.connect("u").await;
    let _b = node.connect("u").await;
    assert_eq!(node.refused(&node.ws_url(&format!("token={}", node.token("u"))), &[]).await, 429);
    let _other = node.connect("v").await;
    node.stop().await;
}

#[tokio::test]
async fn a_plain_get_on_ws_is_not_an_upgrade() {
    let node = TestNode::start().await;
    let response = reqwest::get(format!("http://{}/ws", node.public)).await.unwrap();
    assert_eq!(response.status().as_u16(), 426);
    let js = reqwest::get(format!("http://{}/pushnode.js", node.public)).await.unwrap();
    assert_eq!(js.status().as_u16(), 200);
    assert!(js.text().await.unwrap().contains("PushNode"));
    node.stop().await;
}

#[tokio::test]
async fn above_the_memory_limit_new_connections_get_503_and_readiness_fails() {
    // Any process is above one byte: once the first RSS sample lands, admission closes.
    let node = TestNode::with(|s| s.limits.max_memory_bytes = 1).await;
    node.wait_ready(503).await;
    let (_, body) = node.get("/readyz").await;
    assert!(body.contains("memory_limit"), "{body}");
    assert_eq!(node.refused(&node.ws_url(&format!("token={}", node.token("m"))), &[]).await, 503);
    node.stop().await;
}
