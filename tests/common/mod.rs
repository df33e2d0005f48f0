//! Test harness: a real node in-process on 127.0.0.1:0, real WebSocket and HTTP clients.
#![allow(dead_code, clippy::unwrap_used)]

pub mod proxy;
pub mod pusher;
pub mod redis;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pushnode::auth::Authenticator;
use pushnode::{Listeners, Settings};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const API_KEY: &str = "test-api-key-0123456789";
/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestNode {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub settings: Settings,
    pub auth: Authenticator,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

pub fn settings() -> Settings {
    let mut s = Settings::default();
    s.server.public_addr = "127.0.0.1:0".parse().unwrap();
    s.server.internal_addr = "127.0.0.1:0".parse().unwrap();
    s.server.drain_period = Duration::from_millis(200);
    s.server.shutdown_grace = Duration::from_secs(2);
    s.server.reconnect_jitter = Duration::from_millis(100);
    s.auth.jwt_secret = SECRET.into();
    s.auth.api_keys = vec![API_KEY.into()];
    s.demo.enabled = false;
    s
}

/// Waits until `check` holds, polling every 20 ms without blocking the runtime.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Settings for a node on a real Redis, with short timers so faults show quickly.
pub fn on_redis(s: &mut Settings, url: &str) {
    s.broker.kind = pushnode::settings::BrokerKind::Redis;
    s.broker.redis_url = url.to_owned();
    fast_broker(s);
}

pub fn on_cluster(s: &mut Settings, nodes: &[String]) {
    s.broker.kind = pushnode::settings::BrokerKind::RedisCluster;
    s.broker.cluster_nodes = nodes.to_vec();
    fast_broker(s);
}

/// Subscriber connections of a test node on Redis (per shard in cluster mode): more than one,
/// so every Redis test runs with the node's channels spread over lanes.
pub const LANES: usize = 2;

/// Short broker timers, so faults show within a test's patience, but not so short that a busy
/// 2-core machine trips them on its own: a probe or command is late by a second there at times.
/// Readiness fails at once when the broker does (`unready_after` 0); the grace has its own test.
/// [`LANES`] subscriber connections.
fn fast_broker(s: &mut Settings) {
    s.broker.subscriber_connections = LANES;
    s.broker.unsubscribe_delay = Duration::from_millis(100);
    s.broker.probe_interval = Duration::from_millis(200);
    s.broker.probe_timeout = Duration::from_secs(2);
    s.broker.reconnect_min = Duration::from_millis(20);
    s.broker.reconnect_max = Duration::from_millis(400);
    s.broker.connect_timeout = Duration::from_millis(500);
    s.broker.command_timeout = Duration::from_secs(2);
    s.broker.unready_after = Duration::ZERO;
}

/// Runs `node <script> <args...>` (with `CHROMIUM` set when given) to its end, off the
/// runtime's threads, and fails the test with its output unless it exits successfully.
pub async fn run_node_script(script: std::path::PathBuf, args: Vec<String>, chromium: Option<String>) {
    let name = script.display().to_string();
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new("node");
        command.arg(&script).args(&args);
        if let Some(chromium) = chromium {
            command.env("CHROMIUM", chromium);
        }
        command.output()
    })
    .await
    .unwrap()
    .expect("cannot run node");
    assert!(
        output.status.success(),
        "{name} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The ids of the subscriber (pub/sub) connections `CLIENT LIST` shows on `redis`.
pub fn subscriber_ids(redis: &redis::RedisServer) -> Vec<String> {
    let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]).unwrap();
    list.lines().filter_map(|l| l.split(' ').next()).map(str::to_owned).collect()
}

impl TestNode {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(change: impl FnOnce(&mut Settings)) -> Self {
        // PUSHNODE_TEST_LOG=debug shows the nodes' logs when chasing a failure.
        if let Ok(filter) = std::env::var("PUSHNODE_TEST_LOG") {
            pushnode::logging::init(&pushnode::settings::Log { format: pushnode::settings::LogFormat::Text, filter });
        }
        let mut settings = settings();
        change(&mut settings);
        settings.validate().unwrap();
        Self::launch(settings)
    }

    /// A node on settings that skip validation (the library entry point takes them as given):
    /// for the defences that stand behind validation.
    pub async fn unvalidated(change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = settings();
        change(&mut settings);
        Self::launch(settings)
    }

