//! The fleet of WebSocket clients: one task per connection, spread over source addresses and
//! nodes, each counting what it receives and timing it against the stamp in the payload.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::net::TcpSocket;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::report::{ChurnReport, ConnectReport, Latency};
use crate::{Format, RunArgs, Scenario};

/// The stamp every published message carries: sequence, send time (µs since the epoch) and
/// the target user's index (`u64::MAX` for broadcasts).
#[derive(Debug, Deserialize)]
pub struct Stamp {
    pub s: u64,
    pub t: u64,
    pub u: u64,
}

/// A JSON session's notification frame: the published payload is its `data`; a persisted
/// one carries its inbox id.
#[derive(Debug, Deserialize)]
struct Envelope {
    data: Stamp,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    persisted: bool,
}

/// A Pusher event frame: `data` is a string holding the stamp.
#[derive(Debug, Deserialize)]
struct PusherEvent {
    event: String,
    #[serde(default)]
    data: Option<String>,
}

/// The stamp of a Pusher event frame; `None` for other frames.
fn pusher_stamp(text: &str) -> Option<Stamp> {
    let frame: PusherEvent = serde_json::from_str(text).ok()?;
    if frame.event.starts_with("pusher") {
        return None;
    }
    serde_json::from_str(frame.data.as_deref()?).ok()
}

/// The user channel of user `lt<index>` (what `sendToUser` publishes on).
pub fn pusher_user_channel(index: usize) -> String {
    format!("{}lt{index}", pushnode::protocol::pusher::USER_CHANNEL_PREFIX)
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Delivery counters shared by all connections.
#[derive(Default)]
pub struct Stats {
    /// Only messages stamped at or after this time are counted (after warm-up).
    pub measure_from_us: AtomicU64,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub misrouted: AtomicU64,
    latency: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Option<Arc<Mutex<Histogram<u64>>>>> = const { std::cell::RefCell::new(None) };
}

impl Stats {
    /// Records a latency in the calling thread's histogram (uncontended), registered once.
    fn record(&self, micros: u64) {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let hist = local.get_or_insert_with(|| {
                let h = Arc::new(Mutex::new(histogram()));
                self.latency.lock().expect("poisoned").push(h.clone());
                h
            });
            let _ = hist.lock().expect("poisoned").record(micros.max(1));
        });
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut all = histogram();
        for h in self.latency.lock().expect("poisoned").iter() {
            let _ = all.add(&*h.lock().expect("poisoned"));
        }
        all
    }

    pub fn reset_latency(&self) {
        for h in self.latency.lock().expect("poisoned").iter() {
            h.lock().expect("poisoned").reset();
        }
    }
}

struct Conn {
    index: usize,
    connected: AtomicBool,
    stalled: AtomicBool,
    /// Wakes the connection to drop and reopen its socket (churn).
    reconnect: Notify,
    /// Added to the index to pick the node: a connection that cannot reach its node moves on
    /// to the next one, as behind a load balancer.
    target: AtomicUsize,
    /// Persisted notifications received: the stamp's sequence and how many copies arrived,
    /// and the newest inbox id, passed as `last_id` on reconnect (what `pushnode.js` does).
    persisted: Mutex<Persisted>,
}

#[derive(Default)]
pub struct Persisted {
    pub copies: std::collections::HashMap<u64, u32>,
    last_id: Option<(u64, u64)>,
}

/// An inbox id `<ms>-<seq>` as a comparable pair.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    args: RunArgs,
    conns: Vec<Arc<Conn>>,
    pub stats: Stats,
    closing: AtomicBool,
    close: Notify,
    connects_ok: AtomicUsize,
    connects_failed: AtomicUsize,
    attempts_done: AtomicUsize,
    attempt_done: Notify,
    handshake: Mutex<Histogram<u64>>,
    auth: Option<pushnode::auth::Authenticator>,
    targets: Vec<(SocketAddr, String)>,
}

