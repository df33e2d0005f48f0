//! `/metrics` after real traffic: every required series is there with sensible values, no label
//! carries a user or channel, and `promtool check metrics` accepts the output. Its own test
//! binary, so the process-wide recorder holds only this node's figures.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::redis::RedisServer;
use common::{API_KEY, TestNode, eventually, metric, subscriber_ids};
use serde_json::json;

/// `promtool`, or `None` outside CI when it is not installed (the Debian package `prometheus`).
pub fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "promtool missing under CI");
        eprintln!("SKIPPED: promtool not installed (apt-get install prometheus)");
        return None;
    }
    Some("promtool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_describe_real_traffic() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;

    let user = "metricsuser42";
    let mut client = node.connect(user).await;
    let leaving = node.connect("leaver").await;
    drop(leaving);
    assert_eq!(node.refused(&node.ws_url(""), &[]).await, 401);
    node.publish(json!({ "user": user, "data": 1 })).await;
    node.publish(json!({ "user": user, "persist": true, "data": 2 })).await;
    assert_eq!(client.next_json().await["data"], 1);
    assert_eq!(client.next_json().await["data"], 2);
    node.post(&format!("/api/users/{user}/read"), Some(API_KEY), json!({ "all": true }).to_string()).await;
    assert_eq!(client.next_json().await["type"], "unread");
    let before = subscriber_ids(&redis);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    eventually("the node never opened new subscribers", || {
        let now = subscriber_ids(&redis);
        now.len() == common::LANES && now.iter().all(|id| !before.contains(id))
    })
    .await;
    node.wait_ready(200).await;

    // Gauges settle as sessions leave; wait for the one that left.
    let mut text = String::new();
    for _ in 0..100 {
        text = node.get("/metrics").await.1;
        if metric(&text, "pushnode_connections") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at_least = |series: &str, min: f64| {
        let value = metric(&text, series);
        assert!(value >= min, "{series} = {value}, expected >= {min}\n{text}");
    };
    assert_eq!(metric(&text, "pushnode_connections"), 1.0);
    assert_eq!(metric(&text, "pushnode_users"), 1.0);
    at_least("pushnode_connections_opened_total", 2.0);
    at_least(r#"pushnode_connections_closed_total{reason="gone"}"#, 1.0);
    at_least(r#"pushnode_connections_rejected_total{reason="missing_token"}"#, 1.0);
    at_least("pushnode_broker_subscriptions", 2.0); // the user's channel and the probe's
    at_least(r#"pushnode_broker_commands_total{command="SUBSCRIBE"}"#, 2.0);
    at_least(r#"pushnode_broker_commands_total{command="PUBLISH"}"#, 1.0);
    at_least("pushnode_broker_resubscribe_duration_seconds_count", 2.0);
    at_least("pushnode_broker_reconnects_total", 1.0);
    let probe = metric(&text, "pushnode_broker_probe_last_success_timestamp_seconds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - probe).abs() < 10.0, "probe timestamp {probe} is not recent");
    at_least("pushnode_messages_published_total", 2.0);
    at_least("pushnode_messages_delivered_total", 2.0);
    assert!(text.contains(r#"pushnode_messages_dropped_total{reason="slow_consumer"} 0"#), "{text}");
    at_least("pushnode_delivery_latency_seconds_count", 1.0);
    at_least(r#"pushnode_delivery_latency_seconds_bucket{le="10"}"#, 1.0);
    assert!(text.contains(r#"pushnode_delivery_latency_seconds_bucket{le="0.0001"}"#), "100 µs bucket missing");
    at_least("pushnode_handshake_duration_seconds_count", 2.0);
    at_least("pushnode_inbox_appended_total", 1.0);
    at_least("pushnode_inbox_reads_total", 1.0);
    at_least("process_resident_memory_bytes", 1_000_000.0);
    at_least("process_open_fds", 5.0);
    at_least("process_cpu_seconds_total", 0.0);
    assert!(text.contains("process_cpu_seconds_total "), "{text}");
    for secret in [user, "leaver", "pushnode:user:", API_KEY] {
        assert!(!text.contains(secret), "{secret:?} leaked into a metric");
    }

    if let Some(promtool) = promtool() {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(client);
}
