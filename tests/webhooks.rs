//! Webhooks end to end: real nodes over a real Redis call a real HTTP receiver
//! (tests/browser/webhook-receiver.mjs) that checks every call with the `pusher` server SDK's
//! own webhook validation and can fail, hang or redirect on demand.
//!
//! Needs `node` and `npm ci --prefix tests/browser`; without them the tests say so and pass
//! locally, and fail under CI (`CI` set).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::pusher::*;
use common::redis::RedisServer;
use common::{Client, TestNode, WAIT, metric, on_redis};
use pushnode::Settings;
use pushnode::protocol::pusher::sign;
use pushnode::settings::WebhookEndpoint;
use serde_json::{Value, json};

/// The receiver process; killed when dropped.
struct Receiver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Starts one checking signatures made with `key`/`secret`; `None` (outside CI) without Node.
    fn start(key: &str, secret: &str) -> Option<Self> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        if !dir.join("node_modules/pusher").exists() {
            assert!(std::env::var_os("CI").is_none(), "webhook test prerequisites missing under CI");
            eprintln!("SKIPPED: run `npm ci --prefix tests/browser` to run the webhook tests");
            return None;
        }
        let mut child = Command::new("node")
            .arg(dir.join("webhook-receiver.mjs"))
            .arg(json!({ "key": key, "secret": secret }).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot run node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("listening ").expect("receiver did not start").to_owned();
        Some(Self { child, url: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() })
    }

    fn hook(&self) -> String {
        format!("{}/hook", self.url)
    }

    async fn mode(&self, mode: &str) {
        self.http.post(format!("{}/mode/{mode}", self.url)).send().await.unwrap();
    }

    /// (valid events, invalid calls, calls)
    async fn seen(&self) -> (Vec<Value>, u64, u64) {
        let v: Value = self.http.get(format!("{}/events", self.url)).send().await.unwrap().json().await.unwrap();
        (v["valid"].as_array().unwrap().clone(), v["invalid"].as_u64().unwrap(), v["calls"].as_u64().unwrap())
    }

    /// Valid events named `name` (for `channel`, if given).
    async fn named(&self, name: &str, channel: Option<&str>) -> Vec<Value> {
        let (valid, invalid, _) = self.seen().await;
        assert_eq!(invalid, 0, "a call failed the SDK's signature check");
        valid.into_iter().filter(|e| e["name"] == name && channel.is_none_or(|c| e["channel"] == c)).collect()
    }

    /// Waits until `count` events named `name` (of `channel`) arrived, then that no more come
    /// within `quiet`; returns them.
    async fn exactly(&self, count: usize, name: &str, channel: Option<&str>, quiet: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.named(name, channel).await;
            assert!(got.len() <= count, "{name}: {} events, want {count}: {got:?}", got.len());
            if got.len() == count {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}: {} events, want {count}", got.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(quiet).await;
        let got = self.named(name, channel).await;
        assert_eq!(got.len(), count, "{name} arrived again: {got:?}");
        got
    }
}

fn endpoint(app: &str, url: String) -> WebhookEndpoint {
    WebhookEndpoint { app: app.into(), url, events: Vec::new(), channel_prefix: String::new() }
}

/// A node with the test app and its webhook (short windows), on `redis` when given.
async fn node(redis: Option<&RedisServer>, receiver: &Receiver, change: impl FnOnce(&mut Settings)) -> TestNode {
    let node = TestNode::with(|s| {
        if let Some(redis) = redis {
            on_redis(s, &redis.url());
        }
        with_app(s);
        s.webhooks.endpoints = vec![endpoint(APP_ID, receiver.hook())];
        s.webhooks.batch_window = Duration::from_millis(50);
        s.webhooks.timeout = Duration::from_secs(1);
        s.pusher.presence_ttl = Duration::from_secs(3);
        change(s);
    })
    .await;
    node.wait_ready(200).await;
    node
}