impl Fleet {
    pub fn new(args: &RunArgs) -> anyhow::Result<Self> {
        let targets = args
            .urls
            .iter()
            .map(|url| {
                let rest = url.strip_prefix("ws://").context("only ws:// URLs")?;
                let (host, _) = rest.split_once('/').unwrap_or((rest, ""));
                let addr: SocketAddr = host.parse().with_context(|| format!("{host} is not ip:port"))?;
                Ok((addr, url.clone()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if targets.is_empty() || args.sources.is_empty() {
            bail!("need at least one --url and one --source");
        }
        let auth = args.jwt_secret.as_ref().map(|secret| {
            pushnode::auth::Authenticator::new(&pushnode::settings::Auth {
                jwt_secret: secret.clone(),
                ..Default::default()
            })
        });
        let conns = (0..args.connections)
            .map(|index| {
                Arc::new(Conn {
                    index,
                    connected: AtomicBool::new(false),
                    stalled: AtomicBool::new(false),
                    reconnect: Notify::new(),
                    target: AtomicUsize::new(0),
                    persisted: Mutex::new(Persisted::default()),
                })
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                args: args.clone(),
                conns,
                stats: Stats::default(),
                closing: AtomicBool::new(false),
                close: Notify::new(),
                connects_ok: AtomicUsize::new(0),
                connects_failed: AtomicUsize::new(0),
                attempts_done: AtomicUsize::new(0),
                attempt_done: Notify::new(),
                handshake: Mutex::new(histogram()),
                auth,
                targets,
            }),
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    pub fn len(&self) -> usize {
        self.inner.conns.len()
    }

    pub fn user_index(&self, i: usize) -> usize {
        self.inner.args.user_offset + i
    }

    pub fn connected(&self) -> usize {
        self.inner.conns.iter().filter(|c| c.connected.load(Ordering::Acquire)).count()
    }

    /// Indices of connections that are connected and reading.
    pub fn healthy(&self) -> Vec<usize> {
        self.inner
            .conns
            .iter()
            .filter(|c| c.connected.load(Ordering::Acquire) && !c.stalled.load(Ordering::Acquire))
            .map(|c| c.index)
            .collect()
    }

    /// Opens every connection, `concurrency` at a time, and waits for all attempts.
    pub async fn connect_all(&self, concurrency: usize) -> ConnectReport {
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let started = Instant::now();
        for conn in &self.inner.conns {
            tokio::spawn(self.clone().drive(conn.clone(), permits.clone()));
        }
        let total = self.inner.conns.len();
        loop {
            let notified = self.inner.attempt_done.notified();
            if self.inner.attempts_done.load(Ordering::Acquire) >= total {
                break;
            }
            notified.await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let ok = self.inner.connects_ok.load(Ordering::Acquire);
        let handshake = Latency::from(&*self.inner.handshake.lock().expect("poisoned"));
        ConnectReport {
            ok,
            failed: self.inner.connects_failed.load(Ordering::Acquire),
            seconds,
            per_second: ok as f64 / seconds.max(1e-9),
            handshake_us: handshake,
        }
    }

    /// Runs `f` on connection `i`'s persisted ledger.
    pub fn persisted<T>(&self, i: usize, f: impl FnOnce(&Persisted) -> T) -> T {
        f(&self.inner.conns[i].persisted.lock().expect("poisoned"))
    }

    /// Which node (index into the URLs) connection `i` uses now.
    pub fn node_of(&self, i: usize) -> usize {
        let conn = &self.inner.conns[i];
        (conn.index + conn.target.load(Ordering::Acquire)) % self.inner.targets.len()
    }

    /// Asks connection `i` to drop its socket and connect again (churn).
    pub fn reconnect(&self, i: usize) {
        self.inner.conns[i].reconnect.notify_one();
    }

    fn url(&self, conn: &Conn) -> (SocketAddr, String) {
        let (addr, base) = &self.inner.targets[self.node_of(conn.index)];
        if self.inner.args.format == Format::Pusher {
            let key = &self.inner.args.pusher_key;
            return (*addr, format!("ws://{addr}/app/{key}?protocol=7&client=js&version=8.6.0"));
        }
        let user = format!("lt{}", self.user_index(conn.index));
        let auth = match &self.inner.auth {
            Some(auth) => {
                let token = auth.issue(&user, Duration::from_secs(3 * 3600), vec!["all".into()]).expect("token");
                format!("token={token}")
            }
            None => format!("uid={user}"),
        };
        let format = match self.inner.args.format {
            Format::Raw => "raw",
            Format::Json | Format::Pusher => "json",
        };
        let resume = match conn.persisted.lock().expect("poisoned").last_id {
            Some((ms, seq)) => format!("&last_id={ms}-{seq}"),
            None => String::new(),
        };
        (*addr, format!("{base}?{auth}&format={format}{resume}"))
    }

    async fn open(&self, conn: &Conn) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
        let (addr, url) = self.url(conn);
        let source: IpAddr = self.inner.args.sources[conn.index % self.inner.args.sources.len()];
        let socket = TcpSocket::new_v4()?;
        // Earlier runs leave source ports in TIME_WAIT; let new connections reuse them.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(source, 0))?;
        let started = Instant::now();
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        // Small buffers: the generator holds as many connections as the node.
        let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        if self.inner.args.format == Format::Json {
            // Open means welcomed: the node has confirmed the Redis subscription by then.
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) if t.contains(r#""type":"welcome""#) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("closed before the welcome"),
                }
            }
        }
        if self.inner.args.format == Format::Pusher {
            self.pusher_start(conn, &mut ws).await?;
            let _ = self.inner.handshake.lock().expect("poisoned").record(started.elapsed().as_micros().max(1) as u64);
            return Ok(ws);
        }
        let _ = self.inner.handshake.lock().expect("poisoned").record(started.elapsed().as_micros().max(1) as u64);
        if self.inner.args.scenario == Scenario::Broadcast {
            ws.send(Message::text(r#"{"type":"subscribe","channel":"all"}"#)).await?;
            // Wait for the confirmation so that the broadcast starts with everyone subscribed.
            while let Some(frame) = ws.next().await {
                if let Message::Text(t) = frame?
                    && t.contains("subscribed")
                {
                    break;
                }
            }
        }
        Ok(ws)
    }

    /// A Pusher connection's start: the socket id, then a signin as the connection's user (its
    /// `sendToUser` channel), or the public channel `all` for broadcasts; open once confirmed.
    async fn pusher_start(
        &self,
        conn: &Conn,
        ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    ) -> anyhow::Result<()> {
        use pushnode::protocol::pusher::{sign, signin_message};
        let socket_id = loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("pusher:connection_established") => {
                    let frame: PusherEvent = serde_json::from_str(&t)?;
                    let data: serde_json::Value = serde_json::from_str(frame.data.as_deref().unwrap_or("{}"))?;
                    break data["socket_id"].as_str().context("no socket_id")?.to_owned();
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before connection_established"),
            }
        };
        let (request, confirmation) = if self.inner.args.scenario == Scenario::Broadcast {
            (serde_json::json!({"event": "pusher:subscribe", "data": {"channel": "all"}}), "subscription_succeeded")
        } else {
            let args = &self.inner.args;
            let user_data = serde_json::json!({ "id": format!("lt{}", self.user_index(conn.index)) }).to_string();
            let auth =
                format!("{}:{}", args.pusher_key, sign(&args.pusher_secret, &signin_message(&socket_id, &user_data)));
            (
                serde_json::json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}),
                "pusher:signin_success",
            )
        };
        ws.send(Message::text(request.to_string())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains(confirmation) => return Ok(()),
                Some(Ok(Message::Text(t))) if t.contains("pusher:error") => bail!("refused: {t}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed before {confirmation}"),
            }
        }
    }

    /// One connection's life: connect, read until told otherwise, reconnect on churn. A failed
    /// connect is retried on another node after a jittered delay growing from 100 ms to 2 s.
    async fn drive(self, conn: Arc<Conn>, permits: Arc<Semaphore>) {
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let ws = {
                let _permit = permits.acquire().await.expect("semaphore");
                self.open(&conn).await
            };
            if first {
                match &ws {
                    Ok(_) => self.inner.connects_ok.fetch_add(1, Ordering::AcqRel),
                    Err(_) => self.inner.connects_failed.fetch_add(1, Ordering::AcqRel),
                };
                self.inner.attempts_done.fetch_add(1, Ordering::AcqRel);
                self.inner.attempt_done.notify_waiters();
                first = false;
            }
            let Ok(mut ws) = ws else {
                if self.inner.args.scenario == Scenario::Storm || self.inner.closing.load(Ordering::Acquire) {
                    return;
                }
                // Another node, at random (as a load balancer spreads them), not always the next.
                let others = self.inner.targets.len().saturating_sub(1).max(1);
                conn.target.fetch_add(1 + fastrand::usize(..others), Ordering::AcqRel);
                let cap = (100u64 << failures.min(5)).min(2000);
                failures += 1;
                tokio::time::sleep(Duration::from_millis(fastrand::u64(cap / 2..=cap))).await;
                continue;
            };
            failures = 0;
            conn.connected.store(true, Ordering::Release);
            let reopen = self.read(&conn, &mut ws).await;
            conn.connected.store(false, Ordering::Release);
            if !reopen {
                let _ = ws.close(None).await;
                return;
            }
            drop(ws);
        }
    }

