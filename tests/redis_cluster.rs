//! Cluster mode on a real 3-master Redis Cluster with sharded pub/sub (SSUBSCRIBE/SPUBLISH).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisCluster;
use common::{TestNode, WAIT, eventually, on_cluster};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_delivery_across_nodes_and_cleanup() {
    let cluster = RedisCluster::start();
    let a = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    let b = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;

    // Users whose channels land on different shards.
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for user in &users {
        on_a.push(a.connect(user).await);
        on_b.push(b.connect(user).await);
    }
    for user in &users {
        // The hash tag keeps a user's channel (and later its inbox keys) in one slot.
        assert_eq!(cluster.shard_numsub(&format!("pushnode:user:{{{user}}}")), 2, "{user}");
    }
    let (status, body) = a.publish(json!({ "users": users, "data": "all" })).await;
    assert_eq!(status, 200, "{body}");
    for client in on_a.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(client.next_json().await["data"], "all");
    }
    let (status, _) = b.publish(json!({ "user": "user3", "data": "one" })).await;
    assert_eq!(status, 200);
    assert_eq!(on_a[3].next_json().await["data"], "one");
    assert_eq!(on_b[3].next_json().await["data"], "one");
    on_a[4].expect_silence(Duration::from_millis(200)).await;

    drop(on_a);
    drop(on_b);
    eventually("sharded subscriptions left behind", || {
        users.iter().all(|u| cluster.shard_numsub(&format!("pushnode:user:{{{u}}}")) == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_the_restart_of_the_master_holding_the_users_slot() {
    let mut cluster = RedisCluster::start();
    let node = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    node.wait_ready(200).await;
    let mut client = node.connect("42").await;
    let channel = "pushnode:user:{42}";

    let master = cluster.master_for(channel);
    master.restart();
    let restarted = Instant::now();
    for m in &cluster.masters {
        m.wait_until(|s| s.cli(&["CLUSTER", "INFO"]).is_ok_and(|i| i.contains("cluster_state:ok")), "cluster not ok");
    }

    // Publish until it arrives (attempts during the outage may fail with 503).
    loop {
        let (status, body) = node.publish(json!({ "user": "42", "data": "after" })).await;
        if status == 200
            && let Ok(n) = tokio::time::timeout(Duration::from_millis(200), client.next_json()).await
        {
            assert_eq!(n["data"], "after");
            break;
        }
        assert!(status == 200 || status == 503, "{body}");
        assert!(restarted.elapsed() < WAIT, "delivery never resumed after the master restart");
    }
    eventually("channel not resubscribed on the restarted master", || cluster.shard_numsub(channel) == 1).await;
    eprintln!("delivery resumed {:?} after the master restart", restarted.elapsed());
}

/// Every shard carries one of the node's probe channels, so a shard whose connection stays
/// open but delivers nothing (DEBUG SLEEP) fails readiness, and the node recovers after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shard_fails_readiness_until_it_delivers_again() {
    let cluster = RedisCluster::start();
    let node = TestNode::with(|s| {
        on_cluster(s, &cluster.nodes());
        s.broker.probe_timeout = Duration::from_secs(1);
    })
    .await;
    node.wait_ready(200).await;
    for m in &cluster.masters {
        let probes = m.cli(&["PUBSUB", "SHARDCHANNELS", "pushnode:probe:*"]).unwrap();
        let count = probes.lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(count, common::LANES, "one probe per shard and subscriber connection, got {probes:?}");
    }

    for (i, master) in cluster.masters.iter().enumerate() {
        // Well over broker.probe_timeout (1 s), well under the cluster's node timeout (5 s).
        let mut sleeper = master.stall(2.5);
        node.wait_ready(503).await;
        sleeper.wait().unwrap();
        node.wait_ready(200).await;
        eprintln!("shard {i}: readiness failed while it slept and came back");
    }

    let mut client = node.connect("42").await;
    let (status, body) = node.publish(json!({ "user": "42", "data": "after" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.next_json().await["data"], "after");
}

/// Resharding moves a user's slot to another master, and Redis drops the slot's sharded
/// subscriptions. The node subscribes the channel again on the new owner; a persisted
/// notification published while the move was under way reaches the session exactly once (live,
/// or replayed from the inbox whose keys moved with the slot), and live delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_follows_a_users_slot_to_another_master() {
    let mut cluster = RedisCluster::start();
    let node = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    node.wait_ready(200).await;
    let mut client = node.connect("42").await;
    let channel = "pushnode:user:{42}";
    let persist = |data: &'static str| node.publish(json!({ "user": "42", "data": data, "persist": true }));

    let (status, body) = persist("before").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.next_json().await["data"], "before");

    let moved = cluster.start_move(channel);
    // The target owns the slot; the source still holds the node's subscription (until it
    // hears of the move), so this one may be published where nobody listens: a gap.
    let (status, body) = persist("during").await;
    assert_eq!(status, 200, "{body}");
    cluster.finish_move(&moved);
    let during = client.next_json().await;
    assert_eq!((during["data"].as_str(), during["persisted"].as_bool()), (Some("during"), Some(true)), "{during}");
    eprintln!(
        "the notification published during the move arrived {}",
        if during["replay"] == true { "as a replay" } else { "live" }
    );

    eventually("channel not subscribed on its new master", || {
        cluster.by_port(moved.to).numsub(channel) == 1 && cluster.by_port(moved.from).numsub(channel) == 0
    })
    .await;
    let (status, body) = persist("after").await;
    assert_eq!(status, 200, "{body}");
    // Live with the new count, or (when it overtook the gap's replay) replayed as unread.
    let after = client.next_json().await;
    assert_eq!(after["data"], "after", "{after}");
    assert!(after["unread"] == 3 || (after["replay"] == true && after["read"] == false), "{after}");
    // Exactly once each: nothing is written twice.
    client.expect_silence(Duration::from_millis(600)).await;
    let (_, metrics) = node.get("/metrics").await;
    assert!(
        metrics.lines().any(|l| l.starts_with("pushnode_broker_channels_moved_total") && !l.ends_with(" 0")),
        "the move is counted"
    );
}

/// A shard that refuses SSUBSCRIBE (here by ACL) while its connection stays healthy: the user's
/// channel is not marked live, and once the shard accepts the retried subscription the session
/// replays what was published in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_retried_and_its_gap_replayed() {
    let mut cluster = RedisCluster::start();
    let node = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    node.wait_ready(200).await;
    let channel = "pushnode:user:{42}";
    let port = cluster.master_for(channel).port;
    let master = cluster.by_port(port);
    master.cli(&["ACL", "SETUSER", "default", "-ssubscribe"]).unwrap();

    // The welcome comes after broker.subscribe_wait, without the subscription.
    let mut client = node.connect("42").await;
    assert_eq!(master.numsub(channel), 0);
    let (status, body) = node.publish(json!({ "user": "42", "data": "meanwhile", "persist": true })).await;
    assert_eq!(status, 200, "{body}");
    client.expect_silence(Duration::from_millis(200)).await;

    master.cli(&["ACL", "SETUSER", "default", "+ssubscribe"]).unwrap();
    let replayed = client.next_json().await;
    assert_eq!(
        (replayed["data"].as_str(), replayed["replay"].as_bool()),
        (Some("meanwhile"), Some(true)),
        "{replayed}"
    );
    eventually("the retried subscription never arrived", || master.numsub(channel) == 1).await;
    let (status, body) = node.publish(json!({ "user": "42", "data": "live", "persist": true })).await;
    assert_eq!(status, 200, "{body}");
    let live = client.next_json().await;
    assert_eq!((live["data"].as_str(), live["unread"].as_u64()), (Some("live"), Some(2)), "{live}");
    client.expect_silence(Duration::from_millis(300)).await;
}

/// A master dies and the cluster promotes its replica: the node follows the slot to the new
/// master, and a persisted notification published as soon as the cluster takes it again
/// reaches the session exactly once (live, or replayed after the resubscribe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_follows_a_failover_to_the_replica() {
    // A failover takes about 5 s here; a loaded 2-core machine gets six times that.
    const FAILOVER_WAIT: Duration = Duration::from_secs(30);
    let mut cluster = RedisCluster::with_replicas();
    let node = TestNode::with(|s| on_cluster(s, &cluster.nodes())).await;
    node.wait_ready(200).await;
    let mut client = node.connect("42").await;
    let channel = "pushnode:user:{42}";

    let dead = cluster.master_for(channel);
    let dead_port = dead.port;
    dead.kill();
    let killed = Instant::now();
    // Retried with one idempotency key: a publish that failed late must not count twice.
    let body = json!({ "user": "42", "data": "after", "persist": true, "idempotency_key": "failover-1" });
    loop {
        let (status, reply) = node.publish(body.clone()).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{reply}");
        assert!(killed.elapsed() < FAILOVER_WAIT, "the cluster never took the publish again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = client.next_json().await;
    assert_eq!((after["data"].as_str(), after["persisted"].as_bool()), (Some("after"), Some(true)), "{after}");
    eprintln!("delivered {:?} after the kill", killed.elapsed());
    let port = cluster.master_for(channel).port;
    assert_ne!(port, dead_port, "the slot has a new master");
    eventually("channel not subscribed on the promoted replica", || cluster.by_port(port).numsub(channel) == 1).await;
    client.expect_silence(Duration::from_millis(500)).await;
}
