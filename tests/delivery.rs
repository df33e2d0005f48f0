//! Delivery through one node with the in-process broker: the right user only, every session of
//! that user, topic channels, raw mode, and the publish API's answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{API_KEY, Client, TestNode};
use serde_json::json;

#[tokio::test]
async fn a_notification_reaches_every_session_of_its_user_and_nobody_else() {
    let node = TestNode::start().await;
    let mut tab1 = node.connect("42").await;
    let mut tab2 = node.connect("42").await;
    let mut other = node.connect("43").await;

    let (status, body) = node.publish(json!({ "user": "42", "event": "comment", "data": { "text": "hi" } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["channels"], 1);

    for tab in [&mut tab1, &mut tab2] {
        let n = tab.next_json().await;
        assert_eq!(n["type"], "notification");
        assert_eq!(n["id"], body["id"]);
        assert_eq!(n["event"], "comment");
        assert_eq!(n["data"], json!({ "text": "hi" }));
        assert!(n["time"].as_u64().unwrap() > 1_700_000_000_000, "time is in ms: {n}");
    }
    other.expect_silence(Duration::from_millis(300)).await;
    node.stop().await;
}

#[tokio::test]
async fn publishing_to_several_users_reaches_each_once() {
    let node = TestNode::start().await;
    let mut a = node.connect("a").await;
    let mut b = node.connect("b").await;
    let (status, body) = node.publish(json!({ "users": ["a", "b", "a"], "data": 1 })).await;
    assert_eq!((status, body["channels"].as_u64()), (200, Some(2)), "{body}");
    assert_eq!(a.next_json().await["data"], 1);
    assert_eq!(b.next_json().await["data"], 1);
    a.expect_silence(Duration::from_millis(200)).await;
    node.stop().await;
}

#[tokio::test]
async fn topic_channels_need_a_grant_and_deliver_to_subscribers() {
    let node = TestNode::start().await;
    let url = node.ws_url(&format!("token={}", node.token_with("7", &["news", "room:*"])));
    let mut client = Client::connect(&url).await.unwrap();
    let welcome = client.next_json().await;
    assert_eq!(welcome["channels"], json!(["news", "room:*"]));

    client.send_json(json!({ "type": "subscribe", "channel": "news" })).await;
    assert_eq!(client.next_json().await, json!({ "type": "subscribed", "channel": "news" }));
    client.send_json(json!({ "type": "subscribe", "channel": "room:12" })).await;
    assert_eq!(client.next_json().await["type"], "subscribed");
    client.send_json(json!({ "type": "subscribe", "channel": "secret" })).await;
    let refused = client.next_json().await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("not_allowed")));

    let (status, _) = node.publish(json!({ "channel": "news", "data": { "headline": "x" } })).await;
    assert_eq!(status, 200);
    let n = client.next_json().await;
    assert_eq!((n["channel"].as_str(), n["data"]["headline"].as_str()), (Some("news"), Some("x")));

    client.send_json(json!({ "type": "unsubscribe", "channel": "news" })).await;
    assert_eq!(client.next_json().await["type"], "unsubscribed");
    node.publish(json!({ "channel": "news", "data": 2 })).await;
    node.publish(json!({ "channel": "secret", "data": 3 })).await;
    client.expect_silence(Duration::from_millis(300)).await;
    node.stop().await;
}

