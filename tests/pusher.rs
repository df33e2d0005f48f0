//! The Pusher protocol front end, spoken by clients nobody here wrote: pusher-js, Laravel Echo
//! and the `pusher` server SDK (tests/browser/pusher.mjs, run with Node), on two nodes over one
//! real Redis; and the protocol details (frames, close codes, signatures) with a plain
//! WebSocket client.
//!
//! The Node scenarios need `node` and `npm ci --prefix tests/browser` (`.ci/run` does it);
//! without them they say so and pass locally, and fail under CI (`CI` set).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::pusher::*;
use common::redis::RedisServer;
use common::{Client, TestNode, WAIT, eventually, on_redis};
use futures_util::SinkExt;
use md5::{Digest, Md5};
use pushnode::protocol::pusher::sign;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The scripts' folder, or `None` (outside CI) when Node or the packages are missing.
fn scripts() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let ready = dir.join("node_modules/pusher-js").exists() && Command::new("node").arg("--version").output().is_ok();
    if !ready {
        assert!(std::env::var_os("CI").is_none(), "pusher test prerequisites missing under CI");
        eprintln!("SKIPPED: install node and run `npm ci --prefix tests/browser` to run the pusher-js tests");
        return None;
    }
    Some(dir)
}

/// Runs one scenario of pusher.mjs against `nodes` (the API on the first one's public listener).
/// False if it was skipped (no Node or no clients installed, outside CI).
async fn scenario(name: &str, nodes: &[&TestNode]) -> bool {
    let Some(dir) = scripts() else { return false };
    let config = json!({
        "nodes": nodes.iter().map(|n| n.public.to_string()).collect::<Vec<_>>(),
        "api": nodes[0].public.to_string(),
        "appId": APP_ID, "key": KEY, "secret": APP_SECRET,
    });
    common::run_node_script(dir.join("pusher.mjs"), vec![name.to_owned(), config.to_string()], None).await;
    true
}

