//! Metric names, defined once, and the Prometheus exporter.
//!
//! Everything is recorded through the `metrics` facade. Labels have bounded cardinality: a
//! close or drop reason, a command name; never a user, channel or token.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "pushnode_connections";
pub const USERS: &str = "pushnode_users";
pub const CONNECTIONS_OPENED: &str = "pushnode_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "pushnode_connections_closed_total";
pub const CONNECTIONS_REJECTED: &str = "pushnode_connections_rejected_total";
pub const HANDSHAKE_DURATION: &str = "pushnode_handshake_duration_seconds";
pub const MESSAGES_PUBLISHED: &str = "pushnode_messages_published_total";
pub const MESSAGES_FANNED_OUT: &str = "pushnode_messages_queued_total";
pub const MESSAGES_DELIVERED: &str = "pushnode_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "pushnode_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "pushnode_delivery_latency_seconds";
pub const CLIENT_ERRORS: &str = "pushnode_client_errors_total";
pub const BROKER_SUBSCRIPTIONS: &str = "pushnode_broker_subscriptions";
pub const BROKER_COMMANDS: &str = "pushnode_broker_commands_total";
pub const BROKER_RESUBSCRIBE_DURATION: &str = "pushnode_broker_resubscribe_duration_seconds";
pub const BROKER_RECONNECTS: &str = "pushnode_broker_reconnects_total";
pub const BROKER_CHANNELS_MOVED: &str = "pushnode_broker_channels_moved_total";
pub const BROKER_PROBE_LAST_SUCCESS: &str = "pushnode_broker_probe_last_success_timestamp_seconds";
pub const INBOX_APPENDED: &str = "pushnode_inbox_appended_total";
pub const INBOX_DUPLICATES: &str = "pushnode_inbox_duplicates_total";
pub const INBOX_REPLAYED: &str = "pushnode_inbox_replayed_total";
pub const INBOX_READS: &str = "pushnode_inbox_reads_total";
pub const INBOX_ERRORS: &str = "pushnode_inbox_errors_total";
pub const CONNECTIONS_LIMIT: &str = "pushnode_connections_limit";
pub const HTTP_CONNECTIONS: &str = "pushnode_http_connections";
pub const HTTP_CONNECTIONS_DROPPED: &str = "pushnode_http_connections_dropped_total";
pub const ACCEPT_ERRORS: &str = "pushnode_accept_errors_total";

/// Latency buckets from 100 µs to 10 s, roughly three per decade.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The process's own figures, read from `/proc/self` (Linux); `None` elsewhere.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Clock ticks per second for `/proc/*/stat` times: 100 on every Linux platform Rust targets.
const CLOCK_TICKS: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

impl ProcessStats {
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let cpu_seconds = (field(14)? + field(15)?) as f64 / CLOCK_TICKS;
        let virtual_bytes = field(23)?;
        let resident_bytes = field(24)? * PAGE_SIZE;
        let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
            limits.lines().find(|l| l.starts_with("Max open files"))?.split_whitespace().nth(3)?.parse().ok()
        });
        let start_time_seconds = (|| {
            let boot: f64 = std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime "))?
                .trim()
                .parse()
                .ok()?;
            Some(boot + field(22)? as f64 / CLOCK_TICKS)
        })();
        Some(Self { resident_bytes, virtual_bytes, cpu_seconds, open_fds, max_fds, start_time_seconds })
    }

    /// The standard `process_*` series in Prometheus text format.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(1024);
        let mut series = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
        };
        series("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", self.resident_bytes as f64);
        series("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", self.virtual_bytes as f64);
        series(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds,
        );
        series("process_open_fds", "gauge", "Number of open file descriptors.", self.open_fds as f64);
        if let Some(max) = self.max_fds {
            series("process_max_fds", "gauge", "Maximum number of open file descriptors.", max as f64);
        }
        if let Some(start) = self.start_time_seconds {
            series(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                start,
            );
        }
        out
    }
}

/// Resident memory of this process, from `/proc/self/statm` (cheap enough to sample every
/// second, unlike [`ProcessStats::read`], which counts open file descriptors).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * PAGE_SIZE)
}

/// The full `/metrics` text: the recorder's series, then the process's.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    if let Some(process) = ProcessStats::read() {
        if !text.is_empty() && !text.ends_with("\n\n") {
            text.push('\n');
        }
        text.push_str(&process.render());
    }
    text
}

