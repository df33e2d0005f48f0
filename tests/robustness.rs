//! Bad input gets a clear error and loses nothing: malformed, binary, oversized and unmasked
//! frames, floods, silent clients, and clients that stop reading.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{RawClient, TestNode};
use serde_json::json;

#[tokio::test]
async fn malformed_frames_get_error_frames_and_the_session_stays_open() {
    let node = TestNode::start().await;
    let mut client = node.connect("1").await;
    for bad in ["not json", r#"{"type":"shout"}"#, r#"{"type":"subscribe"}"#, "[]"] {
        client.send_text(bad).await;
        let error = client.next_json().await;
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("bad_frame")), "{bad}");
    }
    client.send_json(json!({ "type": "subscribe", "channel": "bad channel" })).await;
    assert_eq!(client.next_json().await["code"], "bad_channel");
    client.send_binary(&[1, 2, 3]).await;
    assert_eq!(client.next_json().await["code"], "unsupported");

    // Still delivering.
    node.publish(json!({ "user": "1", "data": "still here" })).await;
    assert_eq!(client.next_json().await["data"], "still here");
    node.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let node = TestNode::with(|s| s.limits.max_frame_bytes = 256).await;
    let mut client = node.connect("1").await;
    client.send_text(&"x".repeat(1000)).await;
    assert_eq!(client.close_code().await, 1009);
    node.stop().await;
}

#[tokio::test]
async fn an_unmasked_client_frame_is_a_protocol_error() {
    let node = TestNode::start().await;
    let token = node.token("1");
    let mut raw = RawClient::connect(node.public, &format!("/ws?token={token}")).await;
    raw.send_frame(0x1, br#"{"type":"ping"}"#, false).await;
    assert_eq!(raw.close_code().await, 1002);
    node.stop().await;
}

#[tokio::test]
async fn a_flood_of_client_frames_closes_with_4003() {
    let node = TestNode::with(|s| s.limits.client_frames_per_second = 5).await;
    let mut client = node.connect("1").await;
    for _ in 0..20 {
        client.send_json(json!({ "type": "ping" })).await;
    }
    assert_eq!(client.close_code().await, 4003);
    node.stop().await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_4002() {
    let node = TestNode::with(|s| {
        s.session.heartbeat_interval = Duration::from_millis(100);
        s.session.heartbeat_timeout = Duration::from_millis(350);
    })
    .await;
    let token = node.token("1");
    // The raw client reads but never answers the node's pings.
    let mut raw = RawClient::connect(node.public, &format!("/ws?token={token}")).await;
    let started = std::time::Instant::now();
    let mut pings = 0;
    let code = loop {
        let (opcode, payload) = raw.read_frame().await.expect("closed without a close frame");
        match opcode {
            0x9 => pings += 1,
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    let took = started.elapsed();
    assert_eq!(code, 4002);
    assert!(pings >= 2, "expected pings before the timeout, got {pings}");
    assert!(took >= Duration::from_millis(300), "closed after {took:?}, before the timeout");
    // docs/protocol.md: between the timeout and the timeout plus two intervals (550 ms here),
    // plus 500 ms for a busy two-core machine.
    assert!(took < Duration::from_millis(1050), "closed only after {took:?}");
    node.stop().await;
}

#[tokio::test]
async fn a_client_answering_pings_stays_connected() {
    let node = TestNode::with(|s| {
        s.session.heartbeat_interval = Duration::from_millis(100);
        s.session.heartbeat_timeout = Duration::from_millis(350);
    })
    .await;
    let mut client = node.connect("1").await;
    // tungstenite answers pings while it reads; a second past the timeout it is still there.
    client.expect_silence(Duration::from_secs(1)).await;
    node.publish(json!({ "user": "1", "data": 1 })).await;
    assert_eq!(client.next_json().await["data"], 1);
    node.stop().await;
}
