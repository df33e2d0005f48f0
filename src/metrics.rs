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
pub const MESSAGES_QUEUED: &str = "pushnode_messages_queued_total";
pub const MESSAGES_DELIVERED: &str = "pushnode_messages_delivered_total";
pub const MESSAGES_DROPPED: &str = "pushnode_messages_dropped_total";
pub const DELIVERY_LATENCY: &str = "pushnode_delivery_latency_seconds";
pub const CLIENT_ERRORS: &str = "pushnode_client_errors_total";
pub const BROKER_SUBSCRIPTIONS: &str = "pushnode_broker_subscriptions";
pub const BROKER_COMMANDS: &str = "pushnode_broker_commands_total";
pub const BROKER_RESUBSCRIBE_DURATION: &str = "pushnode_broker_resubscribe_duration_seconds";
pub const BROKER_RECONNECTS: &str = "pushnode_broker_reconnects_total";
pub const BROKER_CHANNELS_MOVED: &str = "pushnode_broker_channels_moved_total";
pub const BROKER_UP: &str = "pushnode_broker_up";
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
pub const PUSHER_CONNECTIONS: &str = "pushnode_pusher_connections";
pub const PRESENCE_ERRORS: &str = "pushnode_presence_errors_total";
pub const WEBHOOKS_SENT: &str = "pushnode_webhooks_sent_total";
pub const WEBHOOKS_FAILED: &str = "pushnode_webhooks_failed_total";
pub const WEBHOOKS_RETRIED: &str = "pushnode_webhooks_retried_total";
pub const WEBHOOKS_DROPPED: &str = "pushnode_webhooks_dropped_total";
pub const WEBHOOKS_QUEUE: &str = "pushnode_webhooks_queue";
pub const WEBHOOKS_LATENCY: &str = "pushnode_webhooks_latency_seconds";
pub const ALLOCATOR_ALLOCATED: &str = "pushnode_allocator_allocated_bytes";
pub const ALLOCATOR_RESIDENT: &str = "pushnode_allocator_resident_bytes";

/// Latency buckets from 100 µs to 10 s, roughly three per decade.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The standard `process_*` series (CPU, memory, descriptors, threads, start time), recorded
/// through the facade at each scrape by the `metrics-process` crate.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Resident memory of this process, for admission control. Read from `/proc/self/statm` with
/// the kernel's page size (16 or 64 KiB on some arm64 hosts), every second: cheaper than the
/// collector's snapshot, which also counts every open descriptor.
pub fn resident_bytes() -> Option<u64> {
    let statm = procfs::process::Process::myself().ok()?.statm().ok()?;
    Some(statm.resident * procfs::page_size())
}

/// What the global allocator reports of itself, read at each scrape.
#[derive(Debug, Clone, Copy)]
pub struct AllocatorStats {
    /// Bytes in live allocations: what the program holds. A leak grows this.
    pub allocated: u64,
    /// Bytes in the allocator's resident pages: the live ones, freed ones not yet returned to
    /// the system, and its own metadata. Growth here alone is the allocator keeping memory.
    pub resident: u64,
}

static ALLOCATOR_STATS: OnceLock<fn() -> Option<AllocatorStats>> = OnceLock::new();

/// Lets the program that chose the global allocator (the `pushnode` binary: jemalloc) publish
/// its figures as `pushnode_allocator_*_bytes`, so that a node's growing RSS can be told apart:
/// memory the program holds, or memory the allocator keeps. Without it (the library embedded
/// elsewhere, the integration tests) those series are absent. The first call wins.
pub fn report_allocator(read: fn() -> Option<AllocatorStats>) {
    let _ = ALLOCATOR_STATS.set(read);
}

/// The full `/metrics` text: the recorder's series, the process's and allocator's included.
pub fn render(handle: &PrometheusHandle) -> String {
    process_collector().collect();
    if let Some(stats) = ALLOCATOR_STATS.get().and_then(|read| read()) {
        metrics::gauge!(ALLOCATOR_ALLOCATED).set(stats.allocated as f64);
        metrics::gauge!(ALLOCATOR_RESIDENT).set(stats.resident as f64);
    }
    handle.render()
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
            process_collector().describe();
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
        MESSAGES_QUEUED,
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
    describe_counter!(
        MESSAGES_QUEUED,
        "Frames handed to local sessions by fan-out (queued, or written by fan-out itself)"
    );
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
        BROKER_UP,
        "1 while the broker is connected, subscribed and its probes are fresh; 0 otherwise (sampled at scrape)"
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
    describe_gauge!(
        PUSHER_CONNECTIONS,
        "Pusher protocol sessions open on this node, by app id (part of pushnode_connections)"
    );
    describe_counter!(WEBHOOKS_SENT, "Webhook events delivered (2xx)");
    describe_counter!(WEBHOOKS_FAILED, "Webhook calls that failed, by reason (status, redirect, timeout, connect)");
    describe_counter!(WEBHOOKS_RETRIED, "Webhook events put back for a later try");
    describe_counter!(
        WEBHOOKS_DROPPED,
        "Webhook events given up, by reason (queue_full, expired after webhooks.retry_for, unavailable, unknown_endpoint)"
    );
    describe_gauge!(WEBHOOKS_QUEUE, "Webhook events waiting in the shared queue (sampled by each node's sender)");
    describe_histogram!(WEBHOOKS_LATENCY, Unit::Seconds, "From an event to the 2xx of the call that carried it");
    describe_gauge!(
        ALLOCATOR_ALLOCATED,
        Unit::Bytes,
        "Bytes in live heap allocations (jemalloc stats.allocated; sampled at scrape)"
    );
    describe_gauge!(
        ALLOCATOR_RESIDENT,
        Unit::Bytes,
        "Bytes in the heap allocator's resident pages, freed-but-kept and metadata included (jemalloc stats.resident)"
    );
    describe_counter!(
        PRESENCE_ERRORS,
        "Presence changes, syncs or member events that did not reach Redis (repaired by the next sync)"
    );
}
