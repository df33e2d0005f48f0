//! The inbox under faults: two nodes, 100 users with a device on each node, 10,000 persisted
//! notifications published while the nodes' subscriber connections are killed several times
//! and devices drop and reconnect. Every notification must reach every device exactly once
//! after de-duplication by id, and no device may see another user's.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{API_KEY, Client, TestNode, eventually, on_redis};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

const USERS: usize = 100;
const NOTIFICATIONS: usize = 10_000;
const PUBLISHERS: usize = 8;
/// Subscriber kills, spread evenly over the publishing: after every 1/(KILLS + 1) of the
/// notifications the publishers wait at a gate until the kill has happened.
const KILLS: usize = 6;

#[derive(Default)]
struct Device {
    /// Distinct persisted ids received.
    ids: BTreeSet<String>,
    duplicates: usize,
    /// Ids received that belong to another user.
    misrouted: usize,
    reconnects: usize,
}

/// A device: stays connected, reconnects with the last id it saw, and now and then drops its
/// connection on purpose.
async fn device(url_base: String, token: String, user: String, state: Arc<Mutex<Device>>, stop: Arc<AtomicBool>) {
    let mut last_id: Option<String> = None;
    let mut drops = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut url = format!("{url_base}?token={token}");
        if let Some(id) = &last_id {
            url.push_str(&format!("&last_id={id}"));
        }
        let Ok(mut client) = Client::connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Drop the connection after a random number of frames.
        let mut budget = 40 + fastrand::usize(..200);
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let next = tokio::time::timeout(Duration::from_millis(200), client.ws.next()).await;
            let Ok(next) = next else { continue };
            let Some(Ok(Message::Text(text))) = next else { break };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "notification" && frame["persisted"] == true {
                let id = frame["id"].as_str().unwrap().to_owned();
                let mut d = state.lock().await;
                if frame["data"]["user"].as_str() != Some(user.as_str()) {
                    d.misrouted += 1;
                }
                if !d.ids.insert(id.clone()) {
                    d.duplicates += 1;
                }
                if last_id.as_ref().is_none_or(|l| newer(&id, l)) {
                    last_id = Some(id);
                }
                drop(d);
                budget = budget.saturating_sub(1);
                if budget == 0 && drops < 3 {
                    drops += 1;
                    break;
                }
            }
        }
        state.lock().await.reconnects += 1;
    }
}

fn newer(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    parse(a) > parse(b)
}

/// Publishes notification after notification (numbers from `next`) until all are published;
/// a number at or past `gate` waits until the gate moves past it.
async fn publisher(
    internal: [SocketAddr; 2],
    next: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::watch::Receiver<usize>>,
) -> HashMap<String, Vec<String>> {
    let http = reqwest::Client::new();
    let mut published: HashMap<String, Vec<String>> = HashMap::new();
    loop {
        let n = next.fetch_add(1, Ordering::AcqRel);
        if n >= NOTIFICATIONS {
            return published;
        }
        gate.as_ref().clone().wait_for(|open| n < *open).await.unwrap();
        let user = format!("f{}", n % USERS);
        let body = json!({
            "user": user, "persist": true, "idempotency_key": format!("n{n}"), "data": { "user": user, "n": n }
        });
        // Retried with the same idempotency key until accepted (a retry notifies once), for at
        // most 30 s: Redis is back within a second of every kill.
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = loop {
            assert!(Instant::now() < deadline, "publish {n} not accepted within 30 s");
            let response = http
                .post(format!("http://{}/api/publish", internal[n % 2]))
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await;
            if let Ok(response) = response
                && response.status().is_success()
            {
                break response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        published.entry(user).or_default().push(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_persisted_notification_reaches_every_device_exactly_once_through_faults() {
    let redis = RedisServer::start();
    // Every device keeps up with all of its user's 100 notifications.
    let settings = |s: &mut pushnode::Settings| {
        on_redis(s, &redis.url());
        s.inbox.max_per_user = 1000;
        s.inbox.replay_limit = 1000;
        s.session.outbox_capacity = 1024;
    };
    let nodes = [TestNode::with(settings).await, TestNode::with(settings).await];
    for node in &nodes {
        node.wait_ready(200).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut devices = Vec::new();
    let mut tasks = Vec::new();
    for u in 0..USERS {
        let user = format!("f{u}");
        for node in &nodes {
            let state = Arc::new(Mutex::new(Device::default()));
            devices.push((user.clone(), state.clone()));
            tasks.push(tokio::spawn(device(
                format!("ws://{}/ws", node.public),
                node.token(&user),
                user.clone(),
                state,
                stop.clone(),
            )));
        }
    }

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let internal = [nodes[0].internal, nodes[1].internal];
    let step = NOTIFICATIONS / (KILLS + 1);
    let (gate, gate_rx) = tokio::sync::watch::channel(step);
    let gate_rx = Arc::new(gate_rx);
    let publishers: Vec<_> =
        (0..PUBLISHERS).map(|_| tokio::spawn(publisher(internal, next.clone(), gate_rx.clone()))).collect();

    // Kill both nodes' subscribers at every gate, however fast the publishing goes: once the
    // publishers reached it, and both nodes are subscribed again after the previous kill.
    let mut kills = 0;
    for k in 1..=KILLS {
        while next.load(Ordering::Acquire) < k * step {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let every = 2 * common::LANES;
        eventually("a node never resubscribed after a kill", || common::subscriber_ids(&redis).len() == every).await;
        let killed: usize = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap().parse().unwrap();
        assert_eq!(killed, every, "both nodes' subscriber connections");
        kills += 1;
        gate.send_replace((k + 1) * step);
    }
    gate.send_replace(NOTIFICATIONS);
    let mut published: HashMap<String, BTreeSet<String>> = HashMap::new();
    for p in publishers {
        for (user, ids) in p.await.unwrap() {
            published.entry(user).or_default().extend(ids);
        }
    }
    assert_eq!(published.values().map(BTreeSet::len).sum::<usize>(), NOTIFICATIONS);
    assert_eq!(kills, KILLS);
    let publish_time = started.elapsed();

    // Every device converges on its user's full set.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut missing = 0;
        for (user, state) in &devices {
            let d = state.lock().await;
            missing += published[user].difference(&d.ids).count();
        }
        if missing == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} notifications never reached their devices");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.unwrap();
    }
    let (mut duplicates, mut reconnects) = (0, 0);
    for (user, state) in &devices {
        let d = state.lock().await;
        assert_eq!(d.misrouted, 0, "{user} received another user's notification");
        assert_eq!(&d.ids, &published[user], "{user}: extra ids");
        duplicates += d.duplicates;
        reconnects += d.reconnects;
    }
    eprintln!(
        "{NOTIFICATIONS} notifications to {} devices in {publish_time:?}; {kills} subscriber kills; \
         {reconnects} device reconnects; {duplicates} duplicates removed by id",
        devices.len()
    );
}
