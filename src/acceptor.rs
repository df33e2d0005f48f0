//! `Acceptor`: the accept loop of one HTTP listener, which no client can exhaust without
//! credentials.
//!
//! Each accepted connection takes a place in a bounded pool until it leaves or becomes a
//! WebSocket session (sessions are counted by the node's admission instead). Bounds, in order:
//! - a connection must send its first request head within `server.header_timeout`, and a
//!   kept-alive one is closed after `server.keepalive_timeout` without a request (hyper's own
//!   timer, which also bounds every later request head); request heads are at most
//!   [`MAX_HEAD_BYTES`];
//! - when the pool is full, the oldest connection that is waiting for a request (not serving
//!   one) and has been open for at least [`EVICT_MIN_AGE`] is closed to make room; if there is
//!   none, accepting pauses (the kernel's backlog holds newcomers) until a place frees. Silent
//!   sockets therefore cost a bounded number of descriptors and cannot lock clients out, while
//!   a burst of real clients, each answered within milliseconds, is not evicted;
//! - `accept` failing for lack of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`) backs off from 10 ms to 1 s instead of spinning, and is counted.
//!
//! The routes are axum's; this module only owns connections. axum's `serve` has none of these
//! bounds, and its graceful shutdown does not cover upgraded WebSockets anyway (sessions run on
//! the node's task tracker, see `gateway`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::metrics as m;

/// Largest request head (request line and headers) kept in memory: hyper's read buffer limit.
/// Bounds a pool of silent or slow connections at `pool size * MAX_HEAD_BYTES`; a longer head
/// gets 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A connection younger than this is never evicted: a real client sends its request within
/// milliseconds of connecting, so eviction only ever hits sockets that hold a place unused.
pub const EVICT_MIN_AGE: Duration = Duration::from_millis(250);
/// Backoff bounds after `accept` fails for lack of resources.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How one listener treats its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `public` or `internal`: the metrics label.
    pub name: &'static str,
    /// Connections held at once (not counting those that became WebSocket sessions).
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// Accepts connections on `listener` and serves `router` on them until `stop`; then asks every
/// connection to finish its request and waits for them. Bound the wait from outside.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let pool =
        Arc::new(Pool::new(limits.max_connections, metrics::gauge!(m::HTTP_CONNECTIONS, "listener" => limits.name)));
    let connections = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let Some(permit) = make_room(&pool, limits.name, &stop).await else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let place = pool.enter(permit);
                connections.spawn(connection(stream, router.clone(), limits, place, stop.clone()));
            }
            Err(e) => {
                let exhausted =
                    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM));
                let reason = if exhausted { "resources" } else { "other" };
                metrics::counter!(m::ACCEPT_ERRORS, "listener" => limits.name, "reason" => reason).increment(1);
                if exhausted {
                    warn!(listener = limits.name, error = %e, pause = ?backoff, "accept failed: out of descriptors or memory");
                    tokio::select! {
                        () = sleep(backoff) => {}
                        () = stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                } else {
                    // A connection reset before it was accepted, and the like: the next one is fine.
                    debug!(listener = limits.name, error = %e, "accept failed");
                }
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Waits for a free place in the pool, evicting the oldest idle connection if the pool is full.
/// `None` once `stop` is cancelled.
async fn make_room(pool: &Arc<Pool>, name: &'static str, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(permit) = pool.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        // Full. Evict the oldest idle connection if it is old enough, else wait for it to be.
        let retry_at = match pool.evict_oldest_idle() {
            Eviction::Evicted => {
                metrics::counter!(m::HTTP_CONNECTIONS_DROPPED, "listener" => name, "reason" => "evicted").increment(1);
                None
            }
            Eviction::TooYoung(at) => Some(at),
            Eviction::NoneIdle => None,
        };
        tokio::select! {
            permit = pool.permits.clone().acquire_owned() => return permit.ok(),
            () = async { if let Some(at) = retry_at { sleep_until(at).await } else { std::future::pending().await } } => {}
            () = stop.cancelled() => return None,
        }
    }
}

