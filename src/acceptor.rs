//! `Acceptor`: the accept loop of one HTTP listener, which no client can exhaust without
//! credentials.
//!
//! Each accepted connection takes a place in a bounded pool until it leaves or becomes a
//! WebSocket session (sessions are counted by the node's admission instead). Bounds, in order:
//! - a connection must send its first request head within `server.header_timeout`, and a
//!   kept-alive one is closed after `server.keepalive_timeout` without a request (hyper's own
//!   timer, which also bounds every later request head); request heads are at most
//!   [`MAX_HEAD_BYTES`];
//! - when the pool is full, the connection that has been *idle* longest, if for at least
//!   [`EVICT_MIN_AGE`], is closed to make room; if there is none, accepting pauses (the kernel's
//!   backlog holds newcomers) until a place frees or one has been idle long enough. Idle means:
//!   the node has read from it and is waiting for the client (no request head yet, or between
//!   kept-alive requests), not serving a request. A connection not yet read from is never
//!   idle: in a connect storm the node may take a while to get to each one, but a real client
//!   has sent its request by then, so it is served, not evicted. Silent and slow sockets
//!   therefore cost a bounded number of descriptors and cannot lock clients out;
//! - `accept` failing for lack of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`,
//!   `ENOMEM`) backs off from 10 ms to 1 s instead of spinning, and is counted.
//!
//! The routes are axum's; this module only owns connections. axum's `serve` has none of these
//! bounds, and its graceful shutdown does not cover upgraded WebSockets anyway (sessions run on
//! the node's task tracker, see `gateway`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
/// A connection must have been idle this long before it may be evicted. Well past the time a
/// real client takes to send its request once connected, even a CPU-starved one: a load
/// generator opening 19,000 connections at once on the node's own two cores lost 700 to 900
/// of them to eviction at 250 ms; at 2 s, none. A naive flood of silent sockets then delays a
/// real client by about this much.
pub const EVICT_MIN_AGE: Duration = Duration::from_secs(2);
/// While the pool is full and no connection is idle enough to evict, look again this often:
/// connections the node has not read from yet may turn idle meanwhile.
const EVICT_RECHECK: Duration = Duration::from_millis(100);
/// Backoff bounds after `accept` fails for lack of resources.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How one listener treats its connections.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `public` or `internal`: the metrics label.
    pub name: &'static str,
    /// Connections held at once (not counting those that became WebSocket sessions).
    pub max_connections: usize,
    /// Descriptors shared with the sessions, if any: this listener's connections plus the
    /// sessions never exceed it.
    pub shared: Option<Shared>,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// A descriptor budget shared with the node's sessions.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Sessions admitted now.
    pub sessions: Arc<AtomicUsize>,
    /// Sessions plus connections, at most.
    pub total: usize,
}

/// Accepts connections on `listener` and serves `router` on them until `stop`; then asks every
/// connection to finish its request and waits for them. Bound the wait from outside.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let pool =
        Arc::new(Pool::new(limits.max_connections, metrics::gauge!(m::HTTP_CONNECTIONS, "listener" => limits.name)));
    let connections = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let Some(permit) = make_room(&pool, &limits, &stop).await else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let place = pool.enter(permit);
                connections.spawn(connection(stream, router.clone(), limits.clone(), place, stop.clone()));
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

