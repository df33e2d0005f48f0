//! The node facing the open Internet: what an unauthenticated or hostile client can and cannot
//! do. Each test reproduces an attack that worked before the defence it checks (docs/security.md
//! lists them).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{API_KEY, Client, RawClient, SECRET, TestNode, WAIT};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// 1. No unauthenticated exhaustion.

#[tokio::test]
async fn a_connect_burst_far_larger_than_the_pool_loses_no_client() {
    // Eviction takes only connections the node has read from and is waiting on: real clients
    // queued behind a burst have sent their request by the time the node gets to them.
    let node = TestNode::with(|s| s.limits.max_pending_connections = 4).await;
    let connects = (0..300).map(|i| {
        let url = node.ws_url(&format!("token={}", node.token(&format!("burst{i}"))));
        async move {
            let mut client = Client::connect(&url).await.unwrap();
            client.next_json().await["type"].as_str().map(str::to_owned)
        }
    });
    let welcomed = futures_util::future::join_all(connects).await;
    assert!(welcomed.iter().all(|w| w.as_deref() == Some("welcome")));
    node.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_deadline() {
    let node = TestNode::with(|s| s.server.keepalive_timeout = Duration::from_secs(1)).await;
    let mut stream = TcpStream::connect(node.internal).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle = Instant::now();
    let closed = common::closed_by_peer(stream).await;
    let after = closed.duration_since(idle);
    assert!(after >= Duration::from_millis(900) && after < Duration::from_secs(3), "closed after {after:?}");
    node.stop().await;
}

#[tokio::test]
async fn a_slowly_sent_request_head_is_cut_off_at_the_header_deadline() {
    let node = TestNode::with(|s| s.server.header_timeout = Duration::from_millis(500)).await;
    let mut stream = TcpStream::connect(node.public).await.unwrap();
    let started = Instant::now();
    // One header byte every 100 ms: never a whole head within the deadline.
    let mut closed = false;
    for byte in b"GET /ws HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter().cycle().take(60) {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slow head held the connection for {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3));
    node.stop().await;
}

/// A `pushnode serve` child process, killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn a_node_at_its_descriptor_limit_still_admits_a_client_with_a_token() {
    // 256 descriptors: before the bounds, 100 sessions and 150 silent sockets used them all and
    // nobody else got in.
    let (mut child, public, internal) = serve_child(Some(256), &[("PUSHNODE__SERVER__HEADER_TIMEOUT", "2s")]).await;
    let http = reqwest::Client::new();
    let auth = pushnode::auth::Authenticator::new(&common::settings().auth);
    // 100 sessions first: the silent sockets may then use only what the sessions leave of the
    // public listener's share (without that, 100 + 168 would pass the limit).
    let mut sessions = Vec::new();
    for i in 0..100 {
        let token = auth.issue(&format!("s{i}"), Duration::from_secs(60), vec![]).unwrap();
        let mut client = Client::connect(&format!("ws://127.0.0.1:{public}/ws?token={token}")).await.unwrap();
        assert_eq!(client.next_json().await["type"], "welcome");
        sessions.push(client);
    }
    let mut silent = Vec::new();
    // More than the 68 places the sessions leave, few enough that the client, queued behind them
    // in the backlog, is reached after about two rounds of eviction (2 s each), well within WAIT.
    for _ in 0..150 {
        silent.push(TcpStream::connect(("127.0.0.1", public)).await.unwrap());
    }
    let token = auth.issue("7", Duration::from_secs(60), vec![]).unwrap();
    let url = format!("ws://127.0.0.1:{public}/ws?token={token}");
    let mut client = tokio::time::timeout(WAIT, Client::connect(&url)).await.expect("locked out").unwrap();
    assert_eq!(client.next_json().await["type"], "welcome");
    // The internal listener has its own pool: the API and /metrics still answer.
    let response = http
        .post(format!("http://127.0.0.1:{internal}/api/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({ "user": "7", "data": "under siege" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(client.next_json().await["data"], "under siege");
    let metrics = http.get(format!("http://127.0.0.1:{internal}/metrics")).send().await.unwrap().text().await.unwrap();
    // Sized from the limit: 256 - 64 reserved = 192; 24 internal; of the public 168, 42 kept
    // for accepting.
    assert_eq!(common::metric(&metrics, "pushnode_connections_limit"), 126.0, "{metrics}");
    assert_eq!(common::metric(&metrics, r#"pushnode_accept_errors_total{listener="public",reason="resources"}"#), 0.0);
    assert!(common::metric(&metrics, "process_open_fds") < 256.0, "{metrics}");
    drop(silent);
    drop(sessions);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut log).unwrap();
    assert!(log.contains("file-descriptor limit") && log.contains("connection budget"), "{log}");
}

/// Starts `pushnode serve` on free ports with the test secret and key, under a descriptor
/// limit if one is given (stderr is kept for the test to read); returns it once ready.
async fn serve_child(nofile: Option<u32>, extra_env: &[(&str, &str)]) -> (Child, u16, u16) {
    let (public, internal) = (free_port(), free_port());
    let binary = env!("CARGO_BIN_EXE_pushnode");
    let mut command = match nofile {
        Some(n) => {
            let mut sh = std::process::Command::new("sh");
            sh.args(["-c", &format!("ulimit -n {n} && exec \"$0\" serve"), binary]);
            sh
        }
        None => {
            let mut direct = std::process::Command::new(binary);
            direct.arg("serve");
            direct
        }
    };
    command
        .env_remove("PUSHNODE_CONFIG")
        .env("PUSHNODE__SERVER__PUBLIC_ADDR", format!("127.0.0.1:{public}"))
        .env("PUSHNODE__SERVER__INTERNAL_ADDR", format!("127.0.0.1:{internal}"))
        .env("PUSHNODE__AUTH__JWT_SECRET", SECRET)
        .env("PUSHNODE__AUTH__API_KEYS", API_KEY)
        .env("PUSHNODE__DEMO__ENABLED", "false")
        .envs(extra_env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = Child(command.spawn().unwrap());
    let deadline = Instant::now() + WAIT;
    while reqwest::get(format!("http://127.0.0.1:{internal}/readyz")).await.is_err() {
        assert!(Instant::now() < deadline, "node did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, public, internal)
}

/// User plus system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

#[tokio::test]
async fn accept_out_of_descriptors_backs_off_counts_and_recovers() {
    let (child, public, internal) = serve_child(None, &[]).await;
    let pid = child.0.id();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    // Something else took the descriptors (the budget cannot see other users of them): one left.
    let nofile = rlimit::Resource::NOFILE;
    let (mut soft, mut hard) = (0, 0);
    rlimit::prlimit(pid as i32, nofile, None, Some((&mut soft, &mut hard))).unwrap();
    rlimit::prlimit(pid as i32, nofile, Some((open + 1, hard)), None).unwrap();
    let first = TcpStream::connect(("127.0.0.1", public)).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(TcpStream::connect(("127.0.0.1", public)).await.unwrap());
    }
    let cpu_before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_seconds(pid) - cpu_before;
    assert!(spent < 0.5, "the accept loop spun: {spent} s of CPU in 2 s");
    // Descriptors come back: the node accepts again, by itself.
    rlimit::prlimit(pid as i32, nofile, Some((soft, hard)), None).unwrap();
    drop(first);
    drop(waiting);
    let token = pushnode::auth::Authenticator::new(&common::settings().auth)
        .issue("8", Duration::from_secs(60), vec![])
        .unwrap();
    let mut client = Client::connect(&format!("ws://127.0.0.1:{public}/ws?token={token}")).await.unwrap();
    assert_eq!(client.next_json().await["type"], "welcome");
    let metrics = reqwest::get(format!("http://127.0.0.1:{internal}/metrics")).await.unwrap().text().await.unwrap();
    let errors = common::metric(&metrics, r#"pushnode_accept_errors_total{listener="public",reason="resources"}"#);
    // Backing off from 10 ms doubling: a handful in 2 s, not thousands.
    assert!((1.0..=12.0).contains(&errors), "{errors} failed accepts");
}

// 2. Demo routes and an open API stay local.

#[tokio::test]
async fn a_demo_token_is_valid_on_its_own_node_only() {
    let demo = |s: &mut pushnode::Settings| s.demo.enabled = true;
    let (a, b) = (TestNode::with(demo).await, TestNode::with(demo).await);
    let http = reqwest::Client::new();
    let answer: Value =
        http.get(format!("http://{}/demo/token?user=5", a.public)).send().await.unwrap().json().await.unwrap();
    let token = answer["token"].as_str().unwrap();
    // Same jwt_secret on both nodes, yet B refuses what A's demo minted, and so would any
    // production node.
    assert_eq!(b.refused(&b.ws_url(&format!("token={token}")), &[]).await, 401);
    let mut client = Client::connect(&a.ws_url(&format!("token={token}"))).await.unwrap();
    assert_eq!(client.next_json().await["user"], "5");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn api_bodies_must_be_declared_json() {
    let node = TestNode::start().await;
    let http = reqwest::Client::new();
    let body = json!({ "user": "1", "data": 1 }).to_string();
    for content_type in [None, Some("application/x-www-form-urlencoded"), Some("text/plain")] {
        for path in ["/api/publish", "/api/users/1/read"] {
            let mut request =
                http.post(format!("http://{}{path}", node.internal)).bearer_auth(API_KEY).body(body.clone());
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 415, "{path} {content_type:?}");
        }
    }
    let response = http
        .post(format!("http://{}/api/publish", node.internal))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    node.stop().await;
}

// 3. A topic never reaches a user's channel.

#[tokio::test]
async fn a_topic_that_renders_to_a_users_channel_is_refused_at_run_time_too() {
    // Validation refuses these patterns; the node started without it must still hold.
    let node = TestNode::unvalidated(|s| {
        s.broker.user_channel = "push:message:{user}".into();
        s.broker.topic_channel = "push:{topic}".into();
    })
    .await;
    let token = node.token_with("mallory", &["*"]);
    let mut mallory = Client::connect(&node.ws_url(&format!("token={token}"))).await.unwrap();
    assert_eq!(mallory.next_json().await["type"], "welcome");
    mallory.send_json(json!({ "type": "subscribe", "channel": "message:bob" })).await;
    let answer = mallory.next_json().await;
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some("not_allowed")), "{answer}");
    let (status, body) = node.publish(json!({ "channel": "message:bob", "data": 1 })).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("channel")), "{body}");
    node.publish(json!({ "user": "bob", "persist": true, "data": "for bob" })).await;
    mallory.expect_silence(Duration::from_millis(300)).await;
    node.stop().await;
}

// 4. Every frame costs its sender, and the flooder learns why it was closed.

fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![if fin { 0x80 | opcode } else { opcode }, 0x80 | payload.len() as u8, 1, 2, 3, 4];
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
    frame
}

async fn flood(frames: Vec<u8>) -> u16 {
    let node = TestNode::with(|s| s.limits.client_frames_per_second = 20).await;
    let token = node.token("1");
    let mut raw = RawClient::connect(node.public, &format!("/ws?token={token}&format=raw")).await;
    // Sent at once, nothing read meanwhile: the node must still get its close frame across.
    raw.send_raw(&frames).await;
    let code = raw.close_code().await;
    node.stop().await;
    code
}

#[tokio::test]
async fn a_ping_flood_is_closed_with_4003_and_the_client_sees_the_code() {
    let pings: Vec<u8> = (0..3000).flat_map(|_| masked(0x9, true, b"")).collect();
    assert_eq!(flood(pings).await, 4003);
}

/// Data frames were always counted; what this shows is the linger: without it, the node's
/// close with unread input behind it became a TCP reset and the client never saw 4003.
#[tokio::test]
async fn a_text_flood_with_input_left_unread_still_shows_4003() {
    let frames: Vec<u8> = (0..3000).flat_map(|_| masked(0x1, true, br#"{"type":"ping"}"#)).collect();
    assert_eq!(flood(frames).await, 4003);
}

#[tokio::test]
async fn a_pong_flood_is_closed_with_4003() {
    let pongs: Vec<u8> = (0..3000).flat_map(|_| masked(0xA, true, b"x")).collect();
    assert_eq!(flood(pongs).await, 4003);
}

#[tokio::test]
async fn an_empty_continuation_flood_is_closed_with_4003() {
    let mut frames = masked(0x1, false, b"{");
    frames.extend((0..3000).flat_map(|_| masked(0x0, false, b"")));
    assert_eq!(flood(frames).await, 4003);
}

#[tokio::test]
async fn an_oversized_frame_sent_with_more_behind_it_still_shows_1009() {
    let node = TestNode::with(|s| s.limits.max_frame_bytes = 256).await;
    let token = node.token("1");
    let mut raw = RawClient::connect(node.public, &format!("/ws?token={token}&format=raw")).await;
    let mut big = vec![0x81, 0x80 | 126];
    big.extend_from_slice(&(60_000u16).to_be_bytes());
    big.extend_from_slice(&[1, 2, 3, 4]);
    big.extend(std::iter::repeat_n(b'a' ^ 1, 60_000));
    raw.send_raw(&big).await;
    assert_eq!(raw.close_code().await, 1009);
    node.stop().await;
}

// 5. No input reaches a panic or a retry loop (the Redis side is in inbox_faults.rs and
// redis_broker.rs; the parsers' property tests in parsers.rs).

#[tokio::test]
async fn publish_data_that_cannot_become_a_value_is_refused_naming_the_field() {
    let node = TestNode::start().await;
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    for data in [deep.as_str(), "1e400", r#""\ud800""#] {
        let body = format!(r#"{{"user":"1","persist":true,"data":{data}}}"#);
        let (status, answer) = node.post("/api/publish", Some(API_KEY), body).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some("data")), "{answer}");
    }
    // Nothing was stored, and the inbox still reads.
    let page = node.get_json("/api/users/1/notifications").await;
    assert_eq!(page, (200, json!({ "notifications": [], "next": null })));
    node.stop().await;
}

#[tokio::test]
async fn ids_beyond_what_the_inbox_can_hold_are_refused_before_they_reach_it() {
    let node = TestNode::start().await;
    let huge = "18446744073709551615-18446744073709551615";
    assert_eq!(node.refused(&node.ws_url(&format!("token={}&last_id={huge}", node.token("1"))), &[]).await, 400);
    let (status, body) =
        node.post("/api/users/1/read", Some(API_KEY), json!({ "up_to": "9007199254740992-0" }).to_string()).await;
    assert_eq!((status, body["field"].as_str()), (400, Some("up_to")));
    let mut client = node.connect("1").await;
    client.send_json(json!({ "type": "read", "ids": [huge] })).await;
    assert_eq!(client.next_json().await["code"], "bad_id");
    node.stop().await;
}

// 6. Tokens and origins mean what they say.

fn signed(claims: Value, header: &Header) -> String {
    jsonwebtoken::encode(header, &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test]
async fn token_claims_and_headers_are_honoured_at_the_upgrade() {
    let node = TestNode::start().await;
    let numeric = signed(json!({ "sub": 42, "exp": now() + 60 }), &Header::default());
    let mut client = Client::connect(&node.ws_url(&format!("token={numeric}"))).await.unwrap();
    assert_eq!(client.next_json().await["user"], "42");
    let early = signed(json!({ "sub": "1", "exp": now() + 600, "nbf": now() + 300 }), &Header::default());
    assert_eq!(node.refused(&node.ws_url(&format!("token={early}")), &[]).await, 401);
    let crit = signed(
        json!({ "sub": "1", "exp": now() + 600 }),
        &Header { crit: Some(vec!["urn:example".into()]), ..Default::default() },
    );
    assert_eq!(node.refused(&node.ws_url(&format!("token={crit}")), &[]).await, 401);
    node.stop().await;
}

/// An upgrade request with exactly these headers; returns the status line's code.
async fn upgrade_status(node: &TestNode, headers: &[(&str, &str)]) -> u16 {
    let token = node.token("1");
    let mut request = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(node.public).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn origins_and_websocket_keys_must_be_well_formed() {
    let node = TestNode::with(|s| s.auth.allowed_origins = vec!["https://app.example".into()]).await;
    let key = ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(upgrade_status(&node, &[key, ("Origin", "https://app.example")]).await, 101);
    assert_eq!(upgrade_status(&node, &[key, ("Origin", "https://evil.example")]).await, 403);
    assert_eq!(
        upgrade_status(&node, &[key, ("Origin", "https://app.example"), ("Origin", "https://app.example")]).await,
        403
    );
    assert_eq!(upgrade_status(&node, &[key, ("Origin", "app.example")]).await, 403);
    assert_eq!(upgrade_status(&node, &[key, ("Origin", "https://app.example/x")]).await, 403);
    for bad_key in ["short", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZXh4eA==", "!!!!!!!!!!!!!!!!!!!!!!=="] {
        assert_eq!(upgrade_status(&node, &[("Sec-WebSocket-Key", bad_key)]).await, 400, "{bad_key}");
    }
    assert_eq!(upgrade_status(&node, &[key, key]).await, 400, "two keys");
    node.stop().await;
}

// 8. The memory inbox answers like the Redis one (the comparison itself is in inbox.rs).

#[tokio::test]
async fn a_read_from_a_user_without_an_inbox_still_gets_its_unread_frame() {
    let node = TestNode::start().await;
    let mut client = node.connect("nobody-yet").await;
    client.send_json(json!({ "type": "read", "all": true })).await;
    assert_eq!(client.next_json().await, json!({ "type": "unread", "unread": 0 }));
    node.stop().await;
}
