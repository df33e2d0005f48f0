//! Hostile input that arrives through Redis (payloads published or stored by someone else), and
//! the inbox answering the memory and Redis stores alike. See hardening.rs for the rest.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{API_KEY, Client, TestNode, on_redis};
use serde_json::{Value, json};

fn deep(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn an_envelope_with_unparsable_data_from_redis_skips_json_sessions_only() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    let mut json_client = node.connect("1").await;
    let token = node.token("1");
    let mut raw_client = Client::connect(&node.ws_url(&format!("token={token}&format=raw"))).await.unwrap();
    raw_client.sync().await;
    let channel = node.names_user("1");
    let bad = format!(r#"{{"pushnode":1,"id":"x-1","ts":1,"data":{}}}"#, deep(5000));
    redis.cli(&["PUBLISH", &channel, &bad]).unwrap();
    redis.cli(&["PUBLISH", &channel, r#"{"pushnode":1,"id":"x-2","ts":1,"data":"fine"}"#]).unwrap();
    // The JSON session gets the next message, not the one no client could parse.
    assert_eq!(json_client.next_json().await["id"], "x-2");
    // The raw session gets the published data byte for byte, as always.
    assert_eq!(raw_client.next_text().await, deep(5000));
    assert_eq!(raw_client.next_text().await, "\"fine\"");
    // A foreign payload that is not acceptable JSON reaches JSON sessions as a string.
    redis.cli(&["PUBLISH", &channel, "1e400"]).unwrap();
    assert_eq!(json_client.next_json().await["data"], "1e400");
    let (_, metrics) = node.get("/metrics").await;
    assert!(common::metric(&metrics, r#"pushnode_messages_dropped_total{reason="invalid_payload"}"#) >= 1.0);
    node.stop().await;
}

#[tokio::test]
async fn stored_data_no_client_could_parse_is_served_as_null_without_a_panic() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    // Applications may persist with FCALL directly; the node must survive what they store.
    let channel = node.names_user("2");
    let key = format!("{}{{2}}", node.settings.inbox.key_prefix);
    for data in [deep(3000), "1e400".to_owned(), r#""\ud800""#.to_owned()] {
        redis
            .cli(&["FCALL", "pushnode_notify", "1", &key, &channel, "PUBLISH", &data, "", "", "200", "0", "1000"])
            .unwrap();
    }
    let (status, page) = node.get_json("/api/users/2/notifications").await;
    assert_eq!(status, 200, "{page}");
    let data: Vec<&Value> = page["notifications"].as_array().unwrap().iter().map(|n| &n["data"]).collect();
    assert_eq!(data, [&Value::Null, &Value::Null, &Value::Null]);
    // Sessions replay them too, instead of retrying a failing read for ever.
    let mut client = node.connect("2").await;
    for _ in 0..3 {
        let n = client.next_json().await;
        assert_eq!((n["replay"].as_bool(), &n["data"]), (Some(true), &Value::Null), "{n}");
    }
    node.stop().await;
}

/// The same requests against a memory node and a Redis node answer the same.
#[tokio::test]
async fn memory_and_redis_inboxes_answer_edge_cases_alike() {
    let redis = RedisServer::start();
    let memory = TestNode::start().await;
    let on_redis = TestNode::on(&redis).await;
    let mut answers = Vec::new();
    for node in [&memory, &on_redis] {
        let mut seen = Vec::new();
        let (_, published) = node.publish(json!({ "user": "e", "persist": true, "data": 1 })).await;
        let id = published["id"].as_str().unwrap().to_owned();
        for path in [
            format!("/api/users/e/notifications?after={id}"),
            "/api/users/e/notifications?after=9007199254740991-9007199254740991".to_owned(),
            "/api/users/e/notifications?after=18446744073709551615-18446744073709551615".to_owned(),
            "/api/users/e/notifications?after=99999999999999-0&unread=true".to_owned(),
            "/api/users/nobody/notifications".to_owned(),
            "/api/users/nobody/unread".to_owned(),
        ] {
            seen.push(node.get_json(&path).await);
        }
        for (user, body) in [
            ("nobody", json!({ "all": true })),
            ("nobody", json!({ "up_to": "9007199254740991-9007199254740991" })),
            ("e", json!({ "ids": ["18446744073709551615-0"] })),
            ("e", json!({ "up_to": "99999999999999-0" })),
        ] {
            seen.push(node.post(&format!("/api/users/{user}/read"), Some(API_KEY), body.to_string()).await);
        }
        // A read by a user with no inbox still tells its sessions the count.
        let mut client = node.connect("empty").await;
        client.send_json(json!({ "type": "read", "all": true })).await;
        seen.push((0, client.next_json().await));
        answers.push(seen);
    }
    assert_eq!(answers[0], answers[1]);
    // And what they answer is what the docs say.
    assert_eq!(answers[0][0], (200, json!({ "notifications": [], "next": null })));
    assert_eq!(answers[0][2].0, 400);
    assert_eq!(answers[0][6], (200, json!({ "unread": 0 })));
    memory.stop().await;
    on_redis.stop().await;
}

#[tokio::test]
async fn a_replay_that_keeps_failing_is_retried_with_backoff() {
    let redis = RedisServer::start();
    // The node's Redis user may publish and subscribe, but not call the inbox functions:
    // every replay fails, while live delivery works.
    redis.cli(&["ACL", "SETUSER", "node", "on", ">pw", "~*", "&*", "+@all", "-fcall", "-fcall_ro"]).unwrap();
    let node = TestNode::with(|s| {
        on_redis(s, &format!("redis://node:pw@127.0.0.1:{}", redis.port));
    })
    .await;
    node.wait_ready(200).await;
    let _client = node.connect("3").await;
    let before = fcalls(&redis);
    let watched = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attempts = fcalls(&redis) - before;
    // Without backoff: one attempt every 0.5 s at most, 12 in 6 s. With it: 0.5, 1, 2, 4 s...
    assert!((1..=6).contains(&attempts), "{attempts} attempts in {:?}", watched.elapsed());
    let (_, metrics) = node.get("/metrics").await;
    assert!(common::metric(&metrics, r#"pushnode_inbox_errors_total{operation="list"}"#) >= 1.0);
    node.stop().await;
}

/// Refused and accepted FCALL commands so far (refused ones count as `rejected_calls`).
fn fcalls(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).unwrap();
    stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_fcall:"))
        .flat_map(|l| l.split([':', ',']))
        .filter_map(|field| field.split_once('='))
        .filter(|(k, _)| *k == "calls" || *k == "rejected_calls")
        .map(|(_, v)| v.parse::<u64>().unwrap())
        .sum()
}
