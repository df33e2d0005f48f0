//! The soak: a long steady run with reconnect churn, live unicast through Redis and persisted
//! notifications through the nodes' API, while `loadtest/run.sh soak` injects faults (killed
//! subscriber connections, a node stopped and started again). Every 10 s a line goes to the
//! timeline (CSV); at the end every persisted notification must have reached its device
//! exactly once after de-duplication by id, and every user channel must be subscribed by
//! exactly one node.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::RunArgs;
use crate::clients::{Fleet, now_us};
use crate::report::Latency;

/// How often a line goes to the timeline.
const TIMELINE_EVERY: Duration = Duration::from_secs(10);
/// A persisted publish is retried (on the next node) for this long before it counts as refused.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(60);
/// Persisted sequence numbers start here, apart from the live ones.
const PERSISTED_BASE: u64 = 1 << 40;

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub live_published: u64,
    pub live_received: u64,
    pub live_latency_us: Latency,
    pub persisted_published: u64,
    /// Persisted publishes no node accepted within a minute of retries.
    pub persisted_refused: u64,
    /// (device, notification) pairs missing at the end, after waiting for replays.
    pub persisted_missing: u64,
    /// Copies beyond the first (what de-duplication by id removes).
    pub persisted_extra_copies: u64,
    pub reconnects_asked: u64,
    pub connected_at_end: usize,
    /// Users of this generator whose channel is not subscribed exactly once at the end.
    pub channels_not_once: usize,
}

impl SoakReport {
    /// Every persisted notification accepted and delivered, every channel subscribed once.
    pub fn passed(&self) -> bool {
        self.persisted_missing == 0 && self.persisted_refused == 0 && self.channels_not_once == 0
    }
}

/// Runs the soak for `args.duration` and checks what it must.
pub async fn run(args: &RunArgs, fleet: &Fleet) -> anyhow::Result<SoakReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Arc<Mutex<Vec<(usize, u64)>>> = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let live_published = Arc::new(AtomicU64::new(0));
    fleet.stats().reset_latency();

    let live = tokio::task::spawn_blocking({
        let (args, fleet, stop, count) = (args.clone(), fleet.clone(), stop.clone(), live_published.clone());
        move || publish_live(&args, &fleet, &stop, &count)
    });
    let persisted =
        tokio::spawn(publish_persisted(args.clone(), fleet.clone(), stop.clone(), ledger.clone(), refused.clone()));
    let churn = tokio::spawn(churn(fleet.clone(), args.churn_percent_per_minute, stop.clone()));
    // Interval figures for the timeline; the run's own percentiles from their sum.
    let timeline = tokio::spawn(timeline(args.clone(), fleet.clone(), ledger.clone(), stop.clone()));

    tokio::time::sleep(args.duration).await;
    stop.store(true, Ordering::Release);
    live.await.context("live publisher")??;
    persisted.await.context("persisted publisher")?;
    let reconnects_asked = churn.await.context("churn")?;
    let latency = Latency::from(&timeline.await.context("timeline")??);

    // Every device reconnected (a node was restarted), then every persisted notification in.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.connected() < fleet.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ledger = ledger.lock().expect("poisoned").clone();
    let missing =
        |fleet: &Fleet| ledger.iter().filter(|(i, s)| fleet.persisted(*i, |p| !p.copies.contains_key(s))).count();
    while missing(fleet) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let persisted_missing = missing(fleet) as u64;
    let extra: u64 = (0..fleet.len())
        .map(|i| fleet.persisted(i, |p| p.copies.values().map(|&c| u64::from(c.saturating_sub(1))).sum::<u64>()))
        .sum();
    let channels_not_once = channels_not_once(args, fleet).await?;

    Ok(SoakReport {
        live_published: live_published.load(Ordering::Acquire),
        live_received: fleet.stats().received.load(Ordering::Acquire),
        live_latency_us: latency,
        persisted_published: ledger.len() as u64,
        persisted_refused: refused.load(Ordering::Acquire),
        persisted_missing,
        persisted_extra_copies: extra,
        reconnects_asked,
        connected_at_end: fleet.connected(),
        channels_not_once,
    })
}

/// Live unicast through Redis: pipelined PUBLISH to random users of this fleet, one pipeline
/// per millisecond, at `args.rate`. Live delivery is at most once: what a user misses while
/// reconnecting is not counted as lost.
fn publish_live(args: &RunArgs, fleet: &Fleet, stop: &AtomicBool, published: &AtomicU64) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(args.redis_url.as_str())?.get_connection().context("connecting to Redis")?;
    let mut pacer = crate::publish::Pacer::new(args.rate, Duration::from_millis(1), Instant::now());
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let n = pacer.next();
        if n == 0 {
            continue;
        }
        let mut pipe = redis::pipe();
        for _ in 0..n {
            seq += 1;
            let u = fleet.user_index(fastrand::usize(..fleet.len()));
            let channel = args.user_channel.replace("{user}", &format!("lt{u}"));
            pipe.cmd("PUBLISH").arg(channel).arg(format!(r#"{{"s":{seq},"t":{},"u":{u}}}"#, now_us())).ignore();
        }
        // Redis is never the fault injected here; a failed pipeline is retried next tick.
        if pipe.query::<()>(&mut conn).is_ok() {
            published.fetch_add(n as u64, Ordering::AcqRel);
        }
    }
    Ok(())
}