    fn launch(settings: Settings) -> Self {
        let listeners = Listeners::bind(&settings).unwrap();
        let public = listeners.public_addr().unwrap();
        let internal = listeners.internal_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let settings = settings.clone();
            let shutdown = shutdown.clone();
            async move { pushnode::run(listeners, settings, shutdown).await.unwrap() }
        });
        let auth = Authenticator::new(&settings.auth);
        Self { public, internal, settings, auth, shutdown, task: Some(task), http: reqwest::Client::new() }
    }

    /// A node on a real Redis (short broker timers), once it is ready.
    pub async fn on(redis: &redis::RedisServer) -> Self {
        let node = Self::with(|s| on_redis(s, &redis.url())).await;
        node.wait_ready(200).await;
        node
    }

    pub fn token(&self, user: &str) -> String {
        self.auth.issue(user, Duration::from_secs(300), vec![]).unwrap()
    }

    pub fn token_with(&self, user: &str, channels: &[&str]) -> String {
        self.auth.issue(user, Duration::from_secs(300), channels.iter().map(|c| c.to_string()).collect()).unwrap()
    }

    /// The broker channel of `user`'s notifications on this node.
    pub fn names_user(&self, user: &str) -> String {
        let broker = &self.settings.broker;
        let cluster = broker.kind == pushnode::settings::BrokerKind::RedisCluster;
        pushnode::channel::ChannelNames::new(&broker.user_channel, &broker.topic_channel, cluster)
            .user(user)
            .to_string()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.public)
    }

    /// Connects as `user` with a fresh token and reads the welcome frame.
    pub async fn connect(&self, user: &str) -> Client {
        let mut client = Client::connect(&self.ws_url(&format!("token={}", self.token(user)))).await.unwrap();
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        assert_eq!(welcome["user"], user);
        client
    }

    /// Status code of an upgrade attempt that is expected to be refused.
    pub async fn refused(&self, url: &str, headers: &[(&str, &str)]) -> u16 {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            request.headers_mut().insert(name, HeaderValue::from_str(value).unwrap());
        }
        match tokio_tungstenite::connect_async(request).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("upgrade of {url} was accepted"),
        }
    }

    pub async fn publish(&self, body: Value) -> (u16, Value) {
        self.post("/api/publish", Some(API_KEY), body.to_string()).await
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: String) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("http://{}{path}", self.internal))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Waits until `/readyz` answers `status` (polling every 10 ms, bounded by [`WAIT`]).
    pub async fn wait_ready(&self, status: u16) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (now, body) = self.get("/readyz").await;
            if now == status {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "/readyz stayed {now}: {body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `GET` on the internal listener with the API key, answered with JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response =
            self.http.get(format!("http://{}{path}", self.internal)).bearer_auth(API_KEY).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("http://{}{path}", self.internal)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Starts the shutdown sequence without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("node did not stop in time").unwrap();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until the peer closes `stream` (end of stream or reset); returns when it did.
pub async fn closed_by_peer(mut stream: TcpStream) -> std::time::Instant {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await.expect("socket still open") {
            Ok(0) | Err(_) => return std::time::Instant::now(),
            Ok(_) => {}
        }
    }
}

/// A WebSocket client (tokio-tungstenite).
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { ws })
    }

    /// Next frame of any kind, within [`WAIT`].
    async fn next_frame(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("read error")
    }

    /// Next data frame (text or binary), skipping pings and pongs.
    pub async fn next_message(&mut self) -> Message {
        loop {
            match self.next_frame().await {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return other,
            }
        }
    }

    /// Round trip with the node's session task: a WebSocket ping and its pong. The session
    /// registers with the hub before it first runs, so after this a publish reaches it (a raw
    /// session has no welcome frame to wait for). Expects no data frame meanwhile.
    pub async fn sync(&mut self) {
        self.ws.send(Message::Ping(b"sync".to_vec().into())).await.unwrap();
        loop {
            match self.next_frame().await {
                Message::Pong(payload) if &payload[..] == b"sync" => return,
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected the pong, got {other:?}"),
            }
        }
    }

    pub async fn next_text(&mut self) -> String {
        match self.next_message().await {
            Message::Text(text) => text.to_string(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    pub async fn next_json(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).unwrap()
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws.send(Message::binary(bytes.to_vec())).await.unwrap();
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Reads until the close frame and returns its code, skipping other frames.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await.expect("timed out waiting for close") {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return 1005,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("read error before close frame: {e}"),
                None => panic!("stream ended without close frame"),
            }
        }
    }

    /// Asserts that no data frame arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }
}

/// A bare TCP client that speaks just enough WebSocket to misbehave: it never answers pings,
/// can send unmasked or raw frames, and can stop reading.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Self {
        Self::connect_with(TcpStream::connect(addr).await.unwrap(), addr, path_and_query).await
    }

    /// Connects with a small kernel receive buffer, so that a client that stops reading
    /// backs up into the node quickly.
    pub async fn connect_small(addr: SocketAddr, path_and_query: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        Self::connect_with(stream, addr, path_and_query).await
    }

    async fn connect_with(mut stream: TcpStream, addr: SocketAddr, path_and_query: &str) -> Self {
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = Self { stream, buffer: Vec::new() };
        let head = client.read_until_blank_line().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client
    }

    async fn read_until_blank_line(&mut self) -> String {
        loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..end]).to_string();
                self.buffer.drain(..end + 4);
                return head;
            }
            self.fill().await;
        }
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await.expect("raw read timed out").unwrap();
        self.buffer.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one server frame: (opcode, payload). `None` at end of stream.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, header, len)) = parse_header(&self.buffer)
                && self.buffer.len() >= header + len
            {
                let payload = self.buffer[header..header + len].to_vec();
                self.buffer.drain(..header + len);
                return Some((opcode, payload));
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads frames until a close frame and returns its code.
    pub async fn close_code(&mut self) -> u16 {
        while let Some((opcode, payload)) = self.read_frame().await {
            if opcode == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
        panic!("stream ended without close frame");
    }

    /// Writes bytes as they are (hand-built frames).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends a frame; `masked` false breaks RFC 6455 on purpose.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= 0xffff => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [1u8, 2, 3, 4];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.stream.write_all(&frame).await.unwrap();
    }
}

fn parse_header(buf: &[u8]) -> Option<(u8, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    match buf[1] & 0x7f {
        126 if buf.len() >= 4 => Some((opcode, 4, u16::from_be_bytes([buf[2], buf[3]]) as usize)),
        127 if buf.len() >= 10 => Some((opcode, 10, u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize)),
        126 | 127 => None,
        n => Some((opcode, 2, n as usize)),
    }
}

/// Value of an unlabelled or labelled sample in Prometheus text output (0 if absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}