/// Two nodes with the app, on one real Redis.
async fn pair(redis: &RedisServer) -> (TestNode, TestNode) {
    let a = TestNode::with(|s| {
        on_redis(s, &redis.url());
        with_app(s);
    })
    .await;
    let b = TestNode::with(|s| {
        on_redis(s, &redis.url());
        with_app(s);
    })
    .await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_receives_public_events_on_every_node_except_the_excluded_socket() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("public_across_nodes", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_channels_need_the_apps_signature_and_a_forged_one_gets_a_subscription_error() {
    let node = TestNode::with(with_app).await;
    scenario("private_channels", &[&node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_channels_are_relayed_opaque_and_decrypted_by_pusher_js() {
    let node = TestNode::with(with_app).await;
    scenario("encrypted_channels", &[&node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_with_an_unknown_key_gets_4001_and_stops_retrying() {
    let node = TestNode::with(with_app).await;
    scenario("unknown_key_is_refused_with_4001", &[&node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispers_cross_nodes_and_never_return_to_the_sender() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("whisper", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_echo_listens_on_private_and_public_channels_and_sees_refusals() {
    let node = TestNode::with(with_app).await;
    scenario("laravel_echo", &[&node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_sdk_signing_with_a_wrong_secret_gets_401_and_publishes_nothing() {
    let node = TestNode::with(with_app).await;
    scenario("api_refuses_a_wrong_signature", &[&node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_one_member_per_user_across_nodes_and_tabs() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("presence_across_nodes", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_works_the_same_on_a_single_node_without_redis() {
    let node = TestNode::with(with_app).await;
    scenario("presence_across_nodes", &[&node, &node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_echo_presence_here_joining_and_leaving_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("echo_presence", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_user_reaches_every_signed_in_socket_of_the_user_and_terminate_closes_them() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("send_to_user", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_queries_count_subscriptions_and_members_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis).await;
    scenario("channel_queries", &[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_queries_on_a_single_node_without_redis() {
    let node = TestNode::with(with_app).await;
    scenario("channel_queries", &[&node, &node]).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_notifications_published_while_away_reach_echo_at_the_next_visit() {
    let redis = RedisServer::start();
    let nodes: Vec<TestNode> = futures_util::future::join_all((0..2).map(|_| {
        TestNode::with(|s| {
            on_redis(s, &redis.url());
            with_app(s);
            s.pusher.persist_notifications = true;
        })
    }))
    .await;
    for node in &nodes {
        node.wait_ready(200).await;
    }
    if !scenario("notifications_wait_for_offline_users", &[&nodes[0], &nodes[1]]).await {
        return;
    }
    // They are the user's inbox notifications, visible to the native API too.
    let (status, body) = nodes[0].get_json("/api/users/42/notifications?limit=10").await;
    assert_eq!(status, 200, "{body}");
    let items = body["notifications"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{body}");
    assert!(items.iter().all(|n| n["read"] == true), "{body}");
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_notifications_wait_in_the_memory_inbox_on_a_single_node() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.pusher.persist_notifications = true;
    })
    .await;
    scenario("notifications_wait_for_offline_users", &[&node, &node]).await;
    node.stop().await;
}

/// On a Redis Cluster: channels travel on hash-tagged broker channels (`pusher:{<app>:<channel>}`,
/// sharded pub/sub), and presence and counts run as Redis functions on one slot per channel
/// and per app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_channels_presence_and_counts_work_on_a_redis_cluster() {
    let cluster = common::redis::RedisCluster::start();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let node = TestNode::with(|s| {
            common::on_cluster(s, &cluster.nodes());
            with_app(s);
        })
        .await;
        node.wait_ready(200).await;
        nodes.push(node);
    }
    // One socket's subscription shows as a sharded subscription on the channel's hash tag.
    let (mut client, _) = established(&nodes[0]).await;
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "tagged"}})).await;
    event(&mut client, "pusher_internal:subscription_succeeded").await;
    assert_eq!(cluster.shard_numsub(&format!("pusher:{{{APP_ID}:tagged}}")), 1);
    drop(client);
    for name in ["channel_queries", "presence_across_nodes", "public_across_nodes", "send_to_user"] {
        scenario(name, &[&nodes[0], &nodes[1]]).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_presence_members_are_announced_gone_within_the_ttl() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;

    let Some(dir) = scripts() else { return };
    let ttl = Duration::from_secs(3);
    let redis = RedisServer::start();
    let survivor = TestNode::with(|s| {
        on_redis(s, &redis.url());
        with_app(s);
        s.pusher.presence_ttl = ttl;
    })
    .await;
    survivor.wait_ready(200).await;
    let mut doomed = ChildNode::start(&redis.url(), &[("PUSHNODE__PUSHER__PRESENCE_TTL", "3s")]).await;
    let public = doomed.public;

    // Deadline passed after at most one TTL, reaped by the survivor's next sync (a third of it),
    // plus a second for the event to travel and the machine to be busy.
    let bound = ttl + ttl / 3 + Duration::from_secs(1);
    let config = json!({
        "nodes": [survivor.public.to_string(), format!("127.0.0.1:{public}")],
        "api": survivor.public.to_string(),
        "appId": APP_ID, "key": KEY, "secret": APP_SECRET,
        "killBoundMs": bound.as_millis() as u64,
    });
    let pid = doomed.child.id();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let mut script = Command::new("node")
            .arg(dir.join("pusher.mjs"))
            .arg("presence_node_killed")
            .arg(config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run node");
        let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
        let mut stdout = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            stdout.push_str(&line);
            stdout.push('\n');
            if line == "kill" {
                let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
                assert!(killed.success());
                writeln!(script.stdin.as_mut().unwrap(), "killed").unwrap();
                break;
            }
        }
        for line in lines {
            stdout.push_str(&line.unwrap());
            stdout.push('\n');
        }
        let mut stderr = String::new();
        script.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        (script.wait().unwrap(), stdout, stderr)
    })
    .await
    .unwrap();
    assert!(status.success(), "pusher.mjs failed:\n{stdout}\n{stderr}");
    eprint!("{stdout}");
    doomed.child.wait().unwrap();
    survivor.stop().await;
}

// ---- The protocol in detail, with a plain WebSocket client ----

#[tokio::test]
async fn connection_established_carries_a_socket_id_and_an_activity_timeout() {
    let node = TestNode::with(with_app).await;
    let mut client = pusher_client(&node, KEY).await;
    let frame = client.next_json().await;
    let data: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap();
    let (left, right) = socket_id.split_once('.').unwrap();
    assert!(left.bytes().chain(right.bytes()).all(|b| b.is_ascii_digit()) && !left.is_empty() && !right.is_empty());
    assert_eq!(data["activity_timeout"], 30);

    // pusher:ping is answered; a subscribe with data as a string works like one with an object.
    client.send_json(json!({"event": "pusher:ping", "data": {}})).await;
    assert_eq!(event(&mut client, "pusher:pong").await["event"], "pusher:pong");
    let inner = json!({"channel": "news"}).to_string();
    client.send_json(json!({"event": "pusher:subscribe", "data": inner})).await;
    let ok = event(&mut client, "pusher_internal:subscription_succeeded").await;
    assert_eq!(ok["channel"], "news");
    node.stop().await;
}

#[tokio::test]
async fn malformed_frames_and_bad_subscriptions_get_errors_and_the_socket_stays() {
    let node = TestNode::with(with_app).await;
    let (mut client, socket_id) = established(&node).await;
    client.send_text("not json").await;
    let error = event(&mut client, "pusher:error").await;
    assert!(error["data"]["message"].as_str().unwrap().contains("invalid frame"), "{error}");
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "bad{name}"}})).await;
    let error = event(&mut client, "pusher:subscription_error").await;
    assert_eq!((error["channel"].as_str(), error["data"]["status"].as_u64()), (Some("bad{name}"), Some(400)));
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "private-x"}})).await;
    let error = event(&mut client, "pusher:subscription_error").await;
    assert_eq!(error["data"]["type"], "AuthError");
    assert_eq!(error["data"]["status"], 401);
    // A signature for another socket is refused too.
    let stolen = auth("1.1", "private-x");
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": stolen}})).await;
    assert_eq!(event(&mut client, "pusher:subscription_error").await["data"]["status"], 401);
    let good = auth(&socket_id, "private-x");
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "private-x", "auth": good}})).await;
    assert_eq!(event(&mut client, "pusher_internal:subscription_succeeded").await["channel"], "private-x");
    // Client events are refused on public channels and when not subscribed.
    client.send_json(json!({"event": "client-x", "channel": "news", "data": {}})).await;
    assert!(event(&mut client, "pusher:error").await["data"]["message"].as_str().unwrap().contains("private"));
    client.send_json(json!({"event": "client-x", "channel": "private-y", "data": {}})).await;
    assert!(event(&mut client, "pusher:error").await["data"]["message"].as_str().unwrap().contains("not subscribed"));
    node.stop().await;
}

#[tokio::test]
async fn a_forged_signin_closes_with_4009_and_a_user_channel_needs_that_user() {
    let node = TestNode::with(with_app).await;
    let (mut client, socket_id) = established(&node).await;
    // Without signing in, nobody may subscribe a user's channel.
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-7"}})).await;
    assert_eq!(event(&mut client, "pusher:subscription_error").await["data"]["status"], 401);
    // Signed in as 7: its channel, not another's.
    let user_data = json!({"id": "7"}).to_string();
    let auth = format!("{KEY}:{}", sign(APP_SECRET, &format!("{socket_id}::user::{user_data}")));
    client.send_json(json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}})).await;
    let success = event(&mut client, "pusher:signin_success").await;
    assert_eq!(success["data"]["user_data"], user_data);
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-7"}})).await;
    assert_eq!(event(&mut client, "pusher_internal:subscription_succeeded").await["channel"], "#server-to-user-7");
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "#server-to-user-8"}})).await;
    assert_eq!(event(&mut client, "pusher:subscription_error").await["data"]["status"], 401);

    let (mut forger, forger_id) = established(&node).await;
    let stolen = format!("{KEY}:{}", sign("not-the-secret", &format!("{forger_id}::user::{user_data}")));
    forger.send_json(json!({"event": "pusher:signin", "data": {"auth": stolen, "user_data": user_data}})).await;
    assert_eq!(event(&mut forger, "pusher:error").await["data"]["code"], 4009);
    assert_eq!(forger.close_code().await, 4009);
    node.stop().await;
}

