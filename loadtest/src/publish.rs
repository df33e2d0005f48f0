//! Publishing stamped messages straight into Redis (what an application's `PUBLISH` does),
//! pipelined and paced, and the resubscribe measurement.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::MultiplexedConnection;

use crate::clients::{Fleet, now_us};
use crate::report::{Latency, NodeProbe, TrafficReport};
use crate::sink::{Message, Sink};
use crate::{RunArgs, Scenario};

/// Messages per pipeline when publishing as fast as possible.
const MAX_BATCH: usize = 512;

async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).context("redis url")?;
    client.get_multiplexed_async_connection().await.context("connecting to Redis")
}

/// Publishes for warm-up + duration, then waits for the tail, and reports.
pub async fn run(args: &RunArgs, fleet: &Fleet, nodes: &NodeProbe) -> anyhow::Result<TrafficReport> {
    let stats = fleet.stats();
    let buffers = OutputBuffers::watch(connect(&args.redis_url).await?);
    let published = tokio::task::spawn_blocking({
        let (args, fleet, nodes) = (args.clone(), fleet.clone(), nodes.clone());
        move || publish(&args, &fleet, &nodes)
    })
    .await
    .context("publisher thread")??;
    let received_at_end = stats.received.load(Ordering::Acquire);
    // Let in-flight messages arrive: stop when nothing new came for 500 ms (at most 10 s).
    let mut last = received_at_end;
    let drain_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stats.received.load(Ordering::Acquire);
        if now == last || now >= published.expected {
            break;
        }
        last = now;
    }
    let received = stats.received.load(Ordering::Acquire);
    let seconds = args.duration.as_secs_f64();
    let subscriber_output_buffer_max_bytes = buffers.stop().await?;
    let node_cpu = published.node_cpu_seconds;
    Ok(TrafficReport {
        published: published.messages,
        publish_refused: published.failures,
        expected_deliveries: published.expected,
        delivered: received,
        delivered_per_second: received_at_end.min(received) as f64 / seconds,
        lost: published.expected.saturating_sub(received),
        duplicates: stats.duplicates.load(Ordering::Acquire),
        misrouted: stats.misrouted.load(Ordering::Acquire),
        latency_us: Latency::from(&stats.latency()),
        node_cpu_seconds: node_cpu,
        node_cpu_us_per_delivery: if received > 0 { node_cpu * 1e6 / received as f64 } else { 0.0 },
        deliveries_per_node_cpu_second: if node_cpu > 0.0 { received as f64 / node_cpu } else { 0.0 },
        subscriber_output_buffer_max_bytes,
    })
}

/// What the publishing thread did.
struct Published {
    messages: u64,
    /// Deliveries the measured window should produce (accepted messages × receivers).
    expected: u64,
    /// Messages of the measured window the API refused.
    failures: u64,
    /// The nodes' CPU time over the measured window.
    node_cpu_seconds: f64,
}

