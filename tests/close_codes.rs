//! Close codes a client can see, each caused for real: 1000 for a normal close, 4004 for a
//! connect that raced past the per-user limit, and what "1011 write_failed" looks like from
//! the client (no close frame at all). 4000, 4001, 4002, 4003, 1002 and 1009 are checked where
//! their causes are (shutdown, slow_consumer, robustness, hardening). Its own test binary, so
//! the close counters it reads are its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, RawClient, TestNode, WAIT, metric};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_gets_1000_back() {
    let node = TestNode::start().await;
    let mut client = node.connect("1").await;
    client.ws.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() }))).await.unwrap();
    assert_eq!(client.close_code().await, 1000);
    drop(client);
    let series = r#"pushnode_connections_closed_total{reason="normal"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(&node.get("/metrics").await.1, series) < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "the session never counted a normal close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

/// Two connects of one user with `limits.max_connections_per_user` 1 both pass the check at
/// the upgrade, because neither session has registered yet (a test hook holds each session
/// 300 ms after its 101, widening a window that is otherwise microseconds). The one that
/// registers second is closed with 4004; the other works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_racing_past_the_per_user_limit_is_closed_with_4004() {
    let node = TestNode::with(|s| s.limits.max_connections_per_user = 1).await;
    let user = pushnode::session::test_hooks::SLOW_START_USER;
    let url = node.ws_url(&format!("token={}", node.token(user)));
    let (a, b) = tokio::join!(Client::connect(&url), Client::connect(&url));
    let mut clients = [a.unwrap(), b.unwrap()];
    let mut firsts = Vec::new();
    // Both stay open until the end: a dropped one would make room for the other.
    for client in &mut clients {
        let first = tokio::time::timeout(WAIT, client.ws.next()).await.unwrap().unwrap().unwrap();
        firsts.push(match first {
            Message::Close(Some(frame)) => format!("close {}", u16::from(frame.code)),
            Message::Text(text) => serde_json::from_str::<serde_json::Value>(&text).unwrap()["type"].to_string(),
            other => format!("{other:?}"),
        });
    }
    firsts.sort();
    assert_eq!(firsts, ["\"welcome\"", "close 4004"]);
    // A third, after both: refused at the upgrade, as usual.
    assert_eq!(node.refused(&url, &[]).await, 429);
    node.stop().await;
}

/// A write that does not finish within `session.write_timeout` ends the session without a
/// close frame (1011 is the metric's name for it, never sent): the client reads what got
/// through, then the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_times_out_drops_the_socket_without_a_close_frame() {
    let node = TestNode::with(|s| {
        s.session.write_timeout = Duration::from_millis(300);
        s.limits.max_publish_bytes = 1024 * 1024;
    })
    .await;
    let token = node.token("1");
    let mut stalled = RawClient::connect_small(node.public, &format!("/ws?token={token}")).await;
    // Far more than the socket buffers hold: the node's write stalls, then gives up.
    let big = "x".repeat(900 * 1024);
    for _ in 0..4 {
        let (status, body) = node.publish(json!({ "user": "1", "data": big })).await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = node.get("/metrics").await;
        if metric(&text, r#"pushnode_connections_closed_total{reason="write_failed"}"#) >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stalled write never timed out:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut opcodes = Vec::new();
    while let Some((opcode, _)) = stalled.read_frame().await {
        opcodes.push(opcode);
    }
    assert!(!opcodes.is_empty(), "the welcome at least got through");
    assert!(!opcodes.contains(&0x8), "a close frame was sent: {opcodes:?}");
    node.stop().await;
}
