//! Pusher protocol helpers: the test app, and a plain WebSocket client speaking the protocol.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use pushnode::Settings;
use pushnode::protocol::pusher::sign;
use pushnode::settings::PusherApp;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{Client, TestNode};

pub const APP_ID: &str = "1001";
pub const KEY: &str = "app-key-1001";
pub const APP_SECRET: &str = "app-secret-1001-0123";

pub fn with_app(s: &mut Settings) {
    s.pusher.apps = vec![PusherApp {
        id: APP_ID.into(),
        key: KEY.into(),
        secret: APP_SECRET.into(),
        enable_client_messages: true,
        max_connections: 0,
    }];
}

pub async fn pusher_client(node: &TestNode, key: &str) -> Client {
    Client::connect(&format!("ws://{}/app/{key}?protocol=7&client=js&version=8.6.0", node.public)).await.unwrap()
}

/// Reads frames until one with `event`; returns it with `data` parsed when it is a string.
pub async fn event(client: &mut Client, event: &str) -> Value {
    loop {
        let mut frame = client.next_json().await;
        if frame["event"] == event {
            if let Some(text) = frame["data"].as_str()
                && let Ok(data) = serde_json::from_str::<Value>(text)
            {
                frame["data"] = data;
            }
            return frame;
        }
    }
}

/// Asserts that no event but the node's own `pusher:ping` arrives within `quiet`.
pub async fn expect_no_event(client: &mut Client, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, client.ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(text)))) if text.contains("\"pusher:ping\"") => continue,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected no event, got {other:?}"),
        }
    }
}

pub async fn established(node: &TestNode) -> (Client, String) {
    let mut client = pusher_client(node, KEY).await;
    let frame = client.next_json().await;
    assert_eq!(frame["event"], "pusher:connection_established", "{frame}");
    // Pusher SDKs read `data` as a string holding JSON.
    let data: Value = serde_json::from_str(frame["data"].as_str().expect("data is a string")).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_owned();
    (client, socket_id)
}

pub fn auth(socket_id: &str, channel: &str) -> String {
    format!("{KEY}:{}", sign(APP_SECRET, &format!("{socket_id}:{channel}")))
}

/// A `pushnode serve` process with the test app on `redis_url` (a node the tests can SIGKILL),
/// ready when returned; killed when dropped, so a failing test leaves no node running. `env`
/// adds settings.
pub struct ChildNode {
    pub child: std::process::Child,
    pub public: u16,
}

impl ChildNode {
    pub async fn start(redis_url: &str, env: &[(&str, &str)]) -> Self {
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (public, internal) = (free(), free());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_pushnode"))
            .env_remove("PUSHNODE_CONFIG")
            .env("PUSHNODE__SERVER__PUBLIC_ADDR", format!("127.0.0.1:{public}"))
            .env("PUSHNODE__SERVER__INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
            .env("PUSHNODE__DEMO__ENABLED", "false")
            .env("PUSHNODE__BROKER__KIND", "redis")
            .env("PUSHNODE__BROKER__REDIS_URL", redis_url)
            .env("PUSHNODE__PUSHER__APPS__0__ID", APP_ID)
            .env("PUSHNODE__PUSHER__APPS__0__KEY", KEY)
            .env("PUSHNODE__PUSHER__APPS__0__SECRET", APP_SECRET)
            .env("PUSHNODE__LOG__FILTER", "warn")
            .envs(env.iter().copied())
            .arg("serve")
            .spawn()
            .unwrap();
        let node = Self { child, public };
        let ready = format!("http://127.0.0.1:{internal}/readyz");
        let deadline = tokio::time::Instant::now() + super::WAIT;
        while !reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success()) {
            assert!(tokio::time::Instant::now() < deadline, "the child node never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