#[tokio::test]
async fn an_unknown_key_is_closed_with_4001_after_a_pusher_error() {
    let node = TestNode::with(with_app).await;
    let mut client = pusher_client(&node, "nope").await;
    let error = event(&mut client, "pusher:error").await;
    assert_eq!(error["data"]["code"], 4001);
    assert_eq!(client.close_code().await, 4001);
    node.stop().await;
}

#[tokio::test]
async fn an_app_at_its_connection_cap_refuses_with_4100_and_frees_the_slot_on_close() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.pusher.apps[0].max_connections = 1;
    })
    .await;
    let (first, _) = established(&node).await;
    let mut second = pusher_client(&node, KEY).await;
    assert_eq!(event(&mut second, "pusher:error").await["data"]["code"], 4100);
    assert_eq!(second.close_code().await, 4100);
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut again = pusher_client(&node, KEY).await;
        if again.next_json().await["event"] == "pusher:connection_established" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_draining_node_tells_pusher_clients_to_reconnect_at_once_with_4200() {
    let node = TestNode::with(with_app).await;
    let (mut client, _) = established(&node).await;
    node.begin_shutdown();
    assert_eq!(event(&mut client, "pusher:error").await["data"]["code"], 4200);
    assert_eq!(client.close_code().await, 4200);
}