async fn subscribe(node: &TestNode, channel: &str, member: Option<Value>) -> Client {
    let (mut client, socket_id) = established(node).await;
    let data = match &member {
        None => json!({ "channel": channel, "auth": auth(&socket_id, channel) }),
        Some(member) => {
            let channel_data = member.to_string();
            let auth = format!("{KEY}:{}", sign(APP_SECRET, &format!("{socket_id}:{channel}:{channel_data}")));
            json!({ "channel": channel, "auth": auth, "channel_data": channel_data })
        }
    };
    client.send_json(json!({ "event": "pusher:subscribe", "data": data })).await;
    event(&mut client, "pusher_internal:subscription_succeeded").await;
    client
}

/// A socket on a child node, subscribed to private `channel`.
async fn subscribe_at(node: &ChildNode, channel: &str) -> Client {
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/app/{KEY}", node.public)).await.unwrap();
    let established = event(&mut client, "pusher:connection_established").await;
    let socket_id = established["data"]["socket_id"].as_str().unwrap().to_owned();
    let data = json!({ "channel": channel, "auth": auth(&socket_id, channel) });
    client.send_json(json!({ "event": "pusher:subscribe", "data": data })).await;
    event(&mut client, "pusher_internal:subscription_succeeded").await;
    client
}

/// Closes a client and waits until its node has let go of it (the close handshake).
async fn leave(mut client: Client) {
    client.ws.close(None).await.ok();
    while let Ok(Some(_)) = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut client.ws)).await {}
}

