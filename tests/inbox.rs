//! The durable inbox: what a user has not seen survives until it is seen, on the memory store
//! (one node) and on real Redis (several nodes).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::redis::RedisServer;
use common::{API_KEY, Client, TestNode, eventually, on_redis};
use serde_json::{Value, json};

async fn persist(node: &TestNode, user: &str, data: Value) -> String {
    let (status, body) = node.publish(json!({ "user": user, "persist": true, "data": data })).await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Connects `user` (resuming after `last_id` if given) and returns the client and its welcome.
async fn connect(node: &TestNode, user: &str, last_id: Option<&str>) -> (Client, Value) {
    let mut query = format!("token={}", node.token(user));
    if let Some(id) = last_id {
        query.push_str(&format!("&last_id={id}"));
    }
    let mut client = Client::connect(&node.ws_url(&query)).await.unwrap();
    let welcome = client.next_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

async fn offline_notifications_wait_for_the_next_login(node: &TestNode) {
    let ids =
        [persist(node, "u1", json!(1)).await, persist(node, "u1", json!(2)).await, persist(node, "u1", json!(3)).await];
    let (mut client, welcome) = connect(node, "u1", None).await;
    assert_eq!(welcome["unread"], 3);
    assert_eq!(welcome["last_id"], ids[2].as_str());
    for (i, id) in ids.iter().enumerate() {
        let n = client.next_json().await;
        assert_eq!(
            (n["id"].as_str(), n["data"].as_u64(), n["replay"].as_bool()),
            (Some(id.as_str()), Some(i as u64 + 1), Some(true))
        );
        assert_eq!(n["read"], false);
    }
    // Then live, with the new count.
    let live = persist(node, "u1", json!(4)).await;
    let n = client.next_json().await;
    assert_eq!(
        (n["id"].as_str(), n["unread"].as_u64(), n["persisted"].as_bool()),
        (Some(live.as_str()), Some(4), Some(true))
    );
    client.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn offline_notifications_wait_for_the_next_login_in_memory() {
    let node = TestNode::start().await;
    offline_notifications_wait_for_the_next_login(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_notifications_wait_for_the_next_login_in_redis() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    offline_notifications_wait_for_the_next_login(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_on_one_device_updates_the_badge_on_every_node() {
    let redis = RedisServer::start();
    let a = TestNode::on(&redis).await;
    let b = TestNode::on(&redis).await;
    let (mut phone, _) = connect(&a, "9", None).await;
    let (mut laptop, _) = connect(&b, "9", None).await;
    let first = persist(&a, "9", json!("a")).await;
    let second = persist(&b, "9", json!("b")).await;
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.next_json().await["id"], first.as_str());
        assert_eq!(device.next_json().await["unread"], 2);
    }

    phone.send_json(json!({ "type": "read", "ids": [first] })).await;
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.next_json().await, json!({ "type": "unread", "unread": 1 }));
    }
    let (status, body) = a.get_json("/api/users/9/unread").await;
    assert_eq!((status, body["unread"].as_u64()), (200, Some(1)));
    let (_, list) = b.get_json("/api/users/9/notifications?unread=true").await;
    let unread: Vec<&str> =
        list["notifications"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(unread, vec![second.as_str()]);

    let (status, body) = a.post("/api/users/9/read", Some(API_KEY), json!({ "all": true }).to_string()).await;
    assert_eq!((status, body["unread"].as_u64()), (200, Some(0)));
    for device in [&mut phone, &mut laptop] {
        assert_eq!(device.next_json().await["unread"], 0);
    }
}

/// Publishes `count` persisted notifications to `user`, one after the other (so their ids
/// increase), on a task of its own; returns their ids.
fn publisher(node: &TestNode, user: &'static str, range: std::ops::Range<u64>) -> tokio::task::JoinHandle<Vec<String>> {
    let (internal, key) = (node.internal, node.settings.auth.api_keys[0].clone());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut ids = Vec::new();
        for i in range {
            let response = http
                .post(format!("http://{internal}/api/publish"))
                .bearer_auth(&key)
                .json(&json!({ "user": user, "persist": true, "data": i }))
                .send()
                .await
                .unwrap();
            ids.push(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
        }
        ids
    })
}

/// A device resumes from its newest id while hundreds of notifications wait (a replay of
/// several `inbox.replay_limit` pages) and more are published during the connect and the
/// replay: it gets every one once, in id order.
async fn resume_loses_nothing_and_repeats_nothing(node: &TestNode) {
    assert!(node.settings.inbox.replay_limit <= 50, "the replay must take several pages");
    let (mut client, _) = connect(node, "r", None).await;
    let mut seen = Vec::new();
    for i in 0..5 {
        persist(node, "r", json!(i)).await;
        seen.push(client.next_json().await["id"].as_str().unwrap().to_owned());
    }
    drop(client);
    let mut published = seen.clone();
    published.extend(publisher(node, "r", 5..305).await.unwrap());
    // Live ones published before, during and after the welcome and the replay.
    let racer = publisher(node, "r", 305..405);
    let (mut client, welcome) = connect(node, "r", Some(seen.last().unwrap())).await;
    let unread = welcome["unread"].as_u64().unwrap();
    assert!((305..=405).contains(&unread), "{welcome}");
    published.extend(racer.await.unwrap());
    let (mut replayed, mut live) = (0, 0);
    while seen.len() < published.len() {
        let n = client.next_json().await;
        if n["type"] != "notification" {
            continue;
        }
        if n["replay"] == true {
            replayed += 1
        } else {
            live += 1
        }
        seen.push(n["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen, published, "resume lost, repeated or reordered notifications");
    assert!(replayed >= 300, "only {replayed} replayed");
    eprintln!("{replayed} replayed, {live} live");
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn resume_loses_nothing_and_repeats_nothing_in_memory() {
    let node = TestNode::with(|s| {
        s.inbox.replay_limit = 50;
        s.inbox.max_per_user = 1000;
    })
    .await;
    resume_loses_nothing_and_repeats_nothing(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_loses_nothing_and_repeats_nothing_in_redis() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.inbox.replay_limit = 50;
        s.inbox.max_per_user = 1000;
    })
    .await;
    node.wait_ready(200).await;
    resume_loses_nothing_and_repeats_nothing(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_published_during_a_broker_gap_are_replayed() {
    let redis = RedisServer::start();
    // The node reaches Redis through a proxy that can hold its reconnects for as long as the
    // test publishes, however fast or slow the machine is.
    let path = common::proxy::Blackhole::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let node = TestNode::with(|s| on_redis(s, &format!("redis://{}", path.addr))).await;
    node.wait_ready(200).await;
    let (mut client, _) = connect(&node, "g", None).await;
    let before = persist(&node, "g", json!("before")).await;
    assert_eq!(client.next_json().await["id"], before.as_str());

    // Kill the node's subscriber and keep it from coming back; publish straight into Redis
    // (persist and PUBLISH in one call) while it is gone. The session must get them once the
    // node has resubscribed.
    path.hold_new(true);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    eventually("the subscriber is still there", || redis.numsub("pushnode:user:g") == 0).await;
    let mut gap = Vec::new();
    for i in 0..5 {
        let out = redis
            .cli(&[
                "FCALL",
                "pushnode_notify",
                "1",
                "pushnode:inbox:{g}",
                "pushnode:user:g",
                "PUBLISH",
                &i.to_string(),
                "",
                "",
                "200",
                "0",
                "1000",
            ])
            .unwrap();
        gap.push(out.lines().next().unwrap().to_owned());
    }
    assert_eq!(redis.numsub("pushnode:user:g"), 0, "the gap closed while publishing");
    path.hold_new(false);
    let mut got = BTreeSet::new();
    while got.len() < gap.len() {
        let n = client.next_json().await;
        assert_eq!((n["type"].as_str(), n["replay"].as_bool()), (Some("notification"), Some(true)), "{n}");
        got.insert(n["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, gap.into_iter().collect::<BTreeSet<_>>());
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_with_only_a_redis_client_persists_and_publishes_with_one_command() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.broker.user_channel = "push:message:{user}".into();
    })
    .await;
    node.wait_ready(200).await;
    let (mut client, _) = connect(&node, "42", None).await;
    // What README's Laravel example sends: Redis::fcall('pushnode_notify', ...).
    let out = redis
        .cli(&[
            "FCALL",
            "pushnode_notify",
            "1",
            "pushnode:inbox:{42}",
            "push:message:42",
            "PUBLISH",
            r#"{"title":"Invoice paid"}"#,
            "invoice.paid",
            "invoice-7",
            "200",
            "2592000000",
            "86400000",
        ])
        .unwrap();
    let n = client.next_json().await;
    assert_eq!(
        (n["event"].as_str(), n["data"]["title"].as_str(), n["unread"].as_u64()),
        (Some("invoice.paid"), Some("Invoice paid"), Some(1))
    );
    assert!(out.starts_with(n["id"].as_str().unwrap()), "{out}");
    // The same idempotency key again: no second notification.
    redis
        .cli(&[
            "FCALL",
            "pushnode_notify",
            "1",
            "pushnode:inbox:{42}",
            "push:message:42",
            "PUBLISH",
            r#"{"title":"Invoice paid"}"#,
            "invoice.paid",
            "invoice-7",
            "200",
            "2592000000",
            "86400000",
        ])
        .unwrap();
    client.expect_silence(Duration::from_millis(300)).await;
    let (_, body) = node.get_json("/api/users/42/unread").await;
    assert_eq!(body["unread"], 1);
}

async fn retention_and_idempotency_hold(node: &TestNode) {
    for i in 0..8 {
        persist(node, "ret", json!(i)).await;
    }
    let (_, list) = node.get_json("/api/users/ret/notifications").await;
    let kept: Vec<u64> =
        list["notifications"].as_array().unwrap().iter().map(|n| n["data"].as_u64().unwrap()).collect();
    assert_eq!(kept, vec![3, 4, 5, 6, 7], "the oldest go first");
    let (_, unread) = node.get_json("/api/users/ret/unread").await;
    assert_eq!(unread["unread"], 5, "the count follows the trimmed inbox");

    let body = json!({ "user": "idem", "persist": true, "idempotency_key": "order-1", "data": 1 });
    let (_, first) = node.publish(body.clone()).await;
    let (_, again) = node.publish(body).await;
    assert_eq!(first["notifications"][0]["duplicate"], false);
    assert_eq!(again["notifications"][0]["duplicate"], true);
    assert_eq!(first["id"], again["id"]);
    let (_, unread) = node.get_json("/api/users/idem/unread").await;
    assert_eq!(unread["unread"], 1);
}

#[tokio::test]
async fn retention_and_idempotency_hold_in_memory() {
    let node = TestNode::with(|s| s.inbox.max_per_user = 5).await;
    retention_and_idempotency_hold(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_and_idempotency_hold_in_redis() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.inbox.max_per_user = 5;
    })
    .await;
    node.wait_ready(200).await;
    retention_and_idempotency_hold(&node).await;
    // TTLs are set on every key the inbox writes.
    for key in ["pushnode:inbox:{ret}", "pushnode:inbox:{ret}:unread"] {
        let ttl: i64 = redis.cli(&["PTTL", key]).unwrap().parse().unwrap();
        assert!(ttl > 0, "{key} has no TTL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_publishes_and_reads_keep_the_count_equal_to_the_inbox() {
    const KEPT: u64 = 40;
    let redis = RedisServer::start();
    // 200 publishes into an inbox that keeps 40: trimming races the reads too.
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        s.inbox.max_per_user = KEPT as usize;
    })
    .await;
    node.wait_ready(200).await;
    let internal = node.internal;
    let mut tasks = Vec::new();
    for t in 0..8 {
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..25 {
                let body: Value = http
                    .post(format!("http://{internal}/api/publish"))
                    .bearer_auth(API_KEY)
                    .json(&json!({ "user": "race", "persist": true, "data": [t, i] }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if i % 3 == 0 {
                    let id = body["id"].as_str().unwrap();
                    let read = if t % 2 == 0 { json!({ "ids": [id] }) } else { json!({ "up_to": id }) };
                    http.post(format!("http://{internal}/api/users/race/read"))
                        .bearer_auth(API_KEY)
                        .json(&read)
                        .send()
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (_, unread) = node.get_json("/api/users/race/unread").await;
    let (_, list) = node.get_json("/api/users/race/notifications?unread=true&limit=500").await;
    let listed = list["notifications"].as_array().unwrap().len() as u64;
    assert_eq!(unread["unread"].as_u64(), Some(listed));
    let zcard: u64 = redis.cli(&["ZCARD", "pushnode:inbox:{race}:unread"]).unwrap().parse().unwrap();
    assert_eq!(zcard, listed);
    let (_, all) = node.get_json("/api/users/race/notifications?limit=500").await;
    let kept = all["notifications"].as_array().unwrap().len() as u64;
    assert_eq!(kept, KEPT, "the inbox was not trimmed to inbox.max_per_user");
    assert!(listed < KEPT, "some were read: {listed} unread of {KEPT}");
}

#[tokio::test]
async fn the_rest_api_pages_and_refuses_bad_input() {
    let node = TestNode::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(persist(&node, "p", json!(i)).await);
    }
    let (_, page1) = node.get_json("/api/users/p/notifications?limit=2").await;
    assert_eq!(page1["notifications"].as_array().unwrap().len(), 2);
    let next = page1["next"].as_str().unwrap();
    assert_eq!(next, ids[1]);
    let (_, page2) = node.get_json(&format!("/api/users/p/notifications?limit=2&after={next}")).await;
    assert_eq!(page2["notifications"][0]["id"], ids[2].as_str());

    assert_eq!(node.get_json("/api/users/p/notifications?after=nope").await.0, 400);
    assert_eq!(node.get_json("/api/users/p/notifications?limit=0").await.0, 400);
    assert_eq!(node.get_json("/api/users/bad%20user/unread").await.0, 400);
    let (status, body) = node.post("/api/users/p/read", Some(API_KEY), json!({ "ids": ["x"] }).to_string()).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("ids[0]")));
    let (status, _) =
        node.post("/api/users/p/read", Some(API_KEY), json!({ "all": true, "up_to": ids[0] }).to_string()).await;
    assert_eq!(status, 400);
    let (status, _) = node.post("/api/users/p/read", None, json!({ "all": true }).to_string()).await;
    assert_eq!(status, 401);
    let (status, body) = node.publish(json!({ "channel": "news", "persist": true, "data": 1 })).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("persist")), "{body}");
    let (status, body) = node.publish(json!({ "user": "p", "idempotency_key": "k", "data": 1 })).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("idempotency_key")), "{body}");

    // A bad last_id is refused before the upgrade.
    assert_eq!(node.refused(&node.ws_url(&format!("token={}&last_id=zzz", node.token("p"))), &[]).await, 400);
    // Bad read frames get error frames.
    let (mut client, _) = connect(&node, "p", None).await;
    for _ in 0..5 {
        client.next_json().await; // the replayed unread ones
    }
    client.send_json(json!({ "type": "read", "ids": ["nope"] })).await;
    assert_eq!(client.next_json().await["code"], "bad_id");
    client.send_json(json!({ "type": "read" })).await;
    assert_eq!(client.next_json().await["code"], "bad_frame");
}

/// Raw sessions get the live payloads and nothing else: no replay of stored notifications,
/// also after the broker's subscription generation moved on (on Redis every subscribe bumps
/// it, which a raw session once took for a gap to replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sessions_get_live_payloads_and_never_a_replay() {
    let redis = RedisServer::start();
    let node = TestNode::on(&redis).await;
    persist(&node, "r1", json!("stored-1")).await;
    persist(&node, "r1", json!("stored-2")).await;
    let url = node.ws_url(&format!("token={}&format=raw", node.token("r1")));
    let mut client = Client::connect(&url).await.unwrap();
    eventually("raw session never subscribed", || redis.numsub("pushnode:user:r1") == 1).await;
    for n in 1..=3 {
        persist(&node, "r1", json!(format!("live-{n}"))).await;
        assert_eq!(client.next_text().await, format!("\"live-{n}\""));
    }
    client.expect_silence(Duration::from_millis(300)).await;
}