#[tokio::test]
async fn a_silent_pusher_client_is_pinged_then_closed_with_4201() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.session.heartbeat_interval = Duration::from_millis(200);
        s.session.heartbeat_timeout = Duration::from_millis(600);
    })
    .await;
    let (mut client, _) = established(&node).await;
    // The node's ping is a pusher:ping text frame (pusher-js cannot see WebSocket pings) ...
    assert_eq!(event(&mut client, "pusher:ping").await["event"], "pusher:ping");
    // ... and, unanswered, ends in 4201 (pong not received: pusher-js reconnects at once).
    let error = event(&mut client, "pusher:error").await;
    assert_eq!(error["data"]["code"], 4201);
    assert_eq!(client.close_code().await, 4201);
    node.stop().await;
}

#[tokio::test]
async fn client_events_past_ten_a_second_are_dropped_with_4301() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.limits.client_frames_per_second = 100;
    })
    .await;
    let (mut sender, socket_id) = established(&node).await;
    let (mut receiver, receiver_id) = established(&node).await;
    for (client, id) in [(&mut sender, &socket_id), (&mut receiver, &receiver_id)] {
        let auth = auth(id, "private-room");
        client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "private-room", "auth": auth}})).await;
        event(client, "pusher_internal:subscription_succeeded").await;
    }
    for i in 0..15 {
        sender.send_json(json!({"event": "client-n", "channel": "private-room", "data": {"i": i}})).await;
    }
    let error = event(&mut sender, "pusher:error").await;
    assert_eq!(error["data"]["code"], 4301);
    // The first ten got through, in order; the rest were dropped.
    for i in 0..10 {
        assert_eq!(event(&mut receiver, "client-n").await["data"]["i"], i);
    }
    expect_no_event(&mut receiver, Duration::from_millis(300)).await;
    node.stop().await;
}

