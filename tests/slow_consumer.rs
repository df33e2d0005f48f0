//! A client that stops reading is closed as a slow consumer while a healthy session of the
//! same user keeps receiving everything. Its own test binary, so the metrics it reads are its
//! own.
#![allow(clippy::unwrap_used)]

mod common;

use common::{RawClient, TestNode, WAIT, metric};
use serde_json::json;

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_while_a_healthy_one_keeps_receiving() {
    const MESSAGES: usize = 300;
    let node = TestNode::with(|s| {
        s.session.outbox_capacity = 8;
        s.limits.max_publish_bytes = 64 * 1024;
    })
    .await;
    let mut healthy = node.connect("1").await;
    let token = node.token("1");
    // Handshake done, then never reads again.
    let mut stalled = RawClient::connect_small(node.public, &format!("/ws?token={token}")).await;

    let reader = tokio::spawn(async move {
        let mut seen = Vec::with_capacity(MESSAGES);
        while seen.len() < MESSAGES {
            let n = healthy.next_json().await;
            if n["type"] == "notification" {
                seen.push(n["data"]["seq"].as_u64().unwrap());
            }
        }
        (seen, healthy)
    });
    let padding = "x".repeat(16 * 1024);
    for seq in 0..MESSAGES {
        let (status, body) = node.publish(json!({ "user": "1", "data": { "seq": seq, "pad": padding } })).await;
        assert_eq!(status, 200, "{body}");
    }
    let (seen, _healthy) = tokio::time::timeout(WAIT, reader).await.expect("healthy client fell behind").unwrap();
    assert_eq!(seen, (0..MESSAGES as u64).collect::<Vec<_>>(), "healthy client lost or reordered frames");

    // The stalled client reads again (within session.write_timeout): behind what was queued
    // before its outbox filled comes the close frame, 4001.
    assert_eq!(stalled.close_code().await, 4001);

    // The stalled session was closed as a slow consumer and left the node.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = node.get("/metrics").await;
        let closed = metric(&text, r#"pushnode_connections_closed_total{reason="slow_consumer"}"#);
        let open = metric(&text, "pushnode_connections");
        if closed >= 1.0 && open == 1.0 {
            assert!(metric(&text, r#"pushnode_messages_dropped_total{reason="slow_consumer"}"#) >= 1.0, "{text}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stalled session still open: closed={closed} open={open}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    node.stop().await;
}
