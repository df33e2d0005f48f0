//! Eviction from the pending-connection pool (docs/security.md, "no unauthenticated
//! exhaustion"): silent sockets beyond the pool neither lock clients out nor stay open. Its own
//! test binary, so the eviction counter it reads counts only its own connections.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::TestNode;
use serde_json::json;
use tokio::net::TcpStream;

#[tokio::test]
async fn silent_sockets_beyond_the_pool_neither_lock_clients_out_nor_stay_open() {
    // The header deadline (4 s) is past the 2 s of idleness after which eviction may take a
    // connection, so both are at work.
    let node = TestNode::with(|s| {
        s.limits.max_pending_connections = 20;
        s.server.header_timeout = Duration::from_secs(4);
    })
    .await;
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(node.public).await.unwrap());
    }
    // More than the pool is waiting; a client with a token still gets in and receives.
    let mut client = node.connect("1").await;
    let connected = opened.elapsed();
    node.publish(json!({ "user": "1", "data": "through" })).await;
    assert_eq!(client.next_json().await["data"], "through");
    // Evicted to make room, or closed at the header deadline: none stays open.
    let closes = futures_util::future::join_all(silent.into_iter().map(common::closed_by_peer)).await;
    let last = closes.iter().map(|at| at.duration_since(opened)).max().unwrap();
    assert!(last < Duration::from_secs(8), "a silent socket stayed open {last:?}");
    // Without eviction it would wait for the header deadline of the silent ones ahead of it.
    assert!(connected < Duration::from_millis(3500), "the client waited {connected:?}");
    let (_, metrics) = node.get("/metrics").await;
    let evicted =
        common::metric(&metrics, r#"pushnode_http_connections_dropped_total{listener="public",reason="evicted"}"#);
    assert!(evicted >= 10.0, "{evicted}");
    node.stop().await;
}
