//! Publishing stamped messages straight into Redis (what an application's `PUBLISH` does),
//! pipelined and paced, and the resubscribe measurement.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::MultiplexedConnection;

use crate::clients::{Fleet, now_us};
use crate::report::{Latency, NodeProbe, TrafficReport};
use crate::{RunArgs, Scenario};

/// Messages per pipeline when publishing as fast as possible.
const MAX_BATCH: usize = 512;
/// Pacing tick.
const TICK: Duration = Duration::from_millis(5);

async fn connect(url: &str) -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(url).context("redis url")?;
    client.get_multiplexed_async_connection().await.context("connecting to Redis")
}

/// Publishes for warm-up + duration, then waits for the tail, and reports.
pub async fn run(args: &RunArgs, fleet: &Fleet, nodes: &NodeProbe) -> anyhow::Result<TrafficReport> {
    let mut conn = connect(&args.redis_url).await?;
    let broadcast = args.scenario == Scenario::Broadcast;
    let topic = args.topic_channel.replace("{topic}", "all");
    let channels: Vec<String> =
        (0..fleet.len()).map(|i| args.user_channel.replace("{user}", &format!("lt{}", fleet.user_index(i)))).collect();
    // Unicast goes to the healthy clients only (slow ones are written off on purpose).
    let targets = fleet.healthy();
    let mut stalled: Vec<usize> = Vec::new();
    if args.scenario == Scenario::Slow {
        let healthy: std::collections::HashSet<usize> = targets.iter().copied().collect();
        stalled = (0..fleet.len()).filter(|i| !healthy.contains(i)).collect();
    }
    let receivers = if broadcast { fleet.healthy().len() as u64 } else { 1 };

    let stats = fleet.stats();
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    stats.measure_from_us.store(now_us() + args.warmup.as_micros() as u64, Ordering::Release);
    let mut seq = 0u64;
    let mut sent_measured = 0u64;
    let mut cpu_start = None;
    let mut next = 0usize;
    let mut tick = tokio::time::interval(TICK);
    let per_tick = (args.rate as f64 * TICK.as_secs_f64()).max(0.0);
    let mut carry = 0.0;
    while Instant::now() < end {
        let batch = if args.rate == 0 {
            MAX_BATCH
        } else {
            tick.tick().await;
            carry += per_tick;
            let n = carry.floor() as usize;
            carry -= n as f64;
            n
        };
        if cpu_start.is_none() && Instant::now() >= measure_from {
            cpu_start = Some(nodes.sample());
            stats.reset_latency();
        }
        if batch == 0 {
            continue;
        }
        let measuring = Instant::now() >= measure_from;
        let mut pipe = redis::pipe();
        for _ in 0..batch {
            seq += 1;
            let t = now_us();
            let (channel, u) = if broadcast {
                (topic.as_str(), u64::MAX)
            } else {
                let i = targets[next % targets.len()];
                next += 1;
                // The slow scenario also keeps writing to the stalled clients.
                if !stalled.is_empty() && next.is_multiple_of(100) {
                    let s = stalled[(next / 100) % stalled.len()];
                    let payload = format!(r#"{{"s":{seq},"t":{t},"u":{}}}"#, fleet.user_index(s));
                    pipe.cmd("PUBLISH").arg(&channels[s]).arg(payload).ignore();
                }
                (channels[i].as_str(), fleet.user_index(i) as u64)
            };
            pipe.cmd("PUBLISH").arg(channel).arg(format!(r#"{{"s":{seq},"t":{t},"u":{u}}}"#)).ignore();
            if measuring {
                sent_measured += receivers;
            }
        }
        pipe.query_async::<()>(&mut conn).await.context("PUBLISH pipeline")?;
    }
    let cpu_end = nodes.sample();
    let received_at_end = stats.received.load(Ordering::Acquire);
    // Let in-flight messages arrive: stop when nothing new came for 500 ms (at most 10 s).
    let mut last = received_at_end;
    let drain_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stats.received.load(Ordering::Acquire);
        if now == last || now >= sent_measured {
            break;
        }
        last = now;
    }
    let received = stats.received.load(Ordering::Acquire);
    let seconds = args.duration.as_secs_f64();
    let node_cpu = cpu_start.map(|s| cpu_end.cpu_seconds - s.cpu_seconds).unwrap_or(0.0);
    Ok(TrafficReport {
        published: seq,
        expected_deliveries: sent_measured,
        delivered: received,
        delivered_per_second: received_at_end.min(received) as f64 / seconds,
        lost: sent_measured.saturating_sub(received),
        duplicates: stats.duplicates.load(Ordering::Acquire),
        misrouted: stats.misrouted.load(Ordering::Acquire),
        latency_us: Latency::from(&stats.latency()),
        node_cpu_seconds: node_cpu,
        node_cpu_us_per_delivery: if received > 0 { node_cpu * 1e6 / received as f64 } else { 0.0 },
        deliveries_per_node_cpu_second: if node_cpu > 0.0 { received as f64 / node_cpu } else { 0.0 },
    })
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