const QUIET: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_on_two_nodes_is_occupied_once_and_vacated_once_after_its_last_socket() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    let (a, b) = (node(Some(&redis), &receiver, |_| {}).await, node(Some(&redis), &receiver, |_| {}).await);
    let first = subscribe(&a, "private-room", None).await;
    let second = subscribe(&b, "private-room", None).await;
    let third = subscribe(&b, "private-room", None).await;
    receiver.exactly(1, "channel_occupied", Some("private-room"), QUIET).await;
    leave(first).await;
    leave(second).await;
    tokio::time::sleep(QUIET).await;
    assert!(receiver.named("channel_vacated", None).await.is_empty(), "vacated while a socket is left");
    leave(third).await;
    receiver.exactly(1, "channel_vacated", Some("private-room"), QUIET).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_members_are_announced_once_per_user_across_nodes() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    let (a, b) = (node(Some(&redis), &receiver, |_| {}).await, node(Some(&redis), &receiver, |_| {}).await);
    let ann = json!({ "user_id": 1, "user_info": { "name": "Ann" } });
    let tabs = vec![
        subscribe(&a, "presence-room", Some(ann.clone())).await,
        subscribe(&b, "presence-room", Some(ann.clone())).await,
        subscribe(&b, "presence-room", Some(ann)).await,
    ];
    let bob = subscribe(&a, "presence-room", Some(json!({ "user_id": "bob" }))).await;
    let added = receiver.exactly(2, "member_added", Some("presence-room"), QUIET).await;
    let mut ids: Vec<&str> = added.iter().map(|e| e["user_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["1", "bob"], "user ids are strings, as Pusher sends them");
    for tab in tabs {
        leave(tab).await;
    }
    let removed = receiver.exactly(1, "member_removed", Some("presence-room"), QUIET).await;
    assert_eq!(removed[0]["user_id"], "1");
    leave(bob).await;
    receiver.exactly(2, "member_removed", Some("presence-room"), QUIET).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_for_a_while_then_recovers_gets_every_event_exactly_once() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    let a = node(Some(&redis), &receiver, |_| {}).await;
    receiver.mode("fail").await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(subscribe(&a, &format!("private-c{i}"), None).await);
    }
    // Failing for 3 s: calls at 0, 1 and 3 s (the doubling back-off) all get 500.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, _, failed_calls) = receiver.seen().await;
    assert!(failed_calls >= 2, "retried: {failed_calls} calls");
    receiver.mode("ok").await;
    receiver.exactly(5, "channel_occupied", None, Duration::from_secs(3)).await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_queued_in_redis_survive_a_node_restart() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    receiver.mode("fail").await;
    let a = node(Some(&redis), &receiver, |_| {}).await;
    let client = subscribe(&a, "private-kept", None).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while receiver.seen().await.2 == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the node never called");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
    a.stop().await;
    // Queued: the occupied event (failed once), and the vacated one (from the stopping node).
    receiver.mode("ok").await;
    let b = node(Some(&redis), &receiver, |_| {}).await;
    receiver.exactly(1, "channel_occupied", Some("private-kept"), QUIET).await;
    receiver.exactly(1, "channel_vacated", Some("private-kept"), QUIET).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_channels_are_vacated_within_the_ttl() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    let survivor = node(Some(&redis), &receiver, |_| {}).await;
    let hook = receiver.hook();
    let mut doomed = ChildNode::start(
        &redis.url(),
        &[
            ("PUSHNODE__PUSHER__PRESENCE_TTL", "3s"),
            ("PUSHNODE__WEBHOOKS__BATCH_WINDOW", "50ms"),
            ("PUSHNODE__WEBHOOKS__ENDPOINTS__0__APP", APP_ID),
            ("PUSHNODE__WEBHOOKS__ENDPOINTS__0__URL", &hook),
        ],
    )
    .await;
    // The socket is on the doomed node only: no survivor has the channel.
    let channel = "private-doomed";
    let _client = subscribe_at(&doomed, channel).await;
    receiver.exactly(1, "channel_occupied", Some(channel), Duration::ZERO).await;

    doomed.child.kill().unwrap();
    let killed = std::time::Instant::now();
    doomed.child.wait().unwrap();
    // Past its deadline after at most one TTL (3 s); reaped at the survivor's next round (a
    // third of it); then the batch window. One more second for a busy machine.
    let bound = Duration::from_secs(3) + Duration::from_secs(1) + Duration::from_secs(1);
    loop {
        if !receiver.named("channel_vacated", Some(channel)).await.is_empty() {
            break;
        }
        if killed.elapsed() > Duration::from_secs(8) {
            eprintln!("DEBUG reg {:?}", redis.cli(&["ZRANGE", "pushnode:occupancy:nodes", "0", "-1", "WITHSCORES"]));
            eprintln!("DEBUG time {:?}", redis.cli(&["TIME"]));
        }
        assert!(killed.elapsed() < bound, "not vacated within {bound:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("vacated {:?} after the kill", killed.elapsed());
    receiver.exactly(1, "channel_vacated", Some(channel), QUIET).await;
    survivor.stop().await;
}

/// A container restarted in its pod keeps its node id (the chart uses the pod name): the new
/// process releases what the killed one held, so its channels are vacated rather than held by
/// an id that looks alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_the_same_id_releases_what_its_previous_process_held() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let redis = RedisServer::start();
    let hook = receiver.hook();
    let env = [
        ("PUSHNODE__SERVER__NODE_ID", "push-0"),
        ("PUSHNODE__PUSHER__PRESENCE_TTL", "3s"),
        ("PUSHNODE__WEBHOOKS__BATCH_WINDOW", "50ms"),
        ("PUSHNODE__WEBHOOKS__ENDPOINTS__0__APP", APP_ID),
        ("PUSHNODE__WEBHOOKS__ENDPOINTS__0__URL", &hook),
    ];
    let mut first = ChildNode::start(&redis.url(), &env).await;
    let channel = "private-restarted";
    let client = subscribe_at(&first, channel).await;
    receiver.exactly(1, "channel_occupied", Some(channel), Duration::ZERO).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(client);

    let _second = ChildNode::start(&redis.url(), &env).await;
    receiver.exactly(1, "channel_vacated", Some(channel), QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_slows_no_session_and_a_full_queue_drops_and_counts() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    receiver.mode("hang").await;
    let a = node(None, &receiver, |s| s.webhooks.max_queue = 3).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(subscribe(&a, &format!("private-h{i}"), None).await);
    }
    // Sessions go on at full speed while the webhook calls hang: a client event crosses at once.
    let mut other = subscribe(&a, "private-h0", None).await;
    let started = std::time::Instant::now();
    clients[0].send_json(json!({ "event": "client-ping", "channel": "private-h0", "data": {} })).await;
    event(&mut other, "client-ping").await;
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = a.get("/metrics").await.1;
        if metric(&metrics, r#"pushnode_webhooks_dropped_total{reason="queue_full"}"#) >= 3.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no queue_full drop counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The hanging calls end at the timeout and count as failures.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = a.get("/metrics").await.1;
        if metric(&metrics, r#"pushnode_webhooks_failed_total{reason="timeout"}"#) >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no timeout counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_endpoint_is_retried_and_a_huge_answer_is_not_read() {
    let Some(receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    // Nothing listens on this port: every call is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let a = node(None, &receiver, |s| {
        s.webhooks.endpoints.push(endpoint(APP_ID, format!("http://127.0.0.1:{closed}/hook")));
    })
    .await;
    receiver.mode("huge").await;
    let client = subscribe(&a, "private-big", None).await;
    // The working endpoint took the event although its 64 MiB answer was never read: sent once.
    receiver.exactly(1, "channel_occupied", Some("private-big"), QUIET).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = a.get("/metrics").await.1;
        if metric(&metrics, r#"pushnode_webhooks_failed_total{reason="connect"}"#) >= 2.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the refusing endpoint was not retried:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_events_and_native_reads_are_reported_and_redirects_are_failures() {
    let Some(receiver) = Receiver::start("pushnode", "native-secret-0123") else { return };
    let Some(pusher_receiver) = Receiver::start(KEY, APP_SECRET) else { return };
    let a = node(None, &pusher_receiver, |s| {
        s.webhooks.endpoints.push(endpoint("native", receiver.hook()));
        s.webhooks.native_secret = "native-secret-0123".into();
        s.webhooks.endpoints[0].events = vec!["client_event".into()];
    })
    .await;
    let mut sender = subscribe(&a, "private-chat", None).await;
    let _listener = subscribe(&a, "private-chat", None).await;
    sender.send_json(json!({ "event": "client-typing", "channel": "private-chat", "data": { "who": "ann" } })).await;
    let events = pusher_receiver.exactly(1, "client_event", Some("private-chat"), Duration::ZERO).await;
    assert_eq!(events[0]["event"], "client-typing");
    assert_eq!(serde_json::from_str::<Value>(events[0]["data"].as_str().unwrap()).unwrap(), json!({ "who": "ann" }));
    assert!(events[0]["socket_id"].as_str().unwrap().contains('.'));
    assert!(pusher_receiver.named("channel_occupied", None).await.is_empty(), "filtered out by the endpoint's events");

    // A native user reads notifications: the native endpoint hears it, signed with its secret.
    let (status, body) = a.publish(json!({ "user": "42", "data": { "n": 1 }, "persist": true })).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = a.post("/api/users/42/read", Some(common::API_KEY), json!({ "all": true }).to_string()).await;
    assert_eq!(status, 200, "{body}");
    let read = receiver.exactly(1, "notifications_read", None, Duration::ZERO).await;
    assert_eq!(
        (read[0]["user_id"].as_str(), read[0]["all"].as_bool(), read[0]["unread"].as_u64()),
        (Some("42"), Some(true), Some(0))
    );

    // A redirect is a failure, not followed.
    receiver.mode("redirect").await;
    let (status, _) = a.post("/api/users/42/read", Some(common::API_KEY), json!({ "all": true }).to_string()).await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = a.get("/metrics").await.1;
        if metric(&metrics, r#"pushnode_webhooks_failed_total{reason="redirect"}"#) >= 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no redirect failure counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _, calls) = receiver.seen().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.seen().await.2 <= calls + 1, "the redirect was followed");
    a.stop().await;
}