/// The publishing loop, on its own thread: a paced rate goes out as one batch (a Redis
/// pipeline, or concurrent API requests) every `--publish-tick` (sleeping to a deadline, which the async timer's
/// millisecond granularity cannot do), so messages arrive spread out as they would from many
/// application servers rather than in large bursts.
fn publish(args: &RunArgs, fleet: &Fleet, nodes: &NodeProbe) -> anyhow::Result<Published> {
    let mut sink = Sink::open(args)?;
    let broadcast = args.scenario == Scenario::Broadcast;
    let pusher = args.format == crate::Format::Pusher;
    // Pusher sessions listen on their app's broker channels (non-cluster names).
    let pusher_channel = |name: &str| format!("pusher:{}:{name}", args.pusher_app_id);
    let topic = if pusher { pusher_channel("all") } else { args.topic_channel.replace("{topic}", "all") };
    let channels: Vec<String> = (0..fleet.len())
        .map(|i| {
            let user = fleet.user_index(i);
            if pusher {
                pusher_channel(&crate::clients::pusher_user_channel(user))
            } else {
                args.user_channel.replace("{user}", &format!("lt{user}"))
            }
        })
        .collect();
    // Unicast goes to the healthy clients only (slow ones are written off on purpose).
    let targets = fleet.healthy();
    anyhow::ensure!(!targets.is_empty(), "no connected client to publish to");
    let mut stalled: Vec<usize> = Vec::new();
    if args.scenario == Scenario::Slow {
        let healthy: std::collections::HashSet<usize> = targets.iter().copied().collect();
        stalled = (0..fleet.len()).filter(|i| !healthy.contains(i)).collect();
    }
    let receivers = if broadcast { targets.len() as u64 } else { 1 };

    let stats = fleet.stats();
    let start = Instant::now();
    let measure_from = start + args.warmup;
    // Receivers count what was stamped from here on; `expected` counts from the same moment.
    stats.measure_from_us.store(now_us() + args.warmup.as_micros() as u64, Ordering::Release);
    let end = measure_from + args.duration;
    let (mut seq, mut expected, mut failures) = (0u64, 0u64, 0u64);
    let mut cpu_start = None;
    let mut next = 0usize;
    let tick = args.publish_tick.max(Duration::from_micros(50));
    let mut pacer = Pacer::new(args.rate, tick, start);
    while Instant::now() < end {
        let batch = if args.rate == 0 { MAX_BATCH } else { pacer.next() };
        if cpu_start.is_none() && Instant::now() >= measure_from {
            cpu_start = Some(nodes.sample());
            stats.reset_latency();
        }
        if batch == 0 {
            continue;
        }
        let measuring = Instant::now() >= measure_from;
        let mut messages = Vec::with_capacity(batch + 1);
        for _ in 0..batch {
            seq += 1;
            let t = now_us();
            let (channel, u) = if broadcast {
                (topic.as_str(), None)
            } else {
                let i = targets[next % targets.len()];
                next += 1;
                // The slow scenario also keeps writing to the stalled clients.
                if !stalled.is_empty() && next.is_multiple_of(100) {
                    let s = stalled[(next / 100) % stalled.len()];
                    let u = fleet.user_index(s);
                    let payload = format!(r#"{{"s":{seq},"t":{t},"u":{u}}}"#);
                    messages.push(Message {
                        channel: &channels[s],
                        user: Some(format!("lt{u}")),
                        payload,
                        counted: false,
                    });
                }
                (channels[i].as_str(), Some(fleet.user_index(i)))
            };
            let payload = format!(r#"{{"s":{seq},"t":{t},"u":{}}}"#, u.map_or(u64::MAX, |u| u as u64));
            messages.push(Message { channel, user: u.map(|u| format!("lt{u}")), payload, counted: true });
        }
        let refused = sink.send(&messages)?;
        if measuring {
            let published = messages.iter().filter(|m| m.counted).count() as u64;
            expected += (published - refused) * receivers;
            failures += refused;
        }
    }
    let cpu_end = nodes.sample();
    Ok(Published {
        messages: seq,
        expected,
        failures,
        node_cpu_seconds: cpu_start.map(|s| cpu_end.cpu_seconds - s.cpu_seconds).unwrap_or(0.0),
    })
}

/// Paces a publishing thread: `rate` messages per second, released once per `tick`.
pub struct Pacer {
    per_tick: f64,
    tick: Duration,
    deadline: Instant,
    carry: f64,
}

impl Pacer {
    pub fn new(rate: u64, tick: Duration, start: Instant) -> Self {
        Self { per_tick: rate as f64 * tick.as_secs_f64(), tick, deadline: start, carry: 0.0 }
    }

    /// Sleeps until the next tick (a deadline, which the async timer's millisecond
    /// granularity cannot keep) and returns how many messages are due in it.
    pub fn next(&mut self) -> usize {
        self.deadline += self.tick;
        if let Some(wait) = self.deadline.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        self.carry += self.per_tick;
        let n = self.carry.floor() as usize;
        self.carry -= n as f64;
        n
    }
}

/// Samples, every 100 ms, the output buffer Redis holds for each subscriber connection
/// (`omem` in `CLIENT LIST TYPE pubsub`) and keeps the largest: how far a node's subscriber
/// falls behind Redis.
struct OutputBuffers {
    stop: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<anyhow::Result<u64>>,
}

impl OutputBuffers {
    fn watch(mut conn: MultiplexedConnection) -> Self {
        let stop = std::sync::Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut largest = 0u64;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = stop.notified() => return Ok(largest),
                    }
                    let list: String =
                        redis::cmd("CLIENT").arg("LIST").arg("TYPE").arg("pubsub").query_async(&mut conn).await?;
                    largest = largest.max(largest_omem(&list));
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.notify_one();
        self.task.await.context("output buffer sampler")?
    }
}

/// The largest `omem=` of a `CLIENT LIST` reply (one client per line).
fn largest_omem(list: &str) -> u64 {
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|field| field.strip_prefix("omem=")))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Kills the node's subscriber connections and times how long until every user channel of
/// this fleet is subscribed again (polled with PUBSUB NUMSUB).
pub async fn resubscribe(args: &RunArgs, fleet: &Fleet) -> anyhow::Result<f64> {
    let mut conn = connect(&args.redis_url).await?;
    let channels: Vec<String> =
        (0..fleet.len()).map(|i| args.user_channel.replace("{user}", &format!("lt{}", fleet.user_index(i)))).collect();
    let started = Instant::now();
    let killed: i64 = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub").query_async(&mut conn).await?;
    anyhow::ensure!(killed > 0, "no subscriber connection to kill");
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut all = true;
        for chunk in channels.chunks(2000) {
            let counts: Vec<(String, i64)> =
                redis::cmd("PUBSUB").arg("NUMSUB").arg(chunk).query_async(&mut conn).await?;
            if counts.iter().any(|(_, n)| *n == 0) {
                all = false;
                break;
            }
        }
        if all {
            return Ok(started.elapsed().as_secs_f64());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "channels never came back");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn largest_omem_reads_every_client_line() {
        let list = "id=3 addr=127.0.0.1:1 omem=0 cmd=ssubscribe\nid=4 addr=127.0.0.1:2 omem=16384 cmd=subscribe\n";
        assert_eq!(super::largest_omem(list), 16384);
        assert_eq!(super::largest_omem(""), 0);
    }
}