/// Persisted notifications through `POST /api/publish`, to random users of this fleet, each
/// retried with its idempotency key on the next node until accepted (at most a minute).
async fn publish_persisted(
    args: RunArgs,
    fleet: Fleet,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Vec<(usize, u64)>>>,
    refused: Arc<AtomicU64>,
) {
    let rate = if args.persist_rate > 0.0 { args.persist_rate } else { args.rate as f64 / 20.0 };
    if rate <= 0.0 || args.api_urls.is_empty() {
        return;
    }
    let client = reqwest::Client::new();
    let key = args.api_key.clone().unwrap_or_default();
    let urls: Arc<Vec<String>> =
        Arc::new(args.api_urls.iter().map(|u| format!("{}/api/publish", u.trim_end_matches('/'))).collect());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut tasks = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        n += 1;
        let i = fastrand::usize(..fleet.len());
        let u = fleet.user_index(i);
        let seq = PERSISTED_BASE + n;
        let body = format!(
            r#"{{"user":"lt{u}","persist":true,"idempotency_key":"soak-{}-{n}","data":{{"s":{seq},"t":{},"u":{u}}}}}"#,
            args.user_offset,
            now_us()
        );
        let (client, key, urls, ledger, refused) =
            (client.clone(), key.clone(), urls.clone(), ledger.clone(), refused.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            let mut attempt = n as usize;
            while started.elapsed() < PUBLISH_PATIENCE {
                let url = &urls[attempt % urls.len()];
                let sent = client
                    .post(url)
                    .bearer_auth(&key)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .timeout(Duration::from_secs(5))
                    .body(body.clone())
                    .send()
                    .await;
                if sent.is_ok_and(|r| r.status().is_success()) {
                    ledger.lock().expect("poisoned").push((i, seq));
                    return;
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            refused.fetch_add(1, Ordering::AcqRel);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Reconnects `percent_per_minute` % of the connections every minute, spread over the minute.
async fn churn(fleet: Fleet, percent_per_minute: f64, stop: Arc<AtomicBool>) -> u64 {
    let per_second = fleet.len() as f64 * percent_per_minute / 100.0 / 60.0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut carry, mut asked) = (0.0, 0u64);
    while !stop.load(Ordering::Acquire) {
        tick.tick().await;
        carry += per_second;
        while carry >= 1.0 {
            carry -= 1.0;
            fleet.reconnect(fastrand::usize(..fleet.len()));
            asked += 1;
        }
    }
    asked
}

/// Every 10 s, a line to `--timeline` if given: the time (seconds since the epoch, as run.sh's
/// node samples), connected devices, live messages received in the interval, the interval's
/// live p50 and p99 (µs), persisted published and received so far. Returns the whole run's
/// live latency.
async fn timeline(
    args: RunArgs,
    fleet: Fleet,
    ledger: Arc<Mutex<Vec<(usize, u64)>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let mut file = match &args.timeline {
        Some(path) => Some(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?),
        None => None,
    };
    if let Some(file) = &mut file {
        writeln!(file, "time,connected,live_received,p50_us,p99_us,persisted_published,persisted_received")?;
    }
    let mut overall = crate::clients::histogram();
    let mut tick = tokio::time::interval(TIMELINE_EVERY);
    tick.tick().await;
    let mut received_before = 0;
    loop {
        let stopped = stop.load(Ordering::Acquire);
        if !stopped {
            tick.tick().await;
        }
        let stats = fleet.stats();
        let latency = stats.latency();
        stats.reset_latency();
        overall.add(&latency).context("merging latency")?;
        if stopped {
            return Ok(overall);
        }
        let Some(file) = &mut file else { continue };
        let received = stats.received.load(Ordering::Acquire);
        let persisted_received: usize = (0..fleet.len()).map(|i| fleet.persisted(i, |p| p.copies.len())).sum();
        let published = ledger.lock().expect("poisoned").len();
        writeln!(
            file,
            "{},{},{},{},{},{published},{persisted_received}",
            now_us() / 1_000_000,
            fleet.connected(),
            received - received_before,
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
        )?;
        file.flush()?;
        received_before = received;
    }
}

/// How many of this fleet's users' channels are not subscribed by exactly one node
/// (`PUBSUB NUMSUB`): each user has one device, on one node. Waits up to 10 s for lingering
/// subscriptions of reconnected users to expire (`broker.unsubscribe_delay`).
async fn channels_not_once(args: &RunArgs, fleet: &Fleet) -> anyhow::Result<usize> {
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let channels: Vec<String> =
        (0..fleet.len()).map(|i| args.user_channel.replace("{user}", &format!("lt{}", fleet.user_index(i)))).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut wrong = 0;
        for chunk in channels.chunks(2000) {
            let counts: Vec<(String, i64)> =
                redis::cmd("PUBSUB").arg("NUMSUB").arg(chunk).query_async(&mut conn).await?;
            wrong += counts.iter().filter(|(_, n)| *n != 1).count();
        }
        if wrong == 0 || Instant::now() > deadline {
            return Ok(wrong);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