/// Signs an API request the way Pusher server SDKs do, at `timestamp`.
fn signed_path(path: &str, body: &str, timestamp: u64, secret: &str) -> String {
    let md5 = hex::encode(Md5::digest(body.as_bytes()));
    let query = format!("auth_key={KEY}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={md5}");
    let signature = sign(secret, &format!("POST\n{path}\n{query}"));
    format!("{path}?{query}&auth_signature={signature}")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

async fn post(node: &TestNode, path_and_query: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}{path_and_query}", node.public))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_api_refuses_stale_forged_and_malformed_requests_and_publishes_nothing() {
    let node = TestNode::with(with_app).await;
    let (mut client, _) = established(&node).await;
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "news"}})).await;
    event(&mut client, "pusher_internal:subscription_succeeded").await;
    let path = format!("/apps/{APP_ID}/events");
    let body = json!({"name": "e", "channel": "news", "data": "{\"n\":1}"}).to_string();

    let stale = signed_path(&path, &body, now() - 700, APP_SECRET);
    let (status, error) = post(&node, &stale, &body).await;
    assert_eq!(status, 401, "{error}");
    assert!(error["error"].as_str().unwrap().contains("auth_timestamp"), "{error}");
    assert_eq!(post(&node, &signed_path(&path, &body, now(), "wrong-secret"), &body).await.0, 401);
    let other_body = json!({"name": "e", "channel": "news", "data": "{\"n\":2}"}).to_string();
    assert_eq!(post(&node, &signed_path(&path, &body, now(), APP_SECRET), &other_body).await.0, 401);
    assert_eq!(post(&node, &signed_path("/apps/999/events", &body, now(), APP_SECRET), &body).await.0, 404);
    for bad in [
        json!({"name": "e", "data": "{}"}),
        json!({"name": "", "channel": "news", "data": "{}"}),
        json!({"name": "e", "channel": "bad{name}", "data": "{}"}),
        json!({"name": "e", "channel": "news", "data": "{}", "socket_id": "abc"}),
        json!({"name": "pusher_internal:member_added", "channel": "presence-x", "data": "{}"}),
    ] {
        let bad = bad.to_string();
        let (status, error) = post(&node, &signed_path(&path, &bad, now(), APP_SECRET), &bad).await;
        assert_eq!(status, 400, "{bad}: {error}");
    }
    expect_no_event(&mut client, Duration::from_millis(200)).await;

    let (status, _) = post(&node, &signed_path(&path, &body, now(), APP_SECRET), &body).await;
    assert_eq!(status, 200);
    let got = event(&mut client, "e").await;
    assert_eq!((got["channel"].as_str(), &got["data"]), (Some("news"), &json!({"n": 1})));
    node.stop().await;
}

#[tokio::test]
async fn the_api_listener_setting_moves_the_api_to_the_internal_listener() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.pusher.api_listener = pushnode::settings::ApiListener::Internal;
    })
    .await;
    let path = format!("/apps/{APP_ID}/events");
    let body = json!({"name": "e", "channel": "news", "data": "{}"}).to_string();
    assert_eq!(post(&node, &signed_path(&path, &body, now(), APP_SECRET), &body).await.0, 404);
    let response = reqwest::Client::new()
        .post(format!("http://{}{}", node.internal, signed_path(&path, &body, now(), APP_SECRET)))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    node.stop().await;
}

