//! Figures a run produces, as JSON and as a readable summary, and the node probe that reads
//! the node processes' RSS and CPU time from /proc.

use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{RunArgs, Scenario};

/// Clock ticks per second in /proc/<pid>/stat.
const CLOCK_TICKS: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NodeSample {
    /// Sum over the node processes.
    pub rss_kib: u64,
    pub cpu_seconds: f64,
}

/// Reads the node processes' figures.
#[derive(Debug, Clone)]
pub struct NodeProbe {
    pids: Vec<u32>,
}

impl NodeProbe {
    pub fn new(pids: &[u32]) -> Self {
        Self { pids: pids.to_vec() }
    }

    pub fn sample(&self) -> NodeSample {
        let mut sample = NodeSample::default();
        for pid in &self.pids {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(line) = status.lines().find(|l| l.starts_with("VmRSS:"))
            {
                sample.rss_kib += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some((_, rest)) = stat.rsplit_once(')')
            {
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
                sample.cpu_seconds += ticks as f64 / CLOCK_TICKS;
            }
        }
        sample
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl From<&Histogram<u64>> for Latency {
    fn from(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    pub ok: usize,
    pub failed: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub handshake_us: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub reconnects_asked: usize,
    pub reconnects_done: usize,
    pub per_second: f64,
    pub handshake_us: Latency,
    pub connected_at_end: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrafficReport {
    pub published: u64,
    /// Measured-window messages the API refused (never counted as expected).
    pub publish_refused: u64,
    /// Deliveries expected in the measured window (messages × receivers).
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub delivered_per_second: f64,
    pub lost: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub latency_us: Latency,
    pub node_cpu_seconds: f64,
    pub node_cpu_us_per_delivery: f64,
    pub deliveries_per_node_cpu_second: f64,
    /// The largest output buffer Redis held for a node's subscriber connection (sampled).
    pub subscriber_output_buffer_max_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub connections: usize,
    pub sources: usize,
    pub nodes: usize,
    pub rate: u64,
    pub publish_via: crate::PublishVia,
    pub duration_seconds: f64,
    pub connect: Option<ConnectReport>,
    pub node_before: NodeSample,
    pub node_connected: NodeSample,
    pub node_after: NodeSample,
    pub still_connected: Option<usize>,
    pub traffic: Option<TrafficReport>,
    pub churn: Option<ChurnReport>,
    pub resubscribe_seconds: Option<f64>,
    pub soak: Option<crate::soak::SoakReport>,
    /// Connections on the nodes from all generators (RSS per connection is divided by it).
    pub total_connections: Option<usize>,
}

impl Report {
    pub fn new(args: &RunArgs) -> Self {
        Self {
            scenario: args.scenario,
            connections: args.connections,
            sources: args.sources.len(),
            nodes: args.urls.len(),
            rate: args.rate,
            publish_via: args.publish_via,
            duration_seconds: args.duration.as_secs_f64(),
            connect: None,
            node_before: NodeSample::default(),
            node_connected: NodeSample::default(),
            node_after: NodeSample::default(),
            still_connected: None,
            traffic: None,
            churn: None,
            resubscribe_seconds: None,
            soak: None,
            total_connections: args.total_connections,
        }
    }

    /// Node RSS growth per connection, in bytes (from before connecting to after). With
    /// several generators, the growth is divided by all of their connections.
    pub fn rss_per_connection(&self) -> Option<f64> {
        let ok = self.total_connections.unwrap_or(self.connect.as_ref()?.ok);
        (ok > 0 && self.node_connected.rss_kib > 0)
            .then(|| (self.node_connected.rss_kib.saturating_sub(self.node_before.rss_kib) * 1024) as f64 / ok as f64)
    }

    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {:?}: {} connections over {} sources, {} node(s), publishing via {:?}",
            self.scenario, self.connections, self.sources, self.nodes, self.publish_via
        );
        if let Some(c) = &self.connect {
            let _ = writeln!(
                out,
                "connect: {} ok, {} failed in {:.2} s ({:.0}/s); handshake p50 {} µs p99 {} µs max {} µs",
                c.ok, c.failed, c.seconds, c.per_second, c.handshake_us.p50, c.handshake_us.p99, c.handshake_us.max
            );
        }
        if let Some(per) = self.rss_per_connection() {
            let _ = writeln!(
                out,
                "node RSS: {} KiB before, {} KiB connected, {} KiB after: {:.0} bytes per connection",
                self.node_before.rss_kib, self.node_connected.rss_kib, self.node_after.rss_kib, per
            );
        }
        // The nodes' CPU over every generator's connections (like RSS per connection).
        if let Some(connections) =
            self.connect.as_ref().map(|c| self.total_connections.unwrap_or(c.ok)).filter(|n| *n > 0)
        {
            let connecting = self.node_connected.cpu_seconds - self.node_before.cpu_seconds;
            let _ = writeln!(
                out,
                "node CPU: {connecting:.2} s connecting ({:.0} µs per connection), {:.2} s from connected to the end",
                connecting * 1e6 / connections as f64,
                self.node_after.cpu_seconds - self.node_connected.cpu_seconds
            );
        }
        if let Some(t) = &self.traffic {
            let l = &t.latency_us;
            let _ = writeln!(
                out,
                "traffic: {} published ({} refused), {} of {} expected delivered ({:.0}/s), lost {}, duplicates {}, misrouted {}",
                t.published,
                t.publish_refused,
                t.delivered,
                t.expected_deliveries,
                t.delivered_per_second,
                t.lost,
                t.duplicates,
                t.misrouted
            );
            let _ = writeln!(
                out,
                "latency µs: p50 {} p90 {} p99 {} p99.9 {} max {} ({} samples)",
                l.p50, l.p90, l.p99, l.p999, l.max, l.count
            );
            let _ = writeln!(
                out,
                "node CPU: {:.2} s, {:.2} µs per delivery, {:.0} deliveries per CPU-second",
                t.node_cpu_seconds, t.node_cpu_us_per_delivery, t.deliveries_per_node_cpu_second
            );
            let _ = writeln!(
                out,
                "redis: largest subscriber output buffer {} bytes (CLIENT LIST omem, sampled every 100 ms)",
                t.subscriber_output_buffer_max_bytes
            );
        }
        if let Some(c) = &self.churn {
            let _ = writeln!(
                out,
                "churn: {} reconnects ({:.0}/s), handshake p50 {} µs p99 {} µs, {} connected at the end",
                c.reconnects_done, c.per_second, c.handshake_us.p50, c.handshake_us.p99, c.connected_at_end
            );
        }
        if let Some(s) = self.resubscribe_seconds {
            let _ = writeln!(out, "resubscribe: all channels back {s:.3} s after CLIENT KILL TYPE pubsub");
        }
        if let Some(s) = &self.soak {
            let l = &s.live_latency_us;
            let _ = writeln!(
                out,
                "soak live: {} published, {} received (at most once: devices reconnecting miss some), p50 {} µs p99 {} µs p99.9 {} µs max {} µs",
                s.live_published, s.live_received, l.p50, l.p99, l.p999, l.max
            );
            let _ = writeln!(
                out,
                "soak persisted: {} published ({} refused), {} missing at the end, {} extra copies removed by id",
                s.persisted_published, s.persisted_refused, s.persisted_missing, s.persisted_extra_copies
            );
            let _ = writeln!(
                out,
                "soak churn: {} reconnects asked; {} connected at the end; user channels not subscribed exactly once: {}",
                s.reconnects_asked, s.connected_at_end, s.channels_not_once
            );
            let _ = writeln!(out, "soak verdict: {}", if s.passed() { "PASS" } else { "FAIL" });
        }
        if let Some(n) = self.still_connected {
            let _ = writeln!(out, "still connected at the end: {n}");
        }
        out
    }
}