#[tokio::test]
async fn the_classic_demo_client_gets_the_raw_payload_on_its_old_url() {
    let node = TestNode::with(|s| s.auth.insecure_uid = true).await;
    // The classic Swoole demo connects to ws://host:9501/?uid=1 and does JSON.parse(data).cnt.
    let url = format!("ws://{}/?uid=1&format=raw", node.public);
    let mut classic = Client::connect(&url).await.unwrap();
    classic.sync().await;
    let (status, _) = node.publish(json!({ "user": "1", "data": { "cnt": 5 } })).await;
    assert_eq!(status, 200);
    assert_eq!(classic.next_text().await, r#"{"cnt":5}"#);
    node.stop().await;
}

#[tokio::test]
async fn raw_can_be_the_configured_default() {
    let node = TestNode::with(|s| {
        s.auth.insecure_uid = true;
        s.session.default_format = pushnode::protocol::Format::Raw;
    })
    .await;
    let mut classic = Client::connect(&format!("ws://{}/?uid=9", node.public)).await.unwrap();
    classic.sync().await;
    node.publish(json!({ "user": "9", "data": { "cnt": 1 } })).await;
    assert_eq!(classic.next_text().await, r#"{"cnt":1}"#);
    node.stop().await;
}

#[tokio::test]
async fn client_pings_get_pongs() {
    let node = TestNode::start().await;
    let mut client = node.connect("p").await;
    client.send_json(json!({ "type": "ping" })).await;
    assert_eq!(client.next_json().await, json!({ "type": "pong" }));
    node.stop().await;
}

/// Fan-out writes a live frame into the socket itself when the session is idle, while the
/// session writes its own replies: every frame must arrive whole, and the notifications in the
/// order they were published, however the two interleave.
#[tokio::test]
async fn frames_written_by_fan_out_and_by_the_session_arrive_whole_and_in_order() {
    let node = TestNode::start().await;
    let mut client = node.connect("order").await;
    let (rounds, pings, per_round) = (5, 10, 60);
    for round in 0..rounds {
        // Pings in flight while the publishes go out: the session answers them between fan-out's
        // writes (10 per round stays within the client frame budget).
        for _ in 0..pings {
            client.send_json(json!({ "type": "ping" })).await;
        }
        for k in 0..per_round {
            let (status, body) = node.publish(json!({ "user": "order", "data": round * per_round + k })).await;
            assert_eq!(status, 200, "{body}");
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let (mut pongs, mut next) = (0, 0);
    while next < rounds * per_round || pongs < rounds * pings {
        let frame = client.next_json().await;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("notification") => {
                assert_eq!(frame["data"], next, "notifications out of order");
                next += 1;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!((pongs, next), (rounds * pings, rounds * per_round));
    client.expect_silence(Duration::from_millis(200)).await;
    node.stop().await;
}

#[tokio::test]
async fn publish_errors_name_the_bad_field() {
    let node = TestNode::start().await;
    let cases = [
        (json!({ "data": 1 }), "user"),
        (json!({ "user": "1", "channel": "x", "data": 1 }), "user"),
        (json!({ "user": "bad id", "data": 1 }), "user"),
        (json!({ "users": [], "data": 1 }), "users"),
        (json!({ "users": ["ok", "no{pe}"], "data": 1 }), "users[1]"),
        (json!({ "user": "1", "event": "", "data": 1 }), "event"),
    ];
    for (body, field) in cases {
        let (status, answer) = node.publish(body.clone()).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{body} -> {answer}");
    }
    let (status, answer) = node.publish(json!({ "user": "1" })).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("missing field `data`"), "{answer}");
    let (status, answer) = node.post("/api/publish", Some(API_KEY), "{not json".into()).await;
    assert_eq!(status, 400, "{answer}");
    node.stop().await;
}

#[tokio::test]
async fn publish_needs_an_api_key_and_a_bounded_body() {
    let node = TestNode::with(|s| s.limits.max_publish_bytes = 1024).await;
    let body = json!({ "user": "1", "data": 1 }).to_string();
    assert_eq!(node.post("/api/publish", None, body.clone()).await.0, 401);
    assert_eq!(node.post("/api/publish", Some("wrong-key-wrong-key"), body.clone()).await.0, 401);
    assert_eq!(node.post("/api/publish", Some(API_KEY), body).await.0, 200);
    let big = json!({ "user": "1", "data": "x".repeat(2000) }).to_string();
    let (status, answer) = node.post("/api/publish", Some(API_KEY), big).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("max_publish_bytes"));
    node.stop().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let node = TestNode::start().await;
    assert_eq!(node.get("/healthz").await.0, 200);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    node.stop().await;
}