    /// Reads frames until the fleet closes (false) or churn asks for a reconnect (true).
    ///
    /// The two wake-ups are registered once per connection, not once per frame: all
    /// connections share `close`, and re-registering on it for every frame would serialise
    /// the generator's threads on that one waiter list.
    async fn read(&self, conn: &Conn, ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> bool {
        let me = self.user_index(conn.index) as u64;
        let mut last = 0u64;
        let mut closed = std::pin::pin!(self.inner.close.notified());
        closed.as_mut().enable();
        let mut reopen = std::pin::pin!(conn.reconnect.notified());
        loop {
            if self.inner.closing.load(Ordering::Acquire) {
                return false;
            }
            if conn.stalled.load(Ordering::Acquire) {
                // Stop reading, keep the socket: the node must deal with it.
                tokio::select! {
                    () = closed.as_mut() => return false,
                    () = reopen.as_mut() => return true,
                }
            }
            let frame = tokio::select! {
                biased;
                frame = ws.next() => frame,
                () = closed.as_mut() => return false,
                () = reopen.as_mut() => return true,
            };
            let Some(Ok(frame)) = frame else {
                return !self.inner.closing.load(Ordering::Acquire);
            };
            let Message::Text(text) = frame else { continue };
            let stamp = match self.inner.args.format {
                Format::Raw => serde_json::from_str::<Stamp>(&text).ok(),
                Format::Json => match serde_json::from_str::<Envelope>(&text) {
                    // Persisted notifications (live or replayed) go to the connection's ledger,
                    // not to the live figures.
                    Ok(Envelope { data, id: Some(id), persisted: true }) => {
                        let mut ledger = conn.persisted.lock().expect("poisoned");
                        *ledger.copies.entry(data.s).or_default() += 1;
                        ledger.last_id = ledger.last_id.max(parse_id(&id));
                        continue;
                    }
                    Ok(e) => Some(e.data),
                    Err(_) => None,
                },
                Format::Pusher => {
                    // The node's heartbeat: answer as pusher-js does.
                    if text.contains(r#""event":"pusher:ping""#) {
                        let _ = ws.send(Message::text(r#"{"event":"pusher:pong","data":{}}"#)).await;
                        continue;
                    }
                    pusher_stamp(&text)
                }
            };
            let Some(stamp) = stamp else { continue };
            let stats = &self.inner.stats;
            if stamp.t < stats.measure_from_us.load(Ordering::Relaxed) {
                last = last.max(stamp.s);
                continue;
            }
            if stamp.u != u64::MAX && stamp.u != me {
                stats.misrouted.fetch_add(1, Ordering::Relaxed);
            }
            if stamp.s <= last && last != 0 {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            last = stamp.s;
            stats.received.fetch_add(1, Ordering::Relaxed);
            stats.record(now_us().saturating_sub(stamp.t));
        }
    }

    /// Makes a share of the connections stop reading.
    pub fn stall(&self, fraction: f64) {
        let count = (self.inner.conns.len() as f64 * fraction).round() as usize;
        let step = (self.inner.conns.len() / count.max(1)).max(1);
        for conn in self.inner.conns.iter().step_by(step).take(count) {
            conn.stalled.store(true, Ordering::Release);
        }
    }

    /// Closes and reopens `per_second` random connections every second for `duration`.
    pub async fn churn(&self, per_second: usize, duration: Duration) -> ChurnReport {
        self.inner.handshake.lock().expect("poisoned").reset();
        let started = Instant::now();
        let mut asked = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while started.elapsed() < duration {
            tick.tick().await;
            for _ in 0..per_second / 10 {
                let conn = &self.inner.conns[fastrand::usize(..self.inner.conns.len())];
                conn.reconnect.notify_one();
                asked += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let handshake = self.inner.handshake.lock().expect("poisoned");
        ChurnReport {
            reconnects_asked: asked,
            reconnects_done: handshake.len() as usize,
            per_second: handshake.len() as f64 / duration.as_secs_f64(),
            handshake_us: Latency::from(&*handshake),
            connected_at_end: self.connected(),
        }
    }

    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.close.notify_waiters();
    }
}