#[tokio::test]
async fn a_pusher_only_node_needs_no_jwt_secret_or_api_keys_and_keeps_the_native_api_closed() {
    let node = TestNode::with(|s| {
        with_app(s);
        s.auth.jwt_secret = String::new();
        s.auth.api_keys = Vec::new();
    })
    .await;
    let (status, body) = node.publish(json!({"user": "1", "data": {}})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = node.post("/api/publish", None, json!({"user": "1", "data": {}}).to_string()).await;
    assert_eq!(status, 401);
    // No native token is valid (nobody knows the per-process key); Pusher works.
    let forged = pushnode::auth::Authenticator::new(&pushnode::settings::Auth::default());
    let token = forged.issue("1", Duration::from_secs(60), vec![]).unwrap();
    assert_eq!(node.refused(&node.ws_url(&format!("token={token}")), &[]).await, 401);
    established(&node).await;
    node.stop().await;
}

#[tokio::test]
async fn pusher_sessions_obey_the_channel_and_size_limits_and_are_counted_by_app() {
    let node = TestNode::with(|s| {
        with_app(s);
        // An app id of its own: the metrics recorder is shared by every test of this binary.
        s.pusher.apps[0].id = "limits-app".into();
        s.limits.max_topics_per_session = 3;
        s.limits.client_frames_per_second = 100;
    })
    .await;
    let (mut client, _) = established(&node).await;
    let gauge = r#"pushnode_pusher_connections{app="limits-app"}"#;
    assert_eq!(common::metric(&node.get("/metrics").await.1, gauge), 1.0);
    for i in 0..3 {
        client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": format!("c{i}")}})).await;
        event(&mut client, "pusher_internal:subscription_succeeded").await;
    }
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "one-too-many"}})).await;
    let refused = event(&mut client, "pusher:subscription_error").await;
    assert_eq!(refused["data"]["type"], "LimitReached", "{refused}");
    // Leaving one makes room again.
    client.send_json(json!({"event": "pusher:unsubscribe", "data": {"channel": "c0"}})).await;
    client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "one-too-many"}})).await;
    event(&mut client, "pusher_internal:subscription_succeeded").await;
    // A frame over limits.max_frame_bytes (4 KiB) closes with 1009.
    let big = "x".repeat(5000);
    client.send_json(json!({"event": "client-big", "channel": "private-x", "data": {"big": big}})).await;
    assert_eq!(client.close_code().await, 1009);
    let deadline = tokio::time::Instant::now() + WAIT;
    while common::metric(&node.get("/metrics").await.1, gauge) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "pushnode_pusher_connections stayed above 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn a_node_without_apps_has_no_pusher_endpoints() {
    let node = TestNode::start().await;
    assert_eq!(node.refused(&format!("ws://{}/app/{KEY}", node.public), &[]).await, 404);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channels_broker_subscription_follows_its_last_local_socket() {
    let redis = RedisServer::start();
    let node = TestNode::with(|s| {
        on_redis(s, &redis.url());
        with_app(s);
    })
    .await;
    node.wait_ready(200).await;
    let broker_channel = format!("pusher:{APP_ID}:news");
    let (mut a, _) = established(&node).await;
    let (mut b, _) = established(&node).await;
    for client in [&mut a, &mut b] {
        client.send_json(json!({"event": "pusher:subscribe", "data": {"channel": "news"}})).await;
        event(client, "pusher_internal:subscription_succeeded").await;
    }
    assert_eq!(redis.numsub(&broker_channel), 1, "one subscription per node, not per socket");
    a.send_json(json!({"event": "pusher:unsubscribe", "data": {"channel": "news"}})).await;
    a.sync_pusher().await;
    assert_eq!(redis.numsub(&broker_channel), 1);
    // The last socket goes away without unsubscribing: the node unsubscribes for it.
    b.ws.send(Message::Close(None)).await.unwrap();
    drop(b);
    let redis_ref = &redis;
    eventually("the node unsubscribed the channel", || redis_ref.numsub(&broker_channel) == 0).await;
    node.stop().await;
}

trait SyncPusher {
    async fn sync_pusher(&mut self);
}

impl SyncPusher for Client {
    /// A ping round trip: everything sent before it was handled.
    async fn sync_pusher(&mut self) {
        self.send_json(json!({"event": "pusher:ping", "data": {}})).await;
        event(self, "pusher:pong").await;
    }
}
