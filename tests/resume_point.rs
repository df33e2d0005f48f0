//! `last_id` is always a safe resume point: while a session has a gap to replay and its inbox
//! reads fail, no persisted notification newer than the gap reaches the client live; once the
//! inbox answers, the gap and what arrived meanwhile are replayed in order. A device that
//! disconnects at any moment and resumes from the newest id it saw misses nothing.
//!
//! The inbox failure is real: node A connects to Redis as an ACL user that may not run FCALL
//! (its subscriptions work), while node B, with full rights, takes the publishes.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::redis::RedisServer;
use common::{Client, TestNode, WAIT, metric, on_redis};
use futures_util::StreamExt;
use pushnode::protocol::NoteId;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Reads persisted notification ids from `client` until `want` are all in `seen`, checking on
/// every id that all published ids below it arrived before it.
async fn receive_in_order(client: &mut Client, published: &[NoteId], seen: &mut BTreeSet<NoteId>, want: &[NoteId]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|id| seen.contains(id)) {
        let message = tokio::time::timeout_at(deadline, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("timed out; still missing {:?}", missing(want, seen)))
            .expect("stream ended")
            .expect("read error");
        let Message::Text(text) = message else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] != "notification" || frame["persisted"] != true {
            continue;
        }
        let id: NoteId = frame["id"].as_str().unwrap().parse().unwrap();
        let skipped: Vec<&NoteId> = published.iter().filter(|p| **p < id && !seen.contains(p)).collect();
        assert!(skipped.is_empty(), "{id} arrived before the older {skipped:?}: resuming from it would skip them");
        seen.insert(id);
    }
}

fn missing(want: &[NoteId], seen: &BTreeSet<NoteId>) -> Vec<NoteId> {
    want.iter().filter(|id| !seen.contains(id)).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_resuming_from_its_newest_id_never_skips_a_gap_the_inbox_could_not_replay_yet() {
    let redis = RedisServer::start();
    // Everything but FCALL (the inbox's functions) and FUNCTION (loading them).
    redis.cli(&["ACL", "SETUSER", "node-a", "on", ">secret-a", "~*", "&*", "+@all", "-fcall", "-function"]).unwrap();
    let publisher = TestNode::on(&redis).await;
    let url = redis.url().replace("redis://", "redis://node-a:secret-a@");
    let node = TestNode::with(|s| on_redis(s, &url)).await;
    node.wait_ready(200).await;

    let publish = |n: usize| {
        let publisher = &publisher;
        async move {
            let (status, body) = publisher.publish(json!({ "user": "7", "persist": true, "data": { "n": n } })).await;
            assert_eq!(status, 200, "{body}");
            body["id"].as_str().unwrap().parse::<NoteId>().unwrap()
        }
    };
    // Unread before the device connects: its welcome replay is what fails.
    let mut published = Vec::new();
    for n in 0..5 {
        published.push(publish(n).await);
    }

    let mut device = node.connect("7").await;
    // Live notifications arrive while every replay attempt fails.
    for n in 5..25 {
        published.push(publish(n).await);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut seen = BTreeSet::new();
    device.expect_silence(Duration::from_millis(300)).await;
    let (_, metrics) = node.get("/metrics").await;
    assert!(metric(&metrics, r#"pushnode_inbox_errors_total{operation="state"}"#) >= 1.0, "{metrics}");

    // The inbox answers again: the gap and everything after it come in order.
    redis.cli(&["ACL", "SETUSER", "node-a", "+fcall"]).unwrap();
    let first_half = published[..15].to_vec();
    receive_in_order(&mut device, &published, &mut seen, &first_half).await;

    // The worst moment: the device drops with part of the replay seen, and resumes from the
    // newest id it has.
    drop(device);
    let newest = *seen.iter().max().unwrap();
    for n in 25..30 {
        published.push(publish(n).await);
    }
    let url = node.ws_url(&format!("token={}&last_id={newest}", node.token("7")));
    let mut device = Client::connect(&url).await.unwrap();
    assert_eq!(device.next_json().await["type"], "welcome");
    receive_in_order(&mut device, &published, &mut seen, &published).await;
    assert_eq!(seen.iter().copied().collect::<Vec<_>>(), published, "every id exactly once after de-duplication");

    // And live again: no gap is pending, the next one arrives at once.
    let id = publish(30).await;
    published.push(id);
    receive_in_order(&mut device, &published, &mut seen, &[id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_one_page_continues_until_everything_was_sent_in_order() {
    let node = TestNode::with(|s| s.inbox.replay_limit = 3).await;
    let mut published = Vec::new();
    for n in 0..10 {
        let (status, body) = node.publish(json!({ "user": "8", "persist": true, "data": { "n": n } })).await;
        assert_eq!(status, 200, "{body}");
        published.push(body["id"].as_str().unwrap().parse::<NoteId>().unwrap());
    }
    // Unread ones at the welcome, then the rest page by page.
    let mut device = node.connect("8").await;
    let mut seen = BTreeSet::new();
    receive_in_order(&mut device, &published, &mut seen, &published).await;
    // With last_id: everything after it, also in pages.
    let url = node.ws_url(&format!("token={}&last_id={}", node.token("8"), published[1]));
    let mut resumed = Client::connect(&url).await.unwrap();
    assert_eq!(resumed.next_json().await["type"], "welcome");
    let mut again = BTreeSet::from([published[0], published[1]]);
    receive_in_order(&mut resumed, &published, &mut again, &published).await;
    assert_eq!(again.len(), published.len());
}