/// How often the exporter's upkeep (histogram draining) runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the process-wide recorder once and returns its handle. Several nodes in one process
/// (integration tests) share it.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding application);
            // then ours stays unused and /metrics shows what it has.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register_zeroes();
            handle
        })
        .clone()
}

/// Registers the counters dashboards and alerts rate() over, so they exist (at 0) from the
/// start instead of appearing with their first event.
fn register_zeroes() {
    for name in [
        CONNECTIONS_OPENED,
        MESSAGES_PUBLISHED,
        MESSAGES_FANNED_OUT,
        MESSAGES_DELIVERED,
        BROKER_RECONNECTS,
        BROKER_CHANNELS_MOVED,
        INBOX_APPENDED,
        INBOX_DUPLICATES,
        INBOX_REPLAYED,
        INBOX_READS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["slow_consumer", "closing", "invalid_payload"] {
        metrics::counter!(MESSAGES_DROPPED, "reason" => reason).increment(0);
    }
    metrics::gauge!(CONNECTIONS).set(0.0);
    metrics::gauge!(USERS).set(0.0);
}

fn describe() {
    describe_gauge!(CONNECTIONS, "WebSocket sessions open on this node");
    describe_gauge!(USERS, "Distinct users with at least one session on this node");
    describe_counter!(CONNECTIONS_OPENED, "WebSocket sessions opened");
    describe_counter!(CONNECTIONS_CLOSED, "WebSocket sessions closed, by reason");
    describe_counter!(CONNECTIONS_REJECTED, "Upgrade requests refused before the handshake, by reason");
    describe_histogram!(HANDSHAKE_DURATION, Unit::Seconds, "Time from upgrade request to 101 response");
    describe_counter!(MESSAGES_PUBLISHED, "Messages published through this node's API, per target channel");
    describe_counter!(MESSAGES_FANNED_OUT, "Frames queued to local sessions by fan-out");
    describe_counter!(MESSAGES_DELIVERED, "Notification frames written to sockets");
    describe_counter!(MESSAGES_DROPPED, "Frames not queued, by reason");
    describe_histogram!(
        DELIVERY_LATENCY,
        Unit::Seconds,
        "From the publish time a message carries to its write on the socket"
    );
    describe_counter!(CLIENT_ERRORS, "Client frames answered with an error frame, by code");
    describe_gauge!(BROKER_SUBSCRIPTIONS, "Channels this node's subscriber holds in Redis");
    describe_counter!(BROKER_COMMANDS, "Redis pub/sub commands sent, by command");
    describe_histogram!(
        BROKER_RESUBSCRIBE_DURATION,
        Unit::Seconds,
        "Time to subscribe every wanted channel after a (re)connect"
    );
    describe_counter!(BROKER_RECONNECTS, "Subscriber reconnects after a lost, failed or silent connection");
    describe_counter!(
        BROKER_CHANNELS_MOVED,
        "Sharded channels Redis Cluster unsubscribed because their slot moved to another shard, then subscribed again there"
    );
    describe_gauge!(
        BROKER_PROBE_LAST_SUCCESS,
        "Unix time when the least recently heard of this node's probes (one per shard in cluster mode) last came back"
    );
    describe_counter!(INBOX_APPENDED, "Notifications persisted to inboxes through this node");
    describe_counter!(INBOX_DUPLICATES, "Persisted publishes skipped because their idempotency key was seen");
    describe_counter!(INBOX_REPLAYED, "Inbox notifications replayed to sessions (connect, resume, broker gap)");
    describe_counter!(INBOX_READS, "Mark-read operations");
    describe_counter!(INBOX_ERRORS, "Inbox operations that failed (Redis unreachable or erroring), by operation");
    describe_gauge!(
        CONNECTIONS_LIMIT,
        "Sessions this node admits: limits.max_connections, lowered to fit the file-descriptor limit"
    );
    describe_gauge!(HTTP_CONNECTIONS, "HTTP connections open that are not WebSocket sessions, by listener");
    describe_counter!(
        HTTP_CONNECTIONS_DROPPED,
        "HTTP connections closed by the node before a request completed: header_timeout, or evicted when the listener's pool was full"
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "accept() failures by listener; reason resources is EMFILE, ENFILE, ENOBUFS or ENOMEM"
    );
}
