//! Cluster mode on one real Redis server: nodes subscribe per connected user, deliver across
//! nodes, accept plain PUBLISH (the classic demo) and Laravel broadcasts, clean up their
//! subscriptions, and survive Redis faults.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Client, LANES, TestNode, WAIT, eventually, on_redis, subscriber_ids};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_the_users_sessions_on_every_node() {
    let redis = RedisServer::start();
    let a = TestNode::on(&redis).await;
    let b = TestNode::on(&redis).await;
    let mut on_a = a.connect("42").await;
    let mut on_b = b.connect("42").await;
    let mut other = b.connect("43").await;

    let (status, body) = a.publish(json!({ "user": "42", "data": { "n": 1 } })).await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut on_a, &mut on_b] {
        let n = client.next_json().await;
        assert_eq!((n["id"].as_str(), n["data"]["n"].as_u64()), (body["id"].as_str(), Some(1)));
    }
    let (status, _) = b.publish(json!({ "users": ["42", "43"], "data": 2 })).await;
    assert_eq!(status, 200);
    assert_eq!(on_a.next_json().await["data"], 2);
    assert_eq!(on_b.next_json().await["data"], 2);
    assert_eq!(other.next_json().await["data"], 2);
    other.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classic_demo_pair_works_unchanged_over_redis() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.user_channel = "push:message:{user}".into();
        s.auth.insecure_uid = true;
        s.session.default_format = pushnode::protocol::Format::Raw;
    })
    .await;
    node.wait_ready(200).await;
    // The classic page: new WebSocket("ws://host:9501/?uid=1"), JSON.parse(e.data).cnt
    let mut page = Client::connect(&format!("ws://{}/?uid=1", node.public)).await.unwrap();
    eventually("node never subscribed push:message:1", || redis.numsub("push:message:1") == 1).await;
    // The classic Laravel line: Redis::publish('push:message:1', json_encode(['cnt' => 5]));
    assert_eq!(redis.cli(&["PUBLISH", "push:message:1", r#"{"cnt":5}"#]).unwrap(), "1");
    assert_eq!(page.next_text().await, r#"{"cnt":5}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_laravel_broadcast_reaches_the_user_as_a_notification() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.user_channel = "laravel_database_private-App.Models.User.{user}".into();
    })
    .await;
    node.wait_ready(200).await;
    let mut client = node.connect("42").await;
    // What Laravel's redis broadcaster publishes for broadcast(new OrderShipped($order)).
    let payload = r#"{"event":"App\\Events\\OrderShipped","data":{"order":{"id":7}},"socket":null}"#;
    redis.cli(&["PUBLISH", "laravel_database_private-App.Models.User.42", payload]).unwrap();
    let n = client.next_json().await;
    assert_eq!(n["type"], "notification");
    assert_eq!(n["event"], "App\\Events\\OrderShipped");
    assert_eq!(n["data"], json!({ "order": { "id": 7 } }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_sessions_and_drop_to_zero_when_they_leave() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    let url = node.ws_url(&format!("token={}", node.token_with("7", &["news"])));
    let mut client = Client::connect(&url).await.unwrap();
    client.next_json().await;
    let second = node.connect("7").await;
    client.send_json(json!({ "type": "subscribe", "channel": "news" })).await;
    assert_eq!(client.next_json().await["type"], "subscribed");
    assert_eq!(redis.numsub("pushnode:user:7"), 1, "one subscription for two sessions");
    assert_eq!(redis.numsub("pushnode:topic:news"), 1);

    drop(client);
    drop(second);
    eventually("subscriptions left behind after every session left", || {
        redis.numsub("pushnode:user:7") == 0 && redis.numsub("pushnode:topic:news") == 0
    })
    .await;
    // Nothing but the node's own probe channel remains.
    let channels = redis.cli(&["PUBSUB", "CHANNELS", "pushnode:user:*"]).unwrap();
    assert!(channels.is_empty(), "stray subscriptions: {channels}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_churn_costs_far_fewer_commands_than_sessions() {
    const ROUNDS: usize = 40;
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.unsubscribe_delay = Duration::from_millis(500);
    })
    .await;
    node.wait_ready(200).await;
    let before = (redis.calls("subscribe"), redis.calls("unsubscribe"));
    for _ in 0..ROUNDS {
        let client = node.connect("churn").await;
        drop(client);
    }
    eventually("churned channel never unsubscribed", || redis.numsub("pushnode:user:churn") == 0).await;
    let subscribes = redis.calls("subscribe") - before.0;
    let unsubscribes = redis.calls("unsubscribe") - before.1;
    assert!(
        subscribes <= 3 && unsubscribes <= 3,
        "{ROUNDS} sessions cost {subscribes} SUBSCRIBE, {unsubscribes} UNSUBSCRIBE"
    );
    let channels = redis.cli(&["PUBSUB", "CHANNELS", "pushnode:user:*"]).unwrap();
    assert!(channels.is_empty(), "stray subscriptions: {channels}");
}

/// Publishes until the client receives one (bounded), returning how long it took.
async fn delivery_resumes(node: &TestNode, client: &mut Client, user: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = node.publish(json!({ "user": user, "data": "probe" })).await;
        if status == 200 {
            let got = tokio::time::timeout(Duration::from_millis(150), client.next_json()).await;
            if let Ok(n) = got {
                assert_eq!(n["data"], "probe", "{n}");
                // Drain duplicates of earlier attempts that arrived late, if any.
                return started.elapsed();
            }
        } else {
            assert_eq!(status, 503, "{body}");
        }
        assert!(started.elapsed() < WAIT, "delivery never resumed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_connection_is_restored() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    let mut client = node.connect("k").await;
    let before = subscriber_ids(&redis);

    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(killed, LANES.to_string(), "expected exactly the node's subscriber connections");
    // New subscriber connections (not the killed ones), fully subscribed again.
    eventually("the node never opened new subscribers", || {
        let now = subscriber_ids(&redis);
        now.len() == LANES && now.iter().all(|id| !before.contains(id))
    })
    .await;
    node.wait_ready(200).await;
    let resumed = delivery_resumes(&node, &mut client, "k").await;
    assert!(resumed < Duration::from_secs(2), "resumed after {resumed:?}");
    eventually("channel not resubscribed", || redis.numsub("pushnode:user:k") == 1).await;
}

/// The node's channels are spread over its subscriber connections. Killing one of them
/// disturbs only its own lane: the other connection stays (same client id), and every
/// persisted notification published before, across and after the kill reaches each user's
/// session exactly once (the killed lane's sessions replay their gap from the inbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lost_subscriber_connection_leaves_the_other_lanes_alone_and_loses_nothing() {
    const USERS: usize = 16;
    const ROUNDS: usize = 6;
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    node.wait_ready(200).await;
    let users: Vec<String> = (0..USERS).map(|u| format!("lane{u}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push(node.connect(user).await);
    }
    let before = subscriber_ids(&redis);
    assert_eq!(before.len(), LANES, "{before:?}");
    // One connection per lane, and both carry some of the users (16 users in one lane of two
    // would be a 1 in 32,768 hash accident).
    let held: Vec<usize> = before.iter().map(|id| subscriptions_of(&redis, id)).collect();
    assert!(held.iter().all(|&n| n > 1), "each connection holds its probe and users: {held:?}");
    assert_eq!(held.iter().sum::<usize>(), USERS + LANES, "every user channel once, plus a probe per lane");

    let mut published: Vec<Vec<String>> = vec![Vec::new(); USERS];
    let publish_round = |round: usize| {
        let node = &node;
        let users = &users;
        async move {
            let mut ids = Vec::new();
            for user in users {
                let (status, body) =
                    node.publish(json!({ "user": user, "persist": true, "data": { "round": round } })).await;
                assert_eq!(status, 200, "{body}");
                ids.push(body["id"].as_str().unwrap().to_owned());
            }
            ids
        }
    };
    for round in 0..ROUNDS {
        if round == ROUNDS / 2 {
            let killed = redis.cli(&["CLIENT", "KILL", "ID", client_id(&before[0])]).unwrap();
            assert_eq!(killed, "1");
        }
        for (u, id) in publish_round(round).await.into_iter().enumerate() {
            published[u].push(id);
        }
    }
    eventually("the killed subscriber was not replaced", || {
        let now = subscriber_ids(&redis);
        now.len() == LANES && !now.contains(&before[0])
    })
    .await;
    assert!(subscriber_ids(&redis).contains(&before[1]), "the other lane's connection was left alone");
    node.wait_ready(200).await;
    for (u, id) in publish_round(ROUNDS).await.into_iter().enumerate() {
        published[u].push(id);
    }

    for (u, client) in clients.iter_mut().enumerate() {
        let mut seen = std::collections::HashMap::<String, usize>::new();
        while published[u].iter().any(|id| !seen.contains_key(id)) {
            let frame = client.next_json().await;
            if frame["type"] == "notification" {
                *seen.entry(frame["id"].as_str().unwrap().to_owned()).or_default() += 1;
            }
        }
        assert!(seen.values().all(|&n| n == 1), "{}: duplicates {seen:?}", users[u]);
        assert_eq!(seen.len(), ROUNDS + 1, "{}: only its own notifications: {seen:?}", users[u]);
        client.expect_silence(Duration::from_millis(100)).await;
    }
}

/// The number of `id=<n>` (from [`subscriber_ids`]).
fn client_id(id: &str) -> &str {
    id.strip_prefix("id=").unwrap_or(id)
}

/// How many channels the connection `id` (`id=<n>`) has subscribed (`CLIENT LIST`'s `sub=`).
fn subscriptions_of(redis: &RedisServer, id: &str) -> usize {
    let list = redis.cli(&["CLIENT", "LIST", "ID", client_id(id)]).unwrap();
    let sub = list.split(' ').find_map(|f| f.strip_prefix("sub=")).unwrap_or_else(|| panic!("{list}"));
    sub.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_keeps_sessions_and_publishing_fails_fast_meanwhile() {
    let mut redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    let mut client = node.connect("r").await;

    redis.kill();
    node.wait_ready(503).await;
    let started = Instant::now();
    let (status, body) = node.publish(json!({ "user": "r", "data": 1 })).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("broker unavailable"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "publish took {:?} during the outage", started.elapsed());

    redis.restart();
    let restarted = Instant::now();
    node.wait_ready(200).await;
    delivery_resumes(&node, &mut client, "r").await;
    assert!(restarted.elapsed() < Duration::from_secs(3), "resumed {:?} after restart", restarted.elapsed());
    // The session itself never noticed.
    client.send_json(json!({ "type": "ping" })).await;
    assert_eq!(client.next_json().await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_without_redis_and_becomes_ready_when_it_appears() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = TestNode::with(|s| on_redis(s, &format!("redis://127.0.0.1:{port}"))).await;
    node.wait_ready(503).await;
    let mut client = node.connect("late").await;
    let (status, _) = node.publish(json!({ "user": "late", "data": 1 })).await;
    assert_eq!(status, 503);

    let redis = common::redis::RedisServer::start_on(port);
    node.wait_ready(200).await;
    delivery_resumes(&node, &mut client, "late").await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_silently_stops_receiving_is_detected_by_the_probe() {
    let redis = RedisServer::start();
    let path = common::proxy::Blackhole::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let node = TestNode::with(|s| on_redis(s, &format!("redis://{}", path.addr))).await;
    node.wait_ready(200).await;
    let mut client = node.connect("s").await;
    let before = subscriber_ids(&redis);
    assert_eq!(before.len(), LANES, "{before:?}");

    // The subscriber connections stay open but nothing reaches them any more.
    path.freeze_existing();
    node.wait_ready(503).await;
    node.wait_ready(200).await;
    delivery_resumes(&node, &mut client, "s").await;
    // New subscriber connections replaced the silent ones, which the node let go.
    eventually("the silent subscribers were not replaced", || {
        let now = subscriber_ids(&redis);
        now.len() == LANES && now.iter().all(|id| !before.contains(id))
    })
    .await;
}

/// `broker.unready_after`: a Redis outage shorter than it keeps the node in its Service
/// (`/readyz` 200 with `"degraded":["broker"]`, `pushnode_broker_up` 0); a longer one takes it
/// out; a node that never reached Redis is not ready at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_degrades_readiness_for_a_bounded_time_then_fails_it() {
    let mut redis = RedisServer::start();
    let grace = Duration::from_secs(4);
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.unready_after = grace;
    })
    .await;
    node.wait_ready(200).await;
    let readyz = || async {
        let (status, body) = node.get("/readyz").await;
        (status, serde_json::from_str::<serde_json::Value>(&body).unwrap())
    };
    let broker_up = || async { common::metric(&node.get("/metrics").await.1, "pushnode_broker_up") };
    assert_eq!(readyz().await.1["degraded"], json!([]));
    assert_eq!(broker_up().await, 1.0);

    redis.kill();
    let killed = Instant::now();
    // Degraded but ready: the probe goes stale, the reconnects fail.
    loop {
        let (status, body) = readyz().await;
        if body["degraded"] == json!(["broker"]) {
            assert_eq!(status, 200, "{body}");
            break;
        }
        assert_eq!(status, 200, "unready {:?} into a {grace:?} grace: {body}", killed.elapsed());
        assert!(killed.elapsed() < grace, "never reported degraded: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(broker_up().await, 0.0);
    // Then unready, not before the grace is over. The grace counts from the last probe that
    // came back, at most one probe interval before the kill.
    node.wait_ready(503).await;
    let earliest = grace - node.settings.broker.probe_interval;
    assert!(killed.elapsed() >= earliest, "unready after {:?}, before the {grace:?} grace", killed.elapsed());
    let (_, body) = readyz().await;
    assert_eq!((body["reasons"].clone(), body["degraded"].clone()), (json!(["broker"]), json!([])), "{body}");

    redis.restart();
    node.wait_ready(200).await;
    assert_eq!(readyz().await.1["degraded"], json!([]));
    assert_eq!(broker_up().await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reached_redis_is_not_ready_whatever_the_grace() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let node = TestNode::with(|s| {
        on_redis(s, &format!("redis://127.0.0.1:{port}"));
        s.broker.unready_after = Duration::from_secs(3600);
    })
    .await;
    // Long enough for a first connect attempt and its failure.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""reasons":["broker"]"#), "{body}");
}

/// Topics travel through Redis like users do: a topic subscribed on one node receives what
/// another node publishes, its broker channel is subscribed once per node while subscribed,
/// and unsubscribed after the last session leaves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_published_on_one_node_reaches_its_subscribers_on_another() {
    let redis = RedisServer::start();
    let a = TestNode::on(&redis).await;
    let b = TestNode::on(&redis).await;
    let channel = "pushnode:topic:news";
    let mut readers = Vec::new();
    for node in [&a, &a, &b] {
        let url = node.ws_url(&format!("token={}", node.token_with("7", &["news"])));
        let mut client = Client::connect(&url).await.unwrap();
        assert_eq!(client.next_json().await["type"], "welcome");
        client.send_json(json!({ "type": "subscribe", "channel": "news" })).await;
        assert_eq!(client.next_json().await, json!({ "type": "subscribed", "channel": "news" }));
        readers.push(client);
    }
    // One subscription per node, however many of its sessions want the topic.
    assert_eq!(redis.numsub(channel), 2);

    let (status, body) = b.publish(json!({ "channel": "news", "data": { "headline": "x" } })).await;
    assert_eq!(status, 200, "{body}");
    for client in &mut readers {
        let n = client.next_json().await;
        assert_eq!((n["channel"].as_str(), n["data"]["headline"].as_str()), (Some("news"), Some("x")), "{n}");
    }

    // Node A's sessions leave the topic: A unsubscribes it (after broker.unsubscribe_delay),
    // B keeps it and still receives.
    for client in &mut readers[..2] {
        client.send_json(json!({ "type": "unsubscribe", "channel": "news" })).await;
        assert_eq!(client.next_json().await["type"], "unsubscribed");
    }
    eventually("node A kept the topic subscribed", || redis.numsub(channel) == 1).await;
    a.publish(json!({ "channel": "news", "data": 2 })).await;
    assert_eq!(readers[2].next_json().await["data"], 2);
    for client in &mut readers[..2] {
        client.expect_silence(Duration::from_millis(200)).await;
    }
    drop(readers);
    eventually("the topic stayed subscribed after every session left", || redis.numsub(channel) == 0).await;
}
