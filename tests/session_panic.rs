//! A session task that panics leaves nothing behind: its registration guard takes it out of
//! the hub, the broker unsubscribes its channels, and its user's connection limit is free
//! again. The panic is caused on purpose through the `test-hooks` feature (a topic name that
//! makes the session panic), which the test suite enables; release builds do not have it.
//!
//! Alone in its file: the node's gauges are process-wide.
#![allow(clippy::unwrap_used)]

mod common;

use common::redis::RedisServer;
use common::{Client, TestNode, WAIT, eventually, metric, on_redis};
use futures_util::StreamExt;
use pushnode::session::test_hooks::PANIC_TOPIC;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_session_leaves_the_hub_the_broker_and_the_user_limit_as_they_were() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.limits.max_connections_per_user = 1;
    })
    .await;
    node.wait_ready(200).await;
    let user_channel = node.names_user("7");
    let topic_channel = format!("pushnode:topic:{PANIC_TOPIC}");
    let url = node.ws_url(&format!("token={}", node.token_with("7", &[PANIC_TOPIC, "news"])));

    let mut doomed = Client::connect(&url).await.unwrap();
    assert_eq!(doomed.next_json().await["type"], "welcome");
    doomed.send_json(json!({ "type": "subscribe", "channel": "news" })).await;
    assert_eq!(doomed.next_json().await["type"], "subscribed");
    eventually("the node never subscribed the user's and the topic's channels", || {
        redis.numsub(&user_channel) == 1 && redis.numsub("pushnode:topic:news") == 1
    })
    .await;
    // The limit holds while it lives: a second session of the user is refused.
    assert_eq!(node.refused(&url, &[]).await, 429);

    doomed.send_json(json!({ "type": "subscribe", "channel": PANIC_TOPIC })).await;
    // The task is gone: the socket ends without a close frame.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match doomed.ws.next().await {
                Some(Ok(Message::Close(_))) => break "a close frame",
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => break "the end of the stream",
            }
        }
    })
    .await
    .expect("the panicked session's socket stayed open");
    assert_eq!(ended, "the end of the stream");

    // The broker unsubscribes every channel it held (after the unsubscribe delay).
    eventually("the panicked session's channels stayed subscribed", || {
        redis.numsub(&user_channel) == 0 && redis.numsub("pushnode:topic:news") == 0
    })
    .await;
    assert_eq!(redis.numsub(&topic_channel), 0, "the panic came before the join");
    let (_, metrics) = node.get("/metrics").await;
    assert_eq!(metric(&metrics, "pushnode_connections"), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, "pushnode_users"), 0.0, "{metrics}");

    // The user's limit is free again, and the new session gets what is published.
    let mut again = node.connect("7").await;
    let (status, body) = node.publish(json!({ "user": "7", "data": { "after": "panic" } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(again.next_json().await["data"]["after"], "panic");
}