/// Serves one connection until it ends, becomes a WebSocket session, misses a deadline, is
/// evicted, or (after `stop`) finishes its request in flight.
async fn connection(stream: TcpStream, router: Router, limits: Limits, place: Place, stop: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let state = place.state.clone();
    let service = Tracked { inner: TowerToHyperService::new(router), state: state.clone() };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper starts this timer whenever it waits for a request head: at the start (where the
        // shorter header deadline below applies too) and between kept-alive requests.
        .header_read_timeout(limits.keepalive_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let first_head = sleep(limits.header_timeout);
    let mut first_head = std::pin::pin!(first_head);
    let mut first_head_due = true;
    let mut stopping = false;
    let dropped = |reason: &'static str| {
        metrics::counter!(m::HTTP_CONNECTIONS_DROPPED, "listener" => limits.name, "reason" => reason).increment(1);
    };
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                match result {
                    Err(e) if e.is_timeout() => dropped("header_timeout"),
                    Err(e) => debug!(listener = limits.name, error = %e, "connection ended with an error"),
                    Ok(()) => {}
                }
                return;
            }
            () = first_head.as_mut(), if first_head_due => {
                if !state.seen.load(Ordering::Acquire) {
                    dropped("header_timeout");
                    return;
                }
                first_head_due = false;
            }
            () = state.evict.cancelled() => return,
            () = stop.cancelled(), if !stopping => {
                // Finish the request in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

/// One connection's place in the pool: its permit and its entry, released on drop.
struct Place {
    pool: Arc<Pool>,
    id: u64,
    state: Arc<ConnState>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.pool.leave(self.id);
    }
}

/// What the pool and the connection's service share about one connection.
#[derive(Debug, Default)]
struct ConnState {
    /// A request head arrived (the first-head deadline no longer applies).
    seen: AtomicBool,
    /// A request is being served: such a connection is not evicted.
    busy: AtomicBool,
    /// Cancelled to evict the connection.
    evict: CancellationToken,
}

/// The connections of one listener, oldest first.
struct Pool {
    permits: Arc<Semaphore>,
    entries: Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
    /// Connections open in the pool.
    gauge: metrics::Gauge,
}

struct Entry {
    id: u64,
    opened: Instant,
    state: Arc<ConnState>,
}

enum Eviction {
    Evicted,
    /// The oldest idle connection may be evicted at this instant.
    TooYoung(Instant),
    /// Every connection is serving a request.
    NoneIdle,
}

impl Pool {
    fn new(max: usize, gauge: metrics::Gauge) -> Self {
        gauge.set(0.0);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            entries: Mutex::new(VecDeque::with_capacity(max.min(1024))),
            next_id: AtomicU64::new(0),
            gauge,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        // The critical sections cannot panic half-way; a poisoned lock still holds a valid list.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enter(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Place {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        let mut entries = self.entries();
        entries.push_back(Entry { id, opened: Instant::now(), state: state.clone() });
        self.record(entries.len());
        drop(entries);
        Place { pool: self.clone(), id, state, _permit: permit }
    }

    fn leave(&self, id: u64) {
        let mut entries = self.entries();
        // Connections mostly leave in the order they came: the search is short.
        if let Some(i) = entries.iter().position(|e| e.id == id) {
            entries.remove(i);
        }
        self.record(entries.len());
    }

    fn evict_oldest_idle(&self) -> Eviction {
        let mut entries = self.entries();
        let Some(i) = entries.iter().position(|e| !e.state.busy.load(Ordering::Acquire)) else {
            return Eviction::NoneIdle;
        };
        let evict_at = entries[i].opened + EVICT_MIN_AGE;
        if Instant::now() < evict_at {
            return Eviction::TooYoung(evict_at);
        }
        // Out of the list at once, so the next eviction picks another; its permit comes back
        // when its task has let the socket go.
        if let Some(entry) = entries.remove(i) {
            entry.state.evict.cancel();
        }
        self.record(entries.len());
        Eviction::Evicted
    }

    fn record(&self, open: usize) {
        self.gauge.set(open as f64);
    }
}

/// The router as a hyper service, telling the pool when a request is being served.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    state: Arc<ConnState>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.state.seen.store(true, Ordering::Release);
        self.state.busy.store(true, Ordering::Release);
        let response = self.inner.call(request.map(Body::new));
        let state = self.state.clone();
        Box::pin(async move {
            let response = response.await;
            state.busy.store(false, Ordering::Release);
            response
        })
    }
}
