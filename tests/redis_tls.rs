//! `rediss://`: a node reaches a TLS-only `redis-server` (certificate signed by a private CA
//! given as `broker.tls_ca_file`), and refuses one whose certificate it cannot verify.
#![allow(clippy::unwrap_used)]

mod common;

use common::redis::RedisServer;
use common::{TestNode, eventually, on_redis};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_publishes_and_keeps_the_inbox_over_tls() {
    let redis = RedisServer::start_tls();
    assert!(redis.url().starts_with("rediss://"));
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.tls_ca_file = Some(redis.ca_file());
    })
    .await;
    node.wait_ready(200).await;
    let mut client = node.connect("42").await;
    let channel = node.names_user("42");
    eventually("the node never subscribed over TLS", || redis.numsub(&channel) == 1).await;

    // Through Redis: the publish goes out as PUBLISH and comes back on the subscription.
    let (status, body) = node.publish(json!({ "user": "42", "persist": true, "data": "over tls" })).await;
    assert_eq!(status, 200, "{body}");
    let n = client.next_json().await;
    assert_eq!((n["data"].as_str(), n["id"].as_str()), (Some("over tls"), body["id"].as_str()));
    // The inbox (FCALL) lives on the TLS server.
    let (status, inbox) = node.get_json("/api/users/42/unread").await;
    assert_eq!(status, 200, "{inbox}");
    assert_eq!(inbox["unread"], 1, "{inbox}");
    assert!(redis.calls("publish") >= 1);
    // A plain-text client cannot talk to this server at all.
    let plain = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string(), "PING"])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&plain.stdout).trim(), "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    let redis = RedisServer::start_tls();
    let impostor_ca = RedisServer::start_tls();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        // Trusts a different CA: the real server's certificate does not verify.
        s.broker.tls_ca_file = Some(impostor_ca.ca_file());
    })
    .await;
    let (status, body) = node.publish(json!({ "user": "42", "persist": true, "data": 1 })).await;
    assert_eq!(status, 503, "{body}");
    let (status, _) = node.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(redis.numsub(&node.names_user("42")), 0);
}

#[test]
fn a_ca_file_with_plain_redis_urls_is_a_configuration_error() {
    let mut s = common::settings();
    on_redis(&mut s, "redis://127.0.0.1:6379");
    s.broker.tls_ca_file = Some("/etc/pushnode/ca.pem".into());
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("broker.tls_ca_file") && err.contains("rediss://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ca_file_stops_the_node_at_start() {
    let mut s = common::settings();
    on_redis(&mut s, "rediss://127.0.0.1:6379");
    s.broker.tls_ca_file = Some("/nonexistent/ca.pem".into());
    s.validate().unwrap();
    let listeners = pushnode::Listeners::bind(&s).unwrap();
    let err = pushnode::run(listeners, s, tokio_util::sync::CancellationToken::new()).await.unwrap_err();
    assert!(format!("{err:#}").contains("broker.tls_ca_file"), "{err:#}");
}
