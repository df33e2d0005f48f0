//! A real Prometheus server (Debian package `prometheus`) scrapes a running node, and its HTTP
//! API answers `pushnode_connections`; the shipped alert rules pass `promtool check rules` and
//! their unit tests (`tests/alert_rules_test.yml`), on the series a node really exports.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestNode, metric, on_redis};

fn installed(binary: &str) -> bool {
    let found = Command::new(binary).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{binary} missing under CI");
        eprintln!("SKIPPED: {binary} not installed (apt-get install prometheus)");
    }
    found
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_connection_gauge() {
    if !installed("prometheus") {
        return;
    }
    let node = TestNode::start().await;
    let _a = node.connect("p1").await;
    let _b = node.connect("p2").await;

    let dir = std::env::temp_dir().join(format!("pushnode-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pushnode\n    static_configs:\n      - targets: ['{}']\n",
            node.internal
        ),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let url = format!("http://127.0.0.1:{port}/api/v1/query?query=pushnode_connections");
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        if let Ok(response) = reqwest::get(&url).await
            && let Ok(body) = response.json::<serde_json::Value>().await
            && let Some(sample) = body["data"]["result"].get(0)
        {
            break sample["value"][1].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped pushnode_connections");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(value, "2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_alert_rules_pass_promtool() {
    if !installed("promtool") {
        return;
    }
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/pushnode/files/alerts.yml");
    promtool_succeeds(&["check", "rules"], &rules);
    let text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "PushnodeSubscriberProbeStale",
        "PushnodeDeliveryLatencyHigh",
        "PushnodeSlowConsumerDrops",
        "PushnodeRedisReconnectLoop",
    ] {
        assert!(text.contains(alert), "{alert} missing");
    }
}

#[test]
fn the_alert_rules_fire_and_stay_quiet_where_they_should() {
    if !installed("promtool") {
        return;
    }
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alert_rules_test.yml");
    promtool_succeeds(&["test", "rules"], &tests);
}

/// Runs `promtool <args> <file>` and asserts it succeeded, showing what it said if not.
fn promtool_succeeds(args: &[&str], file: &Path) {
    let out = Command::new("promtool").args(args).arg(file).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// The stale-probe alert's input for a node that never completed a probe (Redis unreachable
/// since its start) is 0, as the rule test above feeds it, not an absent series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_completed_a_probe_exports_its_last_success_as_zero() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let node = TestNode::with(|s| on_redis(s, &format!("redis://{closed}"))).await;
    let (status, text) = node.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(text.lines().any(|l| l == "pushnode_broker_probe_last_success_timestamp_seconds 0"), "{text}");
    assert_eq!(metric(&text, "pushnode_broker_probe_last_success_timestamp_seconds"), 0.0);
}
