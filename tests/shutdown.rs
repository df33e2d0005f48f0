//! Graceful shutdown: readiness fails first, upgrades are refused, sessions are closed with
//! 4000 and a reconnect delay, spread over the drain period, and `run` returns.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{TestNode, WAIT};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn shutdown_drains_sessions_paced_with_a_reconnect_hint_and_returns() {
    const SESSIONS: usize = 20;
    let node = TestNode::with(|s| s.server.drain_period = Duration::from_millis(600)).await;
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        clients.push(node.connect(&format!("u{i}")).await);
    }
    let started = Instant::now();
    node.begin_shutdown();

    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(WAIT, c.ws.next()).await.unwrap() {
                        Some(Ok(Message::Close(Some(frame)))) => {
                            return (u16::from(frame.code), frame.reason.to_string(), Instant::now());
                        }
                        Some(Ok(_)) => continue,
                        other => panic!("no close frame: {other:?}"),
                    }
                }
            })
        })
        .collect();

    // While draining: not ready, and no new sessions.
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"));
    let url = node.ws_url(&format!("token={}", node.token("late")));
    assert_eq!(node.refused(&url, &[]).await, 503);

    let mut closes = Vec::new();
    for reader in readers {
        closes.push(reader.await.unwrap());
    }
    for (code, reason, _) in &closes {
        assert_eq!(*code, 4000);
        assert!(reason.starts_with("server shutting down; reconnect after "), "{reason}");
    }
    let first = closes.iter().map(|c| c.2).min().unwrap();
    let last = closes.iter().map(|c| c.2).max().unwrap();
    assert!(last - first >= Duration::from_millis(300), "closes not spread: {:?}", last - first);

    node.stop().await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_with_no_sessions_returns_promptly() {
    let node = TestNode::start().await;
    let started = Instant::now();
    node.stop().await;
    assert!(started.elapsed() < Duration::from_secs(3));
}