/// Waits for a free place in the pool, evicting the connection idle longest if the pool (or
/// the budget it shares with the sessions) is full. `None` once `stop` is cancelled.
async fn make_room(pool: &Arc<Pool>, limits: &Limits, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    loop {
        let shared_room = limits
            .shared
            .as_ref()
            .is_none_or(|shared| shared.sessions.load(Ordering::Acquire) + pool.len() < shared.total);
        if shared_room && let Ok(permit) = pool.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        // Full. Evict the connection idle longest if it has been idle long enough, else wait.
        let retry_at = match pool.evict_oldest_idle() {
            Eviction::Evicted => {
                metrics::counter!(m::HTTP_CONNECTIONS_DROPPED, "listener" => limits.name, "reason" => "evicted")
                    .increment(1);
                // Its place comes back when its task has let the socket go.
                Instant::now() + Duration::from_millis(1)
            }
            Eviction::NotYet(at) => at,
        };
        tokio::select! {
            // A place freed in the pool (the shared budget is looked at again above).
            permit = pool.permits.clone().acquire_owned(), if shared_room => return permit.ok(),
            () = sleep_until(retry_at) => {}
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
    let io = Watched { stream, first_read: Some(state.clone()) };
    let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
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

/// What the pool, the connection's socket and its service share about one connection.
#[derive(Debug)]
struct ConnState {
    /// When the connection last became idle, in microseconds since the pool's epoch; [`BUSY`]
    /// while it has not been read from yet or is serving a request.
    idle_since: AtomicU64,
    /// A request head arrived (the first-head deadline no longer applies).
    seen: AtomicBool,
    /// Cancelled to evict the connection.
    evict: CancellationToken,
    epoch: Instant,
}

/// `idle_since` of a connection that is not idle.
const BUSY: u64 = u64::MAX;

impl ConnState {
    fn new(epoch: Instant) -> Self {
        Self { idle_since: AtomicU64::new(BUSY), seen: AtomicBool::new(false), evict: CancellationToken::new(), epoch }
    }

    fn set_idle(&self) {
        let now = Instant::now().saturating_duration_since(self.epoch).as_micros() as u64;
        self.idle_since.store(now, Ordering::Release);
    }

    fn set_busy(&self) {
        self.idle_since.store(BUSY, Ordering::Release);
    }

    /// When this connection may be evicted, if it is idle.
    fn evictable_at(&self) -> Option<Instant> {
        match self.idle_since.load(Ordering::Acquire) {
            BUSY => None,
            since => Some(self.epoch + Duration::from_micros(since) + EVICT_MIN_AGE),
        }
    }
}

/// The socket as hyper reads it: the first read marks the connection idle (from then on the
/// node waits for the client). The mark is given up after that, so an upgraded WebSocket
/// keeps no reference to the pool.
#[derive(Debug)]
pub struct Watched {
    stream: TcpStream,
    first_read: Option<Arc<ConnState>>,
}

impl Watched {
    /// The socket, once the connection is upgraded and leaves the HTTP server.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(state) = self.first_read.take() {
            // Before the read: if the head is already there, the service call that follows in
            // this same poll marks it busy again.
            state.set_idle();
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections of one listener, oldest first.
struct Pool {
    permits: Arc<Semaphore>,
    /// Time base of [`ConnState::idle_since`].
    epoch: Instant,
    entries: parking_lot::Mutex<VecDeque<Entry>>,
    next_id: AtomicU64,
    /// Connections open in the pool.
    gauge: metrics::Gauge,
}

struct Entry {
    id: u64,
    state: Arc<ConnState>,
}

enum Eviction {
    Evicted,
    /// Nobody may be evicted yet; look again at this instant.
    NotYet(Instant),
}

impl Pool {
    fn new(max: usize, gauge: metrics::Gauge) -> Self {
        gauge.set(0.0);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            epoch: Instant::now(),
            entries: parking_lot::Mutex::new(VecDeque::with_capacity(max.min(1024))),
            next_id: AtomicU64::new(0),
            gauge,
        }
    }

    fn entries(&self) -> parking_lot::MutexGuard<'_, VecDeque<Entry>> {
        self.entries.lock()
    }

    fn enter(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Place {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(self.epoch));
        let mut entries = self.entries();
        entries.push_back(Entry { id, state: state.clone() });
        self.record(entries.len());
        drop(entries);
        Place { pool: self.clone(), id, state, _permit: permit }
    }

    fn len(&self) -> usize {
        self.entries().len()
    }

    fn leave(&self, id: u64) {
        let mut entries = self.entries();
        // Connections mostly leave in the order they came: the search is short.
        if let Some(i) = entries.iter().position(|e| e.id == id) {
            entries.remove(i);
        }
        self.record(entries.len());
    }

    /// Evicts the connection that has been idle longest, if that is at least [`EVICT_MIN_AGE`].
    fn evict_oldest_idle(&self) -> Eviction {
        let now = Instant::now();
        let mut entries = self.entries();
        // The earliest instant at which some connection becomes evictable, and which one.
        let longest =
            entries.iter().enumerate().filter_map(|(i, entry)| entry.state.evictable_at().map(|at| (at, i))).min();
        match longest {
            Some((at, i)) if at <= now => {
                // Out of the list at once, so the next eviction picks another; its permit
                // comes back when its task has let the socket go.
                if let Some(entry) = entries.remove(i) {
                    entry.state.evict.cancel();
                }
                self.record(entries.len());
                Eviction::Evicted
            }
            Some((at, _)) => Eviction::NotYet(at.min(now + EVICT_RECHECK)),
            None => Eviction::NotYet(now + EVICT_RECHECK),
        }
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
        self.state.set_busy();
        let response = self.inner.call(request.map(Body::new));
        let state = self.state.clone();
        Box::pin(async move {
            let response = response.await;
            // Waiting for the client again (the next request of a kept-alive connection).
            state.set_idle();
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max: usize) -> Arc<Pool> {
        Arc::new(Pool::new(max, metrics::Gauge::noop()))
    }

    fn place(pool: &Arc<Pool>) -> Place {
        pool.enter(pool.permits.clone().try_acquire_owned().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn only_connections_idle_long_enough_are_evicted() {
        let pool = pool(3);
        let (unread, waiting, serving) = (place(&pool), place(&pool), place(&pool));
        // Not read from yet (a connect storm the node has not got to): never evicted.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(pool.evict_oldest_idle(), Eviction::NotYet(_)));
        // Read from, then waiting for the client: evictable once idle for EVICT_MIN_AGE.
        waiting.state.set_idle();
        serving.state.set_idle();
        serving.state.set_busy();
        let Eviction::NotYet(at) = pool.evict_oldest_idle() else { panic!("evicted too early") };
        assert!(at > Instant::now() && at <= Instant::now() + EVICT_MIN_AGE);
        tokio::time::advance(EVICT_MIN_AGE - Duration::from_millis(1)).await;
        assert!(matches!(pool.evict_oldest_idle(), Eviction::NotYet(_)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(pool.evict_oldest_idle(), Eviction::Evicted));
        assert!(waiting.state.evict.is_cancelled());
        assert!(!unread.state.evict.is_cancelled() && !serving.state.evict.is_cancelled());
        // Nobody else qualifies: the one serving a request and the one never read stay.
        assert!(matches!(pool.evict_oldest_idle(), Eviction::NotYet(_)));
        // Places come back when connections end.
        drop(waiting);
        assert_eq!(pool.permits.available_permits(), 1);
        assert_eq!(pool.entries().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_connection_idle_longest_goes_first() {
        let pool = pool(2);
        let (first, second) = (place(&pool), place(&pool));
        second.state.set_idle();
        tokio::time::advance(Duration::from_millis(10)).await;
        first.state.set_idle();
        tokio::time::advance(EVICT_MIN_AGE).await;
        assert!(matches!(pool.evict_oldest_idle(), Eviction::Evicted));
        assert!(second.state.evict.is_cancelled() && !first.state.evict.is_cancelled());
    }
}
